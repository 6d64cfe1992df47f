"""Encoder-side reduction, pure tensor parts: the token transform and its bookkeeping, the merge schedule,
each merging method's defining property on hand-made tokens, and the pixel test of temporal reuse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streamprune.reduce.reuse import patch_change, reuse_mask
from streamprune.reduce.vit import (
    MERGE_METHODS,
    TokenState,
    TokenTransform,
    apply_transform,
    merge_schedule,
    unmerge,
)
from streamprune.reduce.vit.tome import bipartite_soft_matching

# ---------------------------------------------------------------- transform and schedule


def test_transform_is_a_size_weighted_mean_and_moves_sizes_and_owners():
    x = torch.tensor([[[1.0], [3.0], [10.0], [7.0]]])
    state = TokenState(x, torch.tensor([[1.0, 3.0, 2.0, 1.0]]), torch.tensor([[0, 1, 2, 3, 1, 1]]), torch.arange(4)[None])
    # token 1 merges into 0; token 3 is pruned (accounted for by 2, value gone)
    step = TokenTransform(dest=torch.tensor([[0, 0, 1, 1]]), kept=torch.tensor([[0, 2]]),
                          contributes=torch.tensor([[True, True, True, False]]))
    out = apply_transform(state, step)
    assert out.x[0, :, 0].tolist() == pytest.approx([(1 * 1 + 3 * 3) / 4, 10.0])
    assert out.size.tolist() == [[4.0, 3.0]]  # sizes move along dest, so they still sum to the patches
    assert out.owner.tolist() == [[0, 0, 1, 1, 0, 0]] and out.position.tolist() == [[0, 2]]
    grid = unmerge(out.x, out.owner)
    assert grid.shape == (1, 6, 1) and grid[0, 3, 0] == 10.0


def test_many_to_many_weights_mix_by_mass():
    x = torch.tensor([[[0.0], [4.0], [8.0]]])
    state = TokenState.start(x)
    weights = torch.tensor([[[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]])
    out = apply_transform(state, TokenTransform(torch.tensor([[0, 0, 1]]), torch.tensor([[0, 2]]), weights=weights))
    assert out.x[0, :, 0].tolist() == pytest.approx([4 / 3, 20 / 3])


@pytest.mark.parametrize("tokens,layers,ratio", [(729, 26, 0.5), (729, 26, 0.9), (64, 12, 0.97), (10, 3, 0.0)])
def test_merge_schedule_removes_the_asked_share_evenly_within_the_bipartite_cap(tokens, layers, ratio):
    schedule = merge_schedule(tokens, layers, ratio)
    assert len(schedule) == layers and sum(schedule) == round(ratio * tokens)
    assert max(schedule) - min(schedule) <= 1 or ratio > 0.95  # constant r unless the cap bites
    left = tokens
    for r in schedule:
        assert r <= left // 2
        left -= r


def test_merge_schedule_rejects_a_ratio_of_one():
    with pytest.raises(ValueError):
        merge_schedule(10, 2, 1.0)


# ---------------------------------------------------------------- ToMe


def test_bipartite_matching_merges_the_r_most_similar_a_tokens_into_their_partners():
    # A = even positions, B = odd. A0 ≈ B3, A2 ≈ B1 (very close), A4 is unlike anything.
    metric = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.05, 1.0, 0.0],
                            [1.0, 0.2, 0.0], [0.0, 0.0, 1.0], [0.0, 0.7, 0.7]]])
    step = bipartite_soft_matching(metric, r=2, order="raster")
    assert step.num_out == 4
    # survivors keep their order: 1, 3, 4, 5 → 0, 1, 2, 3; A2 → B1 (0), A0 → B3 (1)
    assert step.dest.tolist() == [[1, 0, 0, 1, 2, 3]]
    merged = apply_transform(TokenState.start(metric), step)
    assert merged.size.tolist() == [[2.0, 2.0, 1.0, 1.0]]
    assert torch.allclose(merged.x[0, 0], (metric[0, 1] + metric[0, 2]) / 2)
    # the release's order: unmerged A (A4), then B (1, 3, 5); A2 → B1 (1), A0 → B3 (2)
    step = bipartite_soft_matching(metric, r=2)
    assert step.dest.tolist() == [[2, 1, 1, 2, 0, 3]] and step.kept.tolist() == [[4, 1, 3, 5]]
    merged = apply_transform(TokenState.start(metric), step)
    assert merged.size.tolist() == [[1.0, 2.0, 2.0, 1.0]] and merged.position.tolist() == [[4, 1, 3, 5]]
    assert torch.allclose(merged.x[0, 1], (metric[0, 1] + metric[0, 2]) / 2)


def test_bipartite_matching_removes_at_most_half_as_the_release():
    for order in ("tome", "raster"):
        step = bipartite_soft_matching(torch.randn(1, 5, 4), r=9, order=order)
        assert step.num_out == 3  # ⌊5/2⌋ removed
    with pytest.raises(ValueError, match="order"):
        bipartite_soft_matching(torch.randn(1, 4, 4), r=1, order="sorted")


# ToMe over stacked layers. Tokens are unit vectors in the plane at these angles (cosine = cos of the angle
# between them); each step's metric is the tokens themselves.
#   step 1 (r=1): A = 0 (40°), 2 (80°), 4 (155°); B = 1 (20°), 3 (35°), 5 (120°). Best edges: A0–B3 5°,
#     A4–B5 35°, A2–B5 40°, so A0 joins B3 → {0,3} at 37.5°. Release order: [4, 2, 1, {0,3}, 5];
#     raster order: [1, 2, {0,3}, 4, 5].
#   step 2 (r=1), release order: A = 4, 1, 5; B = 2, {0,3}: best edge 1–{0,3} (17.5°) → {0,1,3};
#                 the unmerged A by edge similarity (5: 40°, 4: 75°), then B: [5, 4, 2, {0,1,3}].
#                 raster order:  A = 1, {0,3}, 5; B = 2, 4: best edge 5–4 (35°) → {4,5}.
STACKED_ANGLES = (40, 20, 80, 35, 155, 120)


def released_tome_step(x: torch.Tensor, size: torch.Tensor, sources: list[list[int]], r: int):
    """One merge as ToMe's paper and released code describe it, restated on one frame: x [L, C], size [L],
    sources[i] the original tokens token i stands for. Alternate split (A even, B odd); each A token's edge
    is its most cosine-similar B token; the r A tokens with the most similar edges are added into their B
    token (size-weighted mean); the output is [unmerged A in the order of the similarity sort, then B]."""
    a, b = x[0::2], x[1::2]
    sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    best, partner = sim.max(-1)
    order = best.argsort(descending=True).tolist()
    merged, unmerged = order[:r], order[r:]
    b_sum, b_size = b * size[1::2, None], size[1::2].clone()
    b_sources = [list(s) for s in sources[1::2]]
    for i in merged:
        j = int(partner[i])
        b_sum[j] += a[i] * size[2 * i]
        b_size[j] += size[2 * i]
        b_sources[j] = sorted(b_sources[j] + sources[2 * i])
    out_x = torch.cat([a[unmerged], b_sum / b_size[:, None]])
    out_size = torch.cat([size[0::2][unmerged], b_size])
    out_sources = [sources[2 * i] for i in unmerged] + b_sources
    # the token each output continues (its grid position): an unmerged A token, or the B token itself
    continues = [2 * i for i in unmerged] + list(range(1, x.shape[0], 2))
    return out_x, out_size, out_sources, continues


def stacked_tokens() -> torch.Tensor:
    angles = torch.tensor(STACKED_ANGLES, dtype=torch.float64).deg2rad()
    return torch.stack([angles.cos(), angles.sin()], -1)[None]  # [1, 6, 2]


def stacked_merge(order: str, steps: int = 2) -> TokenState:
    state = TokenState.start(stacked_tokens())
    for _ in range(steps):
        state = apply_transform(state, bipartite_soft_matching(state.x, 1, order=order))
    return state


def sources_of(state: TokenState) -> list[list[int]]:
    owner = state.owner[0].tolist()
    return [[p for p, o in enumerate(owner) if o == j] for j in range(state.num_tokens)]


def test_tome_order_over_stacked_steps_equals_the_released_algorithm():
    x, size = stacked_tokens()[0], torch.ones(6, dtype=torch.float64)
    sources, position = [[i] for i in range(6)], list(range(6))
    for _ in range(2):
        x, size, sources, continues = released_tome_step(x, size, sources, 1)
        position = [position[i] for i in continues]
    assert sources == [[5], [4], [2], [0, 1, 3]]  # the hand-worked merges above
    ours = stacked_merge("tome")
    assert sources_of(ours) == sources  # the same tokens, in the same order
    assert ours.size[0].tolist() == size.tolist() == [1.0, 1.0, 1.0, 3.0]
    assert ours.position[0].tolist() == position == [5, 4, 2, 3]
    assert torch.allclose(ours.x[0], x)
    # unmerging copies each token back to exactly the patches it stands for
    grid = unmerge(ours.x, ours.owner)[0]
    for token, patches in enumerate(sources):
        assert torch.equal(grid[patches], ours.x[0, token].expand(len(patches), -1))


def test_raster_order_merges_differently_over_stacked_steps():
    assert sources_of(stacked_merge("tome", steps=1)) == [[4], [2], [1], [0, 3], [5]]
    assert sorted(sources_of(stacked_merge("raster", steps=1))) == [[0, 3], [1], [2], [4], [5]]  # step 1: same
    raster = stacked_merge("raster")
    assert sources_of(raster) == [[1], [2], [0, 3], [4, 5]]  # step 2 merged 5 into 4, not 1 into {0, 3}
    assert raster.position[0].tolist() == [1, 2, 3, 4]
    assert raster.size[0].tolist() == [1.0, 1.0, 2.0, 2.0]


@pytest.mark.parametrize("name", sorted(MERGE_METHODS))
def test_every_method_removes_exactly_r_and_accounts_for_every_token(name):
    torch.manual_seed(0)
    b, length, c = 2, 40, 16
    x = torch.randn(b, length, c)
    metric = torch.randn(b, length, 8)
    size = torch.randint(1, 4, (b, length)).float()
    attention = torch.softmax(torch.randn(b, 3, length, length), -1)
    position = torch.stack([torch.randperm(64)[:length] for _ in range(b)])  # tokens on an 8×8 grid
    step = MERGE_METHODS[name].plan(metric=metric, r=7, x=x, size=size, attention=attention, position=position,
                                    grid=(8, 8), layer=4, num_layers=12)
    assert step.num_out == length - 7 and step.dest.shape == (b, length)
    assert step.dest.min() >= 0 and step.dest.max() < length - 7
    state = apply_transform(TokenState(x, size, torch.arange(length).expand(b, -1), position), step)
    assert state.x.shape == (b, length - 7, c)
    assert torch.allclose(state.size.sum(1), size.sum(1))  # sizes still sum to the patches
    assert set(state.owner.flatten().tolist()) <= set(range(length - 7))


# ---------------------------------------------------------------- temporal reuse: the pixel test


def test_patch_change_is_in_pixel_levels():
    reference = torch.zeros(3, 12)
    current = reference.clone()
    current[1] += 2 / 255 * 8  # 8 levels on every pixel of patch 1
    current[2, :6] += 2 / 255 * 10  # 10 levels on half of patch 2: a mean of 5
    assert patch_change(reference, current).tolist() == pytest.approx([0.0, 8.0, 5.0])


def test_reuse_mask_recomputes_changed_patches_and_their_halo():
    change = torch.zeros(5 * 5)
    change[12] = 20.0  # the centre of a 5×5 grid
    reuse = reuse_mask(change, (5, 5), threshold=8.0, halo=1, max_fraction=1.0).view(5, 5)
    assert (~reuse).nonzero().tolist() == [[r, c] for r in (1, 2, 3) for c in (1, 2, 3)]
    no_halo = reuse_mask(change, (5, 5), threshold=8.0, halo=0, max_fraction=1.0)
    assert (~no_halo).nonzero().flatten().tolist() == [12]
    assert reuse_mask(change, (5, 5), threshold=30.0, halo=1, max_fraction=1.0).all()


def test_reuse_mask_caps_reuse_at_the_least_changed_patches():
    change = torch.tensor([0.0, 3.0, 1.0, 2.0])
    reuse = reuse_mask(change, (2, 2), threshold=8.0, halo=0, max_fraction=0.5)
    assert reuse.tolist() == [True, False, True, False]
    assert not reuse_mask(change, (2, 2), threshold=8.0, halo=0, max_fraction=0.0).any()


def test_cosine_of_unmerged_features_is_one_for_duplicates():
    # merging exact duplicates loses nothing: unmerge gives back the original grid
    x = torch.tensor([[[1.0, 2.0], [1.0, 2.0], [3.0, -1.0], [3.0, -1.0]]])
    step = bipartite_soft_matching(x, r=2)
    state = apply_transform(TokenState.start(x), step)
    assert torch.allclose(F.cosine_similarity(unmerge(state.x, state.owner), x, -1), torch.ones(1, 4))


# ---------------------------------------------------------------- Zero-TPrune, GTP, Token Transforming


def test_weighted_page_rank_ranks_tokens_attended_by_important_tokens():
    from streamprune.reduce.vit.zero_tprune import emphasize_informative_region, weighted_page_rank

    # token 0 is attended by everyone; token 1 only by token 0; tokens 2, 3 by nobody
    attention = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0],
                              [1.0, 0.0, 0.0, 0.0]])[None, None]
    scores = weighted_page_rank(attention, 1)[0, 0]
    assert scores.argmax() == 0 and scores[2] == scores[3] == 0
    assert torch.allclose(weighted_page_rank(attention, 30).sum(-1), torch.ones(1, 1))  # mass is kept
    # EIR: the root mean square over heads
    two_heads = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])
    assert torch.allclose(emphasize_informative_region(two_heads, variance=(0.0, 10.0)),
                          ((two_heads ** 2).mean(1)).sqrt())


def test_zero_tprune_drops_a_duplicate_then_the_least_important_token():
    from streamprune.reduce.vit.zero_tprune import zero_tprune

    # keys: 4 and 5 are near duplicates of 0 and 1; every query attends to 0 and 1, a little to 2, hardly to 3-5
    metric = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.0, -0.8],
                            [1.0, 0.01, 0.0], [0.0, 1.0, 0.3]]])
    row = torch.tensor([0.4, 0.4, 0.16, 0.01, 0.01, 0.02])
    attention = row.expand(6, 6)[None, None].clone()
    step = zero_tprune(metric, 2, attention=attention, layer=5, num_layers=12)
    # S-stage: of the unimportant half {3, 4, 5}, token 4 repeats token 0 most closely and is pruned although
    # token 3 is as unimportant; I-stage: of what remains, token 3 receives the least attention
    assert (~step.contributes).nonzero()[:, 1].tolist() == [3, 4]
    assert step.kept.tolist() == [[0, 1, 2, 5]]
    assert step.dest[0, 4] == step.dest[0, 0]  # bookkeeping: the duplicate is accounted for by token 0


def test_gtp_propagates_the_least_broadcasting_tokens_into_their_grid_neighbours():
    from streamprune.reduce.vit.gtp import spatial_graph

    # a 2×2 grid: everyone attends to token 0 and to itself a little; token 3 is attended least
    attention = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1], [0.5, 0.1, 0.3, 0.1],
                              [0.6, 0.15, 0.15, 0.1]])[None, None]
    x = torch.eye(4)[None] * 10
    position = torch.arange(4)[None]
    step = MERGE_METHODS["gtp"].plan(metric=torch.randn(1, 4, 3), r=1, x=x, size=torch.ones(1, 4),
                                     attention=attention, position=position, grid=(2, 2))
    assert step.kept.tolist() == [[0, 1, 2]]
    graph = spatial_graph(position, (2, 2))[0]
    assert torch.allclose(graph, torch.full((4, 4), 1 / 3) * (1 - torch.eye(4)))  # 3 neighbours each in a 2×2 grid
    out = apply_transform(TokenState(x, torch.ones(1, 4), torch.arange(4)[None], position), step)
    for j in range(3):  # x_kept + α·Ĝ[kept, 3]·x_3, not renormalised
        assert torch.allclose(out.x[0, j], x[0, j] + 0.1 * graph[j, 3] * x[0, 3])


def test_token_transforming_spreads_a_removed_token_over_its_most_similar_kept_tokens():
    from streamprune.reduce.vit.token_transforming import token_transforming

    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.8, 0.6]]])
    received = torch.tensor([0.3, 0.3, 0.3, 0.1])  # token 3 receives the least attention
    attention = received.expand(4, 4)[None, None].clone()
    step = token_transforming(metric, 1, attention=attention, top_k=2, temperature=0.1)
    assert step.kept.tolist() == [[0, 1, 2]] and step.weights.shape == (1, 3, 4)
    column = step.weights[0, :, 3]
    expected = torch.softmax(torch.tensor([0.8, 0.6]) / 0.1, 0)  # its 2 most similar kept: tokens 0 and 1
    assert torch.allclose(column, torch.tensor([expected[0], expected[1], 0.0]))
    assert torch.equal(step.weights[0, :, :3], torch.eye(3))  # kept tokens keep themselves
    assert step.dest[0, 3] == 0  # accounted for by its most similar kept token
