"""Image-style outer-LLM methods of the zoo (FasterVLM, DivPrune, ToDRE, MMTok, HoloV, HiPrune, FlowCut, AIM) on
hand-made token sets whose right answer is known."""

import itertools

import pytest
import torch

from streamprune.reduce.methods import aim, divprune, fastervlm, flowcut, hiprune, holov, mmtok, todre
from streamprune.reduce.methods.base import INNER, PRE_LLM, frame_quotas, video_budget
from streamprune.reduce.methods.uniform import pooling_cells
from streamprune.tokens import Fate

MODULES = [fastervlm, divprune, todre, mmtok, holov, hiprune, flowcut, aim]
GRID = (4, 4)
N = 16


def random_video(seed: int, t: int = 3, d: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t, N, d, generator=gen), torch.rand(t, N, generator=gen)


def kept(out) -> set[tuple[int, int]]:
    return set(zip(out.frame.tolist(), out.position.tolist(), strict=True))


def kept_positions(out, frame: int = 0) -> set[int]:
    return {p for f, p in kept(out) if f == frame}


# ---------------------------------------------------------------- every method: budget and bookkeeping


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.METHOD.name)
@pytest.mark.parametrize("retain", [0.05, 0.25, 0.5, 1.0])
def test_exact_budget_and_accounting(module, retain):
    feats, attn = random_video(0)
    fn = module.METHOD.reduce
    out = fn(feats, attn, GRID, retain, unknown_option=3)  # unknown options are ignored
    t = feats.shape[0]
    assert len(out) == video_budget(retain, t, N)
    assert int(out.size.sum()) == t * N
    assert out.origin.shape == (t, N) and out.fate.shape == (t, N)
    # every output token is its own representative, at its frame and position
    assert all(out.fate[f, p] == Fate.KEPT for f, p in kept(out))
    assert (out.fate == Fate.KEPT).sum() == len(out)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.METHOD.name)
def test_deterministic(module):
    feats, attn = random_video(1)
    a = module.METHOD.reduce(feats, attn, GRID, 0.3)
    b = module.METHOD.reduce(feats.clone(), attn.clone(), GRID, 0.3)
    assert torch.equal(a.features, b.features) and torch.equal(a.origin, b.origin)


def test_records():
    names = {m.METHOD.name for m in MODULES}
    assert names == {"fastervlm", "divprune", "todre", "mmtok", "holov", "hiprune", "flowcut", "aim"}
    for m in MODULES:
        assert m.METHOD.defaults is m.DEFAULTS and m.METHOD.paper == m.PAPER and m.METHOD.criterion
        assert m.METHOD.cuts == ((PRE_LLM, INNER) if m in (todre, aim) else (PRE_LLM,))
        assert m.METHOD.uses_text == (m is mmtok)
    assert todre.DEFAULTS["inner_ratio"] == 1.0
    assert aim.DEFAULTS["inner_full_layers"] == 15 and aim.DEFAULTS["inner_zero_from_layer"] == 22


# ---------------------------------------------------------------- FasterVLM


def test_fastervlm_keeps_exactly_the_top_attention_tokens_per_frame():
    feats, _ = random_video(2, t=2)
    attn = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(s)).float() for s in (5, 6)])
    out = fastervlm.METHOD.reduce(feats, attn, GRID, 0.25)
    for f, q in enumerate(frame_quotas(0.25, 2, N)):
        assert kept_positions(out, f) == set(attn[f].topk(q).indices.tolist())
    assert torch.equal(out.features, feats[out.frame, out.position])  # pruning: values untouched
    assert (out.fate == Fate.DROPPED).sum() == 2 * N - len(out)


# ---------------------------------------------------------------- DivPrune


def brute_force_max_min(x: torch.Tensor, k: int) -> list[int]:
    """DivPrune's greedy sequence, recomputed pair by pair in plain Python."""
    unit = [v / v.norm() for v in x.double()]
    n = len(unit)
    d = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    nearest = [min(d[i][j] for j in range(n) if j != i) for i in range(n)]
    picks = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picks) < k:
        rest = [i for i in range(n) if i not in picks]
        picks.append(max(rest, key=lambda i: (min(d[i][j] for j in picks), -i)))
    return picks


def test_divprune_is_the_greedy_max_min_sequence():
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(3))
    dist = divprune.cosine_distance(x)
    order = divprune.max_min_order(dist, 6, divprune.most_isolated(dist))
    assert order.tolist() == brute_force_max_min(x, 6)


def test_divprune_first_pick_is_the_most_isolated_token():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, 0.15], [0.0, 1.0], [0.1, 0.99]])
    dist = divprune.cosine_distance(x)
    # token 3 and 4 are each other's neighbours, 0-1-2 are close together: the loneliest is 3 or 4
    nearest = [min(float(dist[i, j]) for j in range(5) if j != i) for i in range(5)]
    assert divprune.most_isolated(dist) == max(range(5), key=lambda i: (nearest[i], -i))


def test_divprune_whole_video_selection_in_original_order():
    feats, attn = random_video(4, t=2, d=6)
    out = divprune.METHOD.reduce(feats, attn, GRID, 0.25)
    flat = feats.reshape(2 * N, -1)
    expected = sorted(brute_force_max_min(flat, video_budget(0.25, 2, N)))
    got = (out.frame * N + out.position).tolist()
    assert got == expected  # output in original (frame, position) order
    assert torch.equal(out.features, flat[expected])


def test_divprune_never_repeats_a_duplicate():
    x = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)  # two points, each four times
    dist = divprune.cosine_distance(x)
    order = divprune.max_min_order(dist, 5, divprune.most_isolated(dist))
    assert len(set(order.tolist())) == 5
    assert {int(order[0]) // 4, int(order[1]) // 4} == {0, 1}  # the two distinct points come first


# ---------------------------------------------------------------- ToDRE


def clustered(centres: torch.Tensor, per: int, spread: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([c + spread * torch.randn(per, len(c), generator=gen) for c in centres])


def test_todre_k_center_covers_every_far_cluster():
    centres = 5 * torch.eye(4)  # four orthogonal directions
    x = clustered(centres, 4, 0.05, 7)  # 16 tokens, 4 tight clusters of 4 (rows 4c..4c+3)
    attn = torch.zeros(1, N)
    attn[0, 5] = 1.0  # start in cluster 1
    out = todre.METHOD.reduce(x[None], attn, GRID, 4 / N)
    assert sorted(p // 4 for p in kept_positions(out)) == [0, 1, 2, 3]
    assert 5 in kept_positions(out)  # the first center is the highest-attention token


def test_todre_centers_are_farthest_points():
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(8))
    centers = todre.k_center(x, 5, first=2).tolist()
    dist = divprune.cosine_distance(x)
    for i in range(1, 5):
        chosen = centers[:i]
        rest = [j for j in range(12) if j not in chosen]
        radius = {j: min(float(dist[j, c]) for c in chosen) for j in rest}
        assert radius[centers[i]] == pytest.approx(max(radius.values()))


# ---------------------------------------------------------------- MMTok


def cluster_and_outlier() -> torch.Tensor:
    """15 near-identical tokens and one orthogonal outlier (position 9)."""
    x = clustered(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), N, 0.01, 9)
    x[9] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    return x


def test_mmtok_text_pulls_in_its_nearest_token_first():
    x = cluster_and_outlier()
    text = torch.tensor([[0.0, 0.1, 1.0, 0.0]])  # nearest to the outlier
    with_text = mmtok.coverage_greedy(mmtok.coverage_matrix(x, text), 3)
    without = mmtok.coverage_greedy(mmtok.coverage_matrix(x, None), 3)
    assert int(with_text[0]) == 9
    assert int(without[0]) != 9  # visual coverage alone starts inside the big cluster
    one = mmtok.METHOD.reduce(x[None], None, GRID, 1 / N, text=text)
    assert kept_positions(one) == {9}
    assert kept_positions(mmtok.METHOD.reduce(x[None], None, GRID, 1 / N)) != {9}


def test_mmtok_greedy_step_is_the_largest_coverage_gain():
    gen = torch.Generator().manual_seed(10)
    x, text = torch.randn(N, 6, generator=gen), torch.randn(3, 6, generator=gen)
    cover = mmtok.coverage_matrix(x, text)
    assert cover.shape == (3 + N, N)
    order = mmtok.coverage_greedy(cover, 5).tolist()
    best = torch.zeros(cover.shape[0])
    for j in order:  # recompute each gain by brute force
        gains = [float((cover[:, c] - best).clamp_min(0).sum()) if c not in order[: order.index(j)] else -1.0
                 for c in range(N)]
        assert gains[j] == pytest.approx(max(gains))
        best = torch.maximum(best, cover[:, j])


def test_mmtok_rejects_text_of_the_wrong_width():
    feats, attn = random_video(11, t=1)
    with pytest.raises(ValueError):
        mmtok.METHOD.reduce(feats, attn, GRID, 0.5, text=torch.zeros(2, 5))


# ---------------------------------------------------------------- HoloV


def crop_counts(out, crops: int) -> list[int]:
    cell = pooling_cells(GRID, crops)
    return torch.bincount(cell[out.position], minlength=crops).tolist()


def test_holov_every_crop_gets_its_share_when_attention_is_concentrated():
    feats = torch.randn(1, N, 8, generator=torch.Generator().manual_seed(12))
    cell = pooling_cells(GRID, 4)
    attn = torch.where(cell == 0, 10.0, 0.01)[None]  # all attention in crop 0
    out = holov.METHOD.reduce(feats, attn, GRID, 8 / N)
    counts = crop_counts(out, 4)
    assert min(counts) >= 1 and sum(counts) == 8
    # attention-only top-8 would take crop 0's 4 tokens and then whatever else scores highest
    assert counts[0] == max(counts)
    # each crop keeps its own top tokens by the holistic score, in the quantity crop_quotas gives
    score = holov.holistic_score(feats[0], attn[0], cell)
    weights = torch.zeros(4).index_add_(0, cell, score)
    assert counts == holov.crop_quotas(weights, torch.bincount(cell), 8)
    for c in range(4):
        members = (cell == c).nonzero().squeeze(1)
        mine = sorted(p for p in kept_positions(out) if cell[p] == c)
        assert mine == sorted(members[score[members].topk(counts[c]).indices].tolist())


def test_holov_uniform_scores_split_the_budget_evenly():
    feats = torch.ones(1, N, 8)  # identical tokens: no diversity differences
    out = holov.METHOD.reduce(feats, torch.ones(1, N), GRID, 8 / N)
    assert crop_counts(out, 4) == [2, 2, 2, 2]


def test_holov_crop_quotas():
    assert holov.crop_quotas(torch.tensor([0.97, 0.01, 0.01, 0.01]), torch.tensor([4, 4, 4, 4]), 8) == [4, 2, 1, 1]
    assert holov.crop_quotas(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2, 5, 5]), 6) == [2, 2, 2]
    assert holov.crop_quotas(torch.tensor([0.1, 0.8, 0.1]), torch.tensor([4, 4, 4]), 2) == [0, 2, 0]  # q < crops: no floor


# ---------------------------------------------------------------- HiPrune


def test_hiprune_keeps_anchors_their_neighbours_and_registers():
    grid = (6, 6)
    n = 36
    feats = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(13))
    obj = torch.full((n,), 0.01)
    obj[14] = 5.0  # the anchor: row 2, col 2
    deep = torch.arange(n, dtype=torch.float).flip(0)  # registers: lowest positions first
    deep[[8, 13, 15, 20]] = -1.0  # the anchor's neighbours get no deep attention at all
    layers = torch.stack([torch.rand(n), obj, torch.rand(n), deep])[None]  # Lv = 4, object layer 2
    out = hiprune.METHOD.reduce(feats, deep[None], grid, 10 / n, layer_attention=layers, object_layer=2)
    expect = {14, 8, 13, 15, 20} | {0, 1, 2, 3, 4}
    assert kept_positions(out) == expect


def test_hiprune_single_map_anchors_from_the_same_map():
    grid = (6, 6)
    attn = torch.zeros(1, 36)
    attn[0, 0] = 9.0  # corner anchor: only two neighbours (1 and 6)
    attn[0, 30:36] = torch.arange(1.0, 7.0)
    out = hiprune.METHOD.reduce(torch.randn(1, 36, 4), attn, grid, 8 / 36)
    assert kept_positions(out) == {0, 1, 6} | {35, 34, 33, 32, 31}


def test_hiprune_neighbours_do_not_wrap_rows():
    assert hiprune.grid_neighbours(torch.tensor([5]), (4, 6)).tolist() == [4, 11]
    assert hiprune.grid_neighbours(torch.tensor([6]), (4, 6)).tolist() == [0, 7, 12]


# ---------------------------------------------------------------- FlowCut


def one_hot_tokens(scale: torch.Tensor) -> torch.Tensor:
    """Token i = scale[i]·e_i: equal-norm tokens have equal semantic flow."""
    return torch.diag(scale)


def test_flowcut_single_map_equal_tokens_keep_top_attention():
    feats = one_hot_tokens(torch.ones(N))[None]
    attn = torch.randperm(N, generator=torch.Generator().manual_seed(14)).float()[None]
    out = flowcut.METHOD.reduce(feats, attn, GRID, 5 / N)
    assert kept_positions(out) == set(attn[0].topk(5).indices.tolist())


def test_flowcut_value_norm_weighting():
    scale = torch.ones(N)
    scale[[3, 7, 11]] = 3.0
    out = flowcut.METHOD.reduce(one_hot_tokens(scale)[None], torch.ones(1, N), GRID, 3 / N)
    assert kept_positions(out) == {3, 7, 11}


def test_flowcut_progressive_cut_is_final():
    """A token cut at an early layer does not come back, however much later layers attend to it."""
    feats = one_hot_tokens(torch.ones(N))[None]
    early = torch.full((N,), 0.01)
    early[:8] = 1.0  # peaked on tokens 0-7: low entropy, a large early cut
    early[15] = 0.0  # token 15 is the least attended at layer 0
    late = torch.full((N,), 0.01)
    late[15] = 50.0  # token 15 dominates the later layers
    layers = torch.stack([early, late, late])[None]  # rpl = 2, 1, 0: cuts at layers 0 and 2
    out = flowcut.METHOD.reduce(feats, late[None], GRID, 4 / N, layer_attention=layers)
    assert len(out) == 4 and 15 not in kept_positions(out)
    assert kept_positions(out) <= set(range(8))
    # with the last map alone, token 15 is kept
    assert 15 in kept_positions(flowcut.METHOD.reduce(feats, late[None], GRID, 4 / N))


def test_flowcut_adaptive_count_follows_entropy():
    flat, peaked = torch.ones(N), torch.zeros(N).index_fill_(0, torch.tensor([0]), 1.0)
    assert flowcut.adaptive_prune_count(flat, 4, 4) == 0  # uniform attention: nothing to cut
    assert flowcut.adaptive_prune_count(peaked, 4, 4) == 6  # (16 − 4)/√4 · (1 − 0)


# ---------------------------------------------------------------- AIM


def pairs_with_decreasing_similarity() -> torch.Tensor:
    """Tokens 2k and 2k+1 share direction u_k; 2k+1 is tilted by ε_k (growing with k); directions orthogonal."""
    x = torch.zeros(8, 8)
    for k, eps in enumerate((0.01, 0.1, 0.5, 1.0)):
        x[2 * k, k] = 1.0
        x[2 * k + 1, k], x[2 * k + 1, 4 + k] = 1.0, eps
    return x


def test_aim_merges_the_most_similar_pairs_first_into_their_mean():
    x = pairs_with_decreasing_similarity()
    out = aim.METHOD.reduce(x[None], None, (2, 4), 6 / 8)
    assert out.position.tolist() == [1, 3, 4, 5, 6, 7]  # A tokens 0 and 2 merged into B tokens 1 and 3
    assert out.size.tolist() == [2, 2, 1, 1, 1, 1]
    assert torch.allclose(out.features[0], (x[0] + x[1]) / 2) and torch.allclose(out.features[1], (x[2] + x[3]) / 2)
    assert torch.equal(out.features[2:], x[4:])
    assert out.fate[0].tolist() == [Fate.MERGED, Fate.KEPT, Fate.MERGED, Fate.KEPT] + [Fate.KEPT] * 4
    assert (out.fate == Fate.DROPPED).sum() == 0


def test_aim_bipartite_match_orders_by_similarity():
    src, dst = aim.bipartite_match(pairs_with_decreasing_similarity(), 4)
    assert src.tolist() == [0, 2, 4, 6] and dst.tolist() == [1, 3, 5, 7]


def test_aim_rounds_reach_the_quota_and_count_every_token():
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(15))
    pos, val, rep = aim.merge_frame(x, 3)  # 20 → 10 → 5 → 3
    assert len(pos) == 3 and val.shape == (3, 6)
    assert set(rep.tolist()) == set(pos.tolist())
    assert all(rep[p] == p for p in pos.tolist())


def test_aim_merges_never_cross_frames():
    feats, _ = random_video(16, t=3)
    out = aim.METHOD.reduce(feats, None, GRID, 0.25)
    for f in range(3):
        assert (out.frame[out.origin[f]] == f).all()
    assert out.frame.bincount(minlength=3).tolist() == frame_quotas(0.25, 3, N)


def test_every_method_keeps_everything_at_retain_one():
    """Sanity on a tiny grid: keeping all tokens returns them all, once, in order."""
    feats, attn = random_video(17, t=2)
    for m in MODULES:
        out = m.METHOD.reduce(feats, attn, GRID, 1.0)
        assert list(itertools.pairwise((out.frame * N + out.position).tolist())) == [
            (i, i + 1) for i in range(2 * N - 1)], m.METHOD.name
        assert torch.allclose(out.features, feats.reshape(2 * N, -1)), m.METHOD.name


def test_mmtok_coverage_matrix_rows_are_distributions():
    gen = torch.Generator().manual_seed(18)
    x, text = torch.randn(N, 6, generator=gen), torch.randn(2, 6, generator=gen)
    cover = mmtok.coverage_matrix(x, text, alpha=0.5)
    assert torch.allclose(cover[:2].sum(1), torch.full((2,), 0.5))  # softmax / L
    assert torch.allclose(cover[2:].sum(1), torch.full((N,), 0.5 / N))  # α · softmax / n
