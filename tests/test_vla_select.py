"""VLA-Pruner's dual-level selection: budget, both criteria's top tokens, diversity trim."""

import torch

from streamprune.reduce.vla import budget, dual_level_select, max_min_diversity


def test_keeps_exactly_the_budget_and_both_tops_when_they_fit():
    torch.manual_seed(0)
    feats = torch.randn(64, 16)
    semantic, action = torch.rand(64), torch.rand(64)
    for k in (1, 8, 16, 40, 64):
        keep = dual_level_select(feats, semantic, action, k)
        assert len(keep) == k and torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == k
    # when the two top-k sets overlap enough that their union fits, it is kept whole
    action = semantic.clone()
    action[semantic.topk(4).indices[-1]] = -1  # one token differs
    keep = dual_level_select(feats, semantic, action, 8)
    union = set(semantic.topk(8).indices.tolist()) | set(action.topk(8).indices.tolist())
    assert len(union) == 9 and set(keep.tolist()) <= union


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
