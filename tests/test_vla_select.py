"""VLA-Pruner's dual-level selection: budget, both criteria's top tokens, diversity trim."""

import pytest
import torch

from streamprune.reduce.vla import SELECTIONS, budget, dual_level_select, max_min_diversity, select_tokens


def test_keeps_exactly_the_budget_and_both_tops_when_they_fit():
    torch.manual_seed(0)
    feats = torch.randn(64, 16)
    semantic, action = torch.rand(64), torch.rand(64)
    for k in (1, 8, 16, 40, 64):
        keep = dual_level_select(feats, semantic, action, k)
        assert len(keep) == k and torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == k
    # both top-k sets agree (the union fits the budget): the union is kept whole, whatever the diversity
    action = semantic * 2 + 1
    assert torch.equal(dual_level_select(feats, semantic, action, 8), semantic.topk(8).indices.sort().values)
    # one token differs: the union of 9 is trimmed to 8 of its members
    action = semantic.clone()
    action[semantic.topk(4).indices[-1]] = -1
    keep = dual_level_select(feats, semantic, action, 8)
    union = set(semantic.topk(8).indices.tolist()) | set(action.topk(8).indices.tolist())
    assert len(union) == 9 and set(keep.tolist()) <= union and len(keep) == 8


def test_without_action_history_it_is_semantic_topk():
    feats, semantic = torch.randn(20, 4), torch.rand(20)
    assert torch.equal(dual_level_select(feats, semantic, None, 5), semantic.topk(5).indices.sort().values)


def test_diversity_prefers_distinct_tokens():
    # three near-duplicates of one direction and two distinct directions: keep one of each
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.01, 0.0], [0.98, 0.02, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    keep = sorted(max_min_diversity(feats, 3).tolist())
    assert keep[1:] == [3, 4] and keep[0] in (0, 1, 2)


def test_budget():
    assert budget(64, 0.25) == 16 and budget(64, 0.001) == 1 and budget(256, 0.125) == 32


def test_select_tokens_dispatches_each_selection_at_the_same_budget():
    gen = torch.Generator().manual_seed(1)
    feats, semantic, action = torch.randn(64, 8, generator=gen), torch.rand(64, generator=gen), torch.rand(64, generator=gen)
    top = {"semantic": semantic.topk(16).indices.sort().values, "action": action.topk(16).indices.sort().values}
    assert torch.equal(select_tokens("semantic", feats, semantic, action, 16), top["semantic"])
    assert torch.equal(select_tokens("action", feats, semantic, action, 16), top["action"])
    assert torch.equal(select_tokens("vla_pruner", feats, semantic, action, 16),
                       dual_level_select(feats, semantic, action, 16))
    # no history yet: the history-based selections fall back to semantic
    assert torch.equal(select_tokens("action", feats, semantic, None, 16), top["semantic"])
    assert torch.equal(select_tokens("vla_pruner", feats, semantic, None, 16), top["semantic"])
    draws = [select_tokens("random", feats, semantic, action, 16, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    for selection in SELECTIONS:
        keep = select_tokens(selection, feats, semantic, action, 16, torch.Generator().manual_seed(0))
        assert len(keep) == len(keep.unique()) == 16 and torch.equal(keep, keep.sort().values)
    with pytest.raises(ValueError, match="unknown selection"):
        select_tokens("fastv", feats, semantic, action, 16)
