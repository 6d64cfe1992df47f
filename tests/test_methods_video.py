"""Video token reduction methods (VisionZip, DyCoke, PruneVid, FastVID, DTD, EVS) on hand-made token sets
whose answer is known: exact budgets, full accounting, and each method's defining property."""

import math

import pytest
import torch

from streamprune import Fate
from streamprune.reduce.methods import REGISTRY
from streamprune.reduce.methods.base import frame_quotas, video_budget
from streamprune.reduce.methods.dtd import dtd, evs
from streamprune.reduce.methods.dycoke import dycoke_ttm, reference_frames
from streamprune.reduce.methods.fastvid import anchor_frames, dynamic_segments, fastvid, merge_into_anchors
from streamprune.reduce.methods.prunevid import prunevid, refine_labels, temporal_windows
from streamprune.reduce.methods.visionzip import split_quota, visionzip

BUDGETED = ["visionzip", "dycoke", "prunevid", "fastvid", "dtd", "evs"]


def basis(d: int, i: int) -> torch.Tensor:
    v = torch.zeros(d)
    v[i] = 1.0
    return v


def kept_positions(out, frame: int) -> set[int]:
    return set(out.position[out.frame == frame].tolist())


def output_index(out, frame: int, position: int) -> int:
    return int(((out.frame == frame) & (out.position == position)).nonzero().item())


def chained(cosines: list[list[float]], refs: list[int | None], n: int) -> torch.Tensor:
    """Frames whose token p has cosine exactly cosines[f][p] with token p of frame refs[f]: each token is its
    reference's unit vector tilted towards a fresh basis direction. Frames without a reference get fresh
    directions. Returns [T, N, T·N]."""
    t = len(refs)
    d = t * n
    feats = torch.zeros(t, n, d)
    for f, ref in enumerate(refs):
        for p in range(n):
            fresh = basis(d, f * n + p)
            if ref is None:
                feats[f, p] = fresh
            else:
                c = cosines[f][p]
                feats[f, p] = c * feats[ref, p] + math.sqrt(1 - c * c) * fresh
    return feats


# ---------------------------------------------------------------- every method: budget, accounting,
# determinism


@pytest.mark.parametrize("name", BUDGETED)
@pytest.mark.parametrize("retain", [0.05, 0.15, 0.3, 0.55, 1.0])
def test_exact_budget_and_full_accounting(name, retain):
    gen = torch.Generator().manual_seed(7)
    t, h, w, d = 9, 4, 5, 24
    n = h * w
    base = torch.randn(n, d, generator=gen)
    feats = base + 0.6 * torch.randn(t, n, d, generator=gen)  # partly static video
    attn = torch.rand(t, n, generator=gen)
    method = REGISTRY[name]
    out = method.reduce(feats, attn, (h, w), retain)
    assert len(out) == video_budget(retain, t, n)
    assert int(out.size.sum()) == t * n
    assert out.origin.shape == (t, n) and int(out.origin.min()) >= 0 and int(out.origin.max()) < len(out)
    # each output token's own original is KEPT and accounted for by it
    own = out.frame * n + out.position
    assert (out.fate.flatten()[own] == Fate.KEPT).all()
    assert (out.origin.flatten()[own] == torch.arange(len(out))).all()
    assert int((out.fate == Fate.KEPT).sum()) == len(out)
    again = method.reduce(feats, attn, (h, w), retain)
    assert torch.equal(out.features, again.features) and torch.equal(out.origin, again.origin)


def test_registered_with_their_cuts():
    assert REGISTRY["dycoke"].cuts == ("pre-llm", "kv-cache")
    assert REGISTRY["prunevid"].cuts == ("pre-llm", "inner")
    dycoke, prunevid_ = REGISTRY["dycoke"].defaults, REGISTRY["prunevid"].defaults
    assert dycoke["kv_layer"] == 3 and dycoke["kv_refresh_similarity"] == 0.9
    assert prunevid_["inner_layer"] == 10 and prunevid_["inner_keep"] == 0.4
    for name in BUDGETED:
        assert "arXiv" in REGISTRY[name].paper and REGISTRY[name].criterion


def test_unknown_options_are_ignored():
    feats = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(0))
    attn = torch.rand(4, 6, generator=torch.Generator().manual_seed(1))
    for name in BUDGETED:
        assert len(REGISTRY[name].reduce(feats, attn, (2, 3), 0.5, not_an_option=3)) == 12


# ---------------------------------------------------------------- VisionZip


def visionzip_frame(d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame of 8 tokens: positions 1 and 4 get the most attention; of the rest (0, 2, 3, 5, 6, 7) the
    stride targets are 0 and 5, with 2, 3 close to 0 and 6, 7 close to 5."""
    x = torch.stack([
        basis(d, 0),
        basis(d, 8),
        basis(d, 0) + 0.2 * basis(d, 2),
        basis(d, 0) + 0.3 * basis(d, 3),
        basis(d, 9),
        basis(d, 1),
        basis(d, 1) + 0.2 * basis(d, 6),
        basis(d, 1) + 0.1 * basis(d, 7),
    ])
    attn = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.8, 0.05, 0.15, 0.25])
    return x, attn


def test_visionzip_keeps_top_attention_as_dominant_and_merges_rest_into_stride_targets():
    x, attn = visionzip_frame()
    feats, attention = torch.stack([x, x.flip(0)]), torch.stack([attn, attn.flip(0)])
    # quota 4 per frame: 2 dominant + 2 contextual
    out = visionzip(feats, attention, (2, 4), 0.5, dominant_ratio=0.5)
    assert len(out) == 8
    assert kept_positions(out, 0) == {0, 1, 4, 5}
    for p in (1, 4):  # dominant: unchanged, alone
        i = output_index(out, 0, p)
        assert torch.equal(out.features[i], x[p]) and out.size[i] == 1
    target = output_index(out, 0, 0)
    assert torch.allclose(out.features[target], x[[0, 2, 3]].mean(0))
    assert out.size[target] == 3 and out.size[output_index(out, 0, 5)] == 3
    assert out.fate[0, [2, 3, 6, 7]].tolist() == [Fate.MERGED] * 4
    # the flipped frame: dominant are its own top-attention positions
    top = set(torch.topk(attention[1], 2).indices.tolist())
    assert top <= kept_positions(out, 1)


def test_visionzip_add_mode_is_target_plus_mean_of_members():
    x, attn = visionzip_frame()
    out = visionzip(x[None], attn[None], (2, 4), 0.5, dominant_ratio=0.5, contextual_merge="add")
    assert torch.allclose(out.features[output_index(out, 0, 0)], x[0] + x[[2, 3]].mean(0))
    assert torch.equal(out.features[output_index(out, 0, 1)], x[1])


def test_visionzip_default_ratio_keeps_54_of_64():
    gen = torch.Generator().manual_seed(3)
    feats, attn = torch.randn(1, 196, 16, generator=gen), torch.rand(1, 196, generator=gen)
    out = visionzip(feats, attn, (14, 14), 64 / 196)
    assert len(out) == 64
    dominant = set(torch.topk(attn[0], 54).indices.tolist())
    assert dominant <= kept_positions(out, 0)
    alone = {int(p) for p, s in zip(out.position, out.size, strict=True) if s == 1}
    assert dominant <= alone


def test_visionzip_dominant_count_is_floored_as_the_release_at_holitoms_setting():
    # LLaVA-OneVision, 32 frames of 14×14 tokens, retain 0.1: quotas of 19 and 20. The released code takes
    # int(q·54/64): 16 dominant for both (round would give 17 for a quota of 20: one token per frame)
    quotas = frame_quotas(0.1, 32, 196)
    assert set(quotas) == {19, 20}
    assert {q: split_quota(q, 54 / 64) for q in quotas} == {19: (16, 3), 20: (16, 4)}
    # end to end, one frame with a quota of 20: positions 100..116 get the most attention, in that order
    attention = torch.zeros(1, 196)
    attention[0, 100:117] = torch.linspace(1.0, 0.5, 17)
    feats = torch.randn(1, 196, 8, generator=torch.Generator().manual_seed(0))
    out = visionzip(feats, attention, (14, 14), 20 / 196)
    assert len(out) == 20
    assert set(range(100, 116)) <= kept_positions(out, 0)  # the 16 dominant, kept
    # the 17th is not dominant; the stride targets (every 45th of the 180 others) do not include it
    assert 116 not in kept_positions(out, 0) and out.fate[0, 116] == Fate.MERGED


# ---------------------------------------------------------------- DyCoke


def test_dycoke_reference_frames_follow_the_released_code():
    assert reference_frames(8) == [None, 0, 0, 2, None, 4, 4, 6]
    assert reference_frames(6) == [None, 0, 0, 2, None, 4]


def test_dycoke_keeps_window_starts_whole_and_drops_the_most_similar():
    n = 6
    refs = reference_frames(8)
    gen = torch.Generator().manual_seed(5)
    cosines = (0.05 + 0.9 * torch.rand(8, n, generator=gen)).tolist()
    feats = chained(cosines, refs, n)
    out = dycoke_ttm(feats, None, (2, 3), 0.5)  # 48 tokens → 24: two whole frames (12) + 2 per other frame
    assert len(out) == 24
    assert kept_positions(out, 0) == kept_positions(out, 4) == set(range(n))
    for f in (1, 2, 3, 5, 6, 7):
        least_similar = set(torch.tensor(cosines[f]).argsort()[:2].tolist())
        assert kept_positions(out, f) == least_similar
        gone = [p for p in range(n) if p not in least_similar]
        assert out.fate[f, gone].tolist() == [Fate.DROPPED] * len(gone)  # dropped, not merged
    assert not (out.fate == Fate.MERGED).any()
    for i in range(len(out)):  # kept tokens keep their own values
        assert torch.equal(out.features[i], feats[out.frame[i], out.position[i]])


def test_dycoke_below_ttm_floor_keeps_only_window_starts():
    feats = torch.randn(8, 6, 12, generator=torch.Generator().manual_seed(2))
    out = dycoke_ttm(feats, None, (2, 3), 0.2)  # 10 tokens < 2 whole frames
    assert len(out) == 10
    assert set(out.frame.tolist()) == {0, 4}


# ---------------------------------------------------------------- PruneVid


def prunevid_video(gen: torch.Generator, d: int = 64) -> torch.Tensor:
    """8 frames of 4 tokens: scene A in frames 0–3, scene B in 4–7. Position 0 is static background in each
    scene (basis 0 / basis 1 plus small noise); positions 1–3 are new content in every frame."""
    feats = torch.zeros(8, 4, d)
    for f in range(8):
        background = basis(d, 0 if f < 4 else 1)
        feats[f, 0] = background + 0.01 * torch.randn(d, generator=gen)
        for p in range(1, 4):  # cosine 0.2 across frames: never static; the shared part tells scenes apart
            feats[f, p] = 2 * basis(d, 2 + f * 3 + p) + basis(d, 40 if f < 4 else 41)
    return feats


def test_prunevid_refine_labels():
    assert refine_labels([0, 0, 1, 0, 0, 0, 1, 1]) == [0, 0, 0, 0, 0, 0, 1, 1]
    assert refine_labels([2, 2, 2, 5]) == [2, 2, 2, 2]  # a one-frame label is dissolved into its neighbour


def test_prunevid_merges_static_background_into_its_temporal_mean():
    feats = prunevid_video(torch.Generator().manual_seed(0))
    assert temporal_windows(feats) == [(0, 3), (4, 7)]
    out = prunevid(feats, None, (2, 2), 26 / 32)  # 32 − 2·3 merged = 26: no spatial clustering needed
    assert out.segments == [(0, 3), (4, 7)] and out.after_temporal == 26 and len(out) == 26
    for s, e in out.segments:
        i = output_index(out, s, 0)
        assert torch.allclose(out.features[i], feats[s : e + 1, 0].mean(0), atol=1e-6)
        assert out.size[i] == 4
        assert (out.origin[s : e + 1, 0] == i).all()
        assert out.fate[s, 0] == Fate.KEPT
        assert out.fate[s + 1 : e + 1, 0].tolist() == [Fate.MERGED] * 3
        assert all(0 not in kept_positions(out, f) for f in range(s + 1, e + 1))
    assert not (out.fate == Fate.DROPPED).any()


def test_prunevid_puts_static_back_when_the_budget_is_above_the_temporal_merge():
    feats = prunevid_video(torch.Generator().manual_seed(0))
    out = prunevid(feats, None, (2, 2), 1.0)
    assert len(out) == 32 and out.after_temporal == 32 and (out.fate == Fate.KEPT).all()


def test_prunevid_clusters_near_duplicates_to_their_mean():
    d = 40
    gen = torch.Generator().manual_seed(4)
    # one frame of 20 tokens in 10 tight pairs: halving it must merge each pair
    centres = 3 * torch.randn(10, d, generator=gen)
    tokens = torch.cat([centres, centres + 0.01 * torch.randn(10, d, generator=gen)])
    out = prunevid(tokens[None], None, (4, 5), 0.5)
    assert len(out) == 10 and (out.size == 2).all()
    for i in range(10):
        assert out.origin[0, i] == out.origin[0, i + 10]
        assert torch.allclose(out.features[out.origin[0, i]], tokens[[i, i + 10]].mean(0), atol=1e-5)


# ---------------------------------------------------------------- FastVID


def fastvid_video(gen: torch.Generator, n: int = 8, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    scene_a, scene_b = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    frames = [scene_a if f < 4 else scene_b for f in range(8)]
    feats = torch.stack(frames) + 0.01 * torch.randn(8, n, d, generator=gen)
    return feats, torch.rand(8, n, generator=gen)


def test_fastvid_cuts_segments_where_content_changes():
    feats, attn = fastvid_video(torch.Generator().manual_seed(1))
    assert dynamic_segments(feats.mean(1), min_segments=2) == [(0, 3), (4, 7)]
    assert dynamic_segments(feats.mean(1), min_segments=1, tau=0.9) == [(0, 3), (4, 7)]  # only the τ cut
    assert dynamic_segments(feats.mean(1), min_segments=8) == [(f, f) for f in range(8)]
    out = fastvid(feats, attn, (2, 4), 0.5, min_segments=2)
    assert out.segments == [(0, 3), (4, 7)]


def test_fastvid_anchor_frames_count_from_the_segment_end():
    assert anchor_frames(0, 3) == [3]
    assert anchor_frames(0, 9) == [1, 5, 9]
    assert anchor_frames(4, 4) == [4]


def test_fastvid_salient_per_frame_context_on_anchor_frames():
    feats, attn = fastvid_video(torch.Generator().manual_seed(1))
    out = fastvid(feats, attn, (2, 4), 0.5, min_segments=2)  # quota 4/frame: 3 salient + 1 context
    assert len(out) == 32
    for s, e in [(0, 3), (4, 7)]:
        for f in range(s, e):  # non-anchor frames: exactly their top-3 attention tokens
            assert kept_positions(out, f) == set(torch.topk(attn[f], 3).indices.tolist())
        assert len(kept_positions(out, e)) == 3 + 4  # the anchor holds the segment's 4 context tokens
        # every non-salient token of the segment is merged into an anchor token of the last frame
        merged = out.fate[s : e + 1] == Fate.MERGED
        assert int(merged.sum()) == 4 * 8 - 16
        assert (out.frame[out.origin[s : e + 1][merged]] == e).all()
    assert not (out.fate == Fate.DROPPED).any()


def test_fastvid_dtm_weight():
    anchors = torch.tensor([[1.0, 0.0]])
    pool = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # both join; n = 2 → w = max(1/3, 0.6) = 0.6
    assert torch.allclose(merge_into_anchors(anchors, pool), torch.tensor([[0.96, 0.12]]))
    lone = merge_into_anchors(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.1]]))
    assert torch.allclose(lone[0], torch.tensor([0.0, 1.0]))  # nothing joined: unchanged


# ---------------------------------------------------------------- DTD and EVS

DTD_COSINES = [
    [0.0] * 6,
    [0.9, 0.3, 0.95, 0.5, 0.7, 0.2],  # frame 1 vs frame 0
    [0.1, 0.99, 0.61, 0.59, 0.0, 0.8],  # frame 2 vs frame 1
]


def dtd_video() -> torch.Tensor:
    return chained(DTD_COSINES, [None, 0, 1], 6)


def test_dtd_threshold_drops_exactly_the_positions_above_it():
    out = dtd(dtd_video(), None, (2, 3), 0.5, threshold=0.6)
    assert kept_positions(out, 0) == set(range(6))
    assert kept_positions(out, 1) == {1, 3, 5}  # 0.9, 0.95, 0.7 > 0.6 dropped
    assert kept_positions(out, 2) == {0, 3, 4}  # 0.99, 0.61, 0.8 > 0.6 dropped; 0.59 kept
    assert len(out) == 12  # whatever the threshold leaves, not the budget (9)
    assert out.fate[1, [0, 2, 4]].tolist() == [Fate.DROPPED] * 3


def test_dtd_relative_drops_the_most_similar_per_frame_to_the_budget():
    out = dtd(dtd_video(), None, (2, 3), 0.5)  # budget 9: frame 0 whole, then 2 + 1
    assert len(out) == 9
    assert kept_positions(out, 0) == set(range(6))
    assert kept_positions(out, 1) == {1, 5}  # cosines 0.3, 0.2
    assert kept_positions(out, 2) == {4}  # cosine 0.0


def test_evs_keeps_frame_zero_and_the_globally_most_dissimilar():
    out = evs(dtd_video(), None, (2, 3), 0.5)  # budget 9: frame 0 + the 3 largest 1 − cos of the video
    assert kept_positions(out, 0) == set(range(6))
    assert kept_positions(out, 1) == {5}  # 0.8
    assert kept_positions(out, 2) == {0, 4}  # 0.9, 1.0
    assert (out.fate == Fate.DROPPED).sum() == 9 and not (out.fate == Fate.MERGED).any()


def test_evs_and_dtd_below_one_frame_keep_spread_positions_of_frame_zero():
    for fn in (dtd, evs):
        out = fn(dtd_video(), None, (2, 3), 0.1)  # budget 2 < 6
        assert len(out) == 2 and set(out.frame.tolist()) == {0}
        assert kept_positions(out, 0) == {0, 3}
