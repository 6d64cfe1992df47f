"""HoliTom outer-LLM reduction: segmentation, clustering, budget and bookkeeping, on hand-made tensors."""

import math

import numpy as np
import pytest
import torch

from streamprune import ConfigError, Fate
from streamprune.reduce import reduce_tokens
from streamprune.reduce.holitom import (
    adjacent_similarity,
    allocate_budget,
    default_tau,
    dpc_knn,
    holitom_reduce,
    merge_into_centres,
    segment_by_gains,
    static_gains,
    temporal_segments,
)

N, D = 16, 32


def frames_from(base: torch.Tensor, count: int) -> torch.Tensor:
    return base[None].repeat(count, 1, 1)


def random_grid(seed: int, t: int = 1) -> torch.Tensor:
    return torch.randn(t, N, D, generator=torch.Generator().manual_seed(seed))


def test_identical_frames_are_one_segment():
    assert temporal_segments(frames_from(random_grid(0)[0], 8), tau=0.8) == [(0, 7)]


def test_all_different_frames_are_singletons():
    feats = random_grid(1, 6)  # independent random frames: cosine ≈ 0 < τ everywhere
    assert temporal_segments(feats, tau=0.8) == [(i, i) for i in range(6)]


def test_cut_in_the_middle_gives_two_segments():
    feats = torch.cat([frames_from(random_grid(2)[0], 5), frames_from(random_grid(3)[0], 7)])
    assert temporal_segments(feats, tau=0.8) == [(0, 4), (5, 11)]


def test_single_frame():
    assert temporal_segments(random_grid(4, 1), tau=0.8) == [(0, 0)]


def test_tau_boundary_is_strict():
    """Static means similarity strictly above τ."""
    a = torch.zeros(N, D)
    a[:, 0] = 1.0
    b = torch.zeros(N, D)
    b[:, 0], b[:, 1] = 0.8, 0.6  # cos(a, b) = 0.8 exactly
    feats = torch.stack([a, b])
    sim = adjacent_similarity(feats)
    assert torch.allclose(sim, torch.full_like(sim, 0.8))
    assert temporal_segments(feats, tau=0.79) == [(0, 1)]
    assert temporal_segments(feats, tau=0.81) == [(0, 0), (1, 1)]


def test_gains_and_dp_match_hand_computation():
    # 4 frames; positions 0-1 static over frames 0-2, position 2 static over 2-3 only.
    ok = torch.zeros(3, 4)
    ok[0:2, 0:2] = 1.0
    ok[2, 2] = 1.0
    gains = static_gains(ok, tau=0.5)
    assert gains[0, 1] == 1 * 2 and gains[0, 2] == 2 * 2 and gains[0, 3] == 0
    assert gains[2, 3] == 1 * 1 and gains[1, 3] == 0
    segments, merged = segment_by_gains(gains)
    assert segments == [(0, 2), (3, 3)] and merged == 4


def test_max_window_limits_segment_length():
    feats = frames_from(random_grid(5)[0], 10)
    segments = temporal_segments(feats, tau=0.8, max_window=4)
    assert all(e - s + 1 <= 4 for s, e in segments)
    assert segments[0][0] == 0 and segments[-1][1] == 9
    assert all(b[0] == a[1] + 1 for a, b in zip(segments, segments[1:], strict=False))


def test_segments_cover_frames_in_order_on_noisy_video():
    torch.manual_seed(0)
    feats = torch.cumsum(torch.randn(40, N, D) * 0.3, dim=0)  # slowly drifting frames
    segments = temporal_segments(feats, tau=0.9)
    assert segments[0][0] == 0 and segments[-1][1] == 39
    assert all(b[0] == a[1] + 1 and a[0] <= a[1] for a, b in zip(segments, segments[1:], strict=False))


def test_default_tau_follows_the_authors_scripts():
    assert default_tau(0.1) == 0.65 and default_tau(0.05) == 0.65 and default_tau(0.25) == 0.8


def test_allocate_budget_is_exact_and_proportional():
    sizes = [196, 40, 156, 156, 7]
    for budget in [1, 13, 55, 100, 554]:
        quotas = allocate_budget(sizes, budget)
        assert sum(quotas) == budget
        assert all(0 <= q <= s for q, s in zip(quotas, sizes, strict=True))
        assert all(abs(q - s * budget / sum(sizes)) < 1 for q, s in zip(quotas, sizes, strict=True))
    assert allocate_budget(sizes, 10_000) == sizes


def test_dpc_knn_picks_one_centre_per_well_separated_cluster():
    gen = torch.Generator().manual_seed(0)
    centres_true = torch.randn(3, D, generator=gen) * 10
    x = torch.cat([c + 0.1 * torch.randn(8, D, generator=gen) for c in centres_true])
    centres, dist = dpc_knn(x, 3, k=7)
    assert centres.tolist() == sorted(centres.tolist())
    assert sorted((centres // 8).tolist()) == [0, 1, 2]  # one centre in each cluster
    assert torch.allclose(dist, torch.cdist(x, x) / math.sqrt(D))


def test_dpc_knn_is_reproducible():
    x = random_grid(6)[0]
    assert torch.equal(dpc_knn(x, 5)[0], dpc_knn(x, 5)[0])


def test_merge_formula_on_hand_example():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [0.0, 1.0], [11.0, 10.0]])
    centres = torch.tensor([0, 2])
    merged, assign = merge_into_centres(x, centres, torch.cdist(x, x), beta=0.6)
    assert assign.tolist() == [0, 0, 1, 0, 1]
    # centre 0 with members (1,0) and (0,1): 0.6·(0,0) + 0.4·mean = (0.2, 0.2)
    assert torch.allclose(merged[0], torch.tensor([0.2, 0.2]))
    # centre 2 with member (11,10): 0.6·(10,10) + 0.4·(11,10)
    assert torch.allclose(merged[1], torch.tensor([10.4, 10.0]))
    lonely, _ = merge_into_centres(x[:1], torch.tensor([0]), torch.zeros(1, 1))
    assert torch.equal(lonely, x[:1])  # a centre without members keeps its value


def video_with_static_background(t: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the positions never change; the other half change every frame; a cut at t/2."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(t, 196, 64, generator=gen)
    for part in (slice(0, t // 2), slice(t // 2, t)):
        feats[part, :98] = torch.randn(98, 64, generator=gen)  # static within each half
    return feats, torch.rand(t, 196, generator=gen)


@pytest.mark.parametrize("retain", [0.05, 0.1, 0.15, 0.25, 0.4])
def test_budget_and_size_bookkeeping(retain):
    feats, attn = video_with_static_background()
    t, n, _ = feats.shape
    out = holitom_reduce(feats, attn, (14, 14), retain)
    target = round(retain * t * n)
    assert abs(len(out) - target) <= 0.02 * target
    assert out.segments == [(0, 5), (6, 11)]
    assert out.after_temporal == t * n - 2 * 5 * 98
    assert out.size.sum().item() == t * n
    assert torch.equal(out.size, torch.bincount(out.origin.flatten(), minlength=len(out)))
    assert (out.origin >= 0).all() and (out.origin < len(out)).all()
    assert (out.fate == Fate.KEPT).sum().item() == len(out)  # each output token sits at one original
    kept_t, kept_p = (out.fate == Fate.KEPT).nonzero(as_tuple=True)
    assert sorted(zip(out.frame.tolist(), out.position.tolist(), strict=True)) == sorted(
        zip(kept_t.tolist(), kept_p.tolist(), strict=True))
    assert (out.size >= 1).all()


def test_static_tokens_are_temporal_means_at_segment_start():
    feats, attn = video_with_static_background()
    out = holitom_reduce(feats, attn, (14, 14), retain=1.0, tau=0.8)
    # at retain 1 nothing is clustered or dropped: static positions become their temporal mean
    static = out.frame == 0
    static &= out.position < 98
    assert static.sum() == 98
    assert torch.allclose(out.features[static], feats[0:6, :98].mean(0), atol=1e-6)
    assert (out.size[static] == 6).all()
    assert len(out) == out.after_temporal == 12 * 196 - 2 * 5 * 98


def test_dynamic_tokens_are_attention_topk():
    feats = torch.randn(3, 196, 64, generator=torch.Generator().manual_seed(1))  # no static tokens
    attn = torch.rand(3, 196, generator=torch.Generator().manual_seed(2))
    out = holitom_reduce(feats, attn, (14, 14), retain=0.1)
    for f in range(3):
        kept = out.position[out.frame == f]
        expected = attn[f].topk(len(kept)).indices.sort().values
        assert torch.equal(kept, expected)
        assert torch.equal(out.features[out.frame == f], feats[f, expected])
    assert (out.fate == Fate.MERGED).sum() == 0


def test_output_order_is_segment_then_static_then_frames():
    feats, attn = video_with_static_background()
    out = holitom_reduce(feats, attn, (14, 14), retain=0.25)
    assert (out.frame.diff() >= 0).all()  # segments in time order, frames within a segment in order


def test_retain_one_or_none_is_the_identity():
    feats, attn = video_with_static_background()
    for method in ("none", "holitom"):
        out = reduce_tokens(method, feats, attn, (14, 14), retain=1.0)
        assert torch.equal(out.features, feats.reshape(-1, 64))
        assert out.size.tolist() == [1] * feats.shape[0] * 196


@pytest.mark.parametrize("retain", [0.0, -0.1, 1.5, float("nan")])
def test_bad_retain_raises(retain):
    feats, attn = video_with_static_background()
    with pytest.raises(ConfigError):
        reduce_tokens("holitom", feats, attn, (14, 14), retain)


def test_unknown_method_raises():
    with pytest.raises(ConfigError, match="unknown method"):
        reduce_tokens("nope", *video_with_static_background(), (14, 14), 0.1)


def test_segmentation_numpy_matches_bruteforce():
    """The vectorised gains equal a direct count over every window."""
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(np.cumsum(rng.normal(size=(9, 20, 8)), axis=0)).float()
    sim = adjacent_similarity(feats)
    gains = static_gains(sim, 0.5)
    for s in range(9):
        for e in range(s + 1, 9):
            assert gains[s, e] == (e - s) * int((sim[s:e] > 0.5).all(0).sum())
