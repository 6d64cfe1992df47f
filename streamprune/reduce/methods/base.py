"""What every outer-LLM method shares: the `Method` record, budgets, and building `VisualTokens` from a choice.

Shapes: T frames, N tokens per frame (grid H×W), D feature width, M output tokens. A method decides, per
original token (t, p), its *representative* — the flat index t·N + p of the original token whose output
token it ends up in (itself if it is kept) — and whether its value counts (merged) or not (dropped).
`assemble` turns that decision into `VisualTokens`, so methods only choose and never do bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from streamprune.errors import ConfigError
from streamprune.reduce.holitom import allocate_budget
from streamprune.tokens import Fate, VisualTokens

# where a method cuts tokens, in the order they happen
PRE_LLM, INNER, KV_CACHE = "pre-llm", "inner", "kv-cache"

OuterFn = Callable[..., VisualTokens]  # (features [T,N,D], attention [T,N], grid_hw, retain, **options)


@dataclass(frozen=True)
class Method:
    """A reduction method as the registry knows it.

    reduce: the part before the LLM, `reduce(features, attention, grid_hw, retain, **options) -> VisualTokens`
            (None: every token goes in).
    inner:  the cuts inside the LLM, `inner(retain, num_layers, **options) -> InnerConfig` (steps and/or KV
            pruning; None: nothing inside). `retain` is always the share of visual tokens left after the
            method's last cut, so methods compare at equal budgets.
    before_share: for methods that cut both before and inside, `before_share(retain, **options)` is the share
            the part before the LLM keeps (default: all of `retain` before, or everything if `reduce` is None).
    uses_text: `reduce` takes `text` [L, D], the prompt's token embeddings in the visual tokens' space.
    proportional: its merged tokens get size-weighted attention (the product default); off for methods that
            only prune, whose papers attend to survivors as they are.
    """

    name: str
    paper: str
    cuts: tuple[str, ...]
    reduce: OuterFn | None
    defaults: dict = field(default_factory=dict)
    inner: Callable[..., object] | None = None
    before_share: Callable[..., float] | None = None
    uses_text: bool = False
    proportional: bool = True

    @property
    def criterion(self) -> str:
        """What it keeps and why: the first paragraph of the docstrings of its part before the LLM and inside."""
        parts = [" ".join((fn.__doc__ or "").strip().split("\n\n")[0].split()) for fn in (self.reduce, self.inner) if fn]
        return " Inside the LLM: ".join(p for p in parts if p)


def check_inputs(features: torch.Tensor, attention: torch.Tensor | None, retain: float) -> tuple[int, int]:
    """Shapes and ratio every method validates. Returns (T, N)."""
    if features.dim() != 3:
        raise ValueError(f"features must be [T, N, D], got {tuple(features.shape)}")
    t, n, _ = features.shape
    if attention is not None and attention.shape != (t, n):
        raise ValueError(f"attention must be [{t}, {n}], got {tuple(attention.shape)}")
    if not 0.0 < retain <= 1.0:
        raise ConfigError(f"retain must be in (0, 1], got {retain}")
    return t, n


def video_budget(retain: float, t: int, n: int) -> int:
    """Tokens a method keeps for a whole video: round(retain·T·N), at least one."""
    return max(1, min(t * n, round(retain * t * n)))


def frame_quotas(retain: float, t: int, n: int) -> list[int]:
    """The video budget split over T frames of N tokens by largest remainder (differ by at most one)."""
    return allocate_budget([n] * t, video_budget(retain, t, n))


def assemble(features: torch.Tensor, rep: torch.Tensor, dropped: torch.Tensor, grid_hw: tuple[int, int],
             values: torch.Tensor | None = None, segments: list[tuple[int, int]] | None = None,
             after_temporal: int | None = None) -> VisualTokens:
    """`VisualTokens` from a per-token decision.

    features: [T, N, D]; rep: [T, N] long, flat index (t·N + p) of each token's representative, -1 for a
    dropped token that any similar kept token may count; a representative has rep == its own index.
    dropped: [T, N] bool, tokens whose values are discarded (never a representative).
    values: optional [M, D] output values in output order (default: mean of each representative's
    non-dropped group). Output order: representatives by (frame, position). A dropped token with rep = -1
    is counted against the most cosine-similar output token of its own frame (any frame if its frame kept
    none), so `size` sums to T·N; that matching only feeds reports and proportional attention, so it runs
    when `origin` or `size` is first read. Representatives sit at their own frame and position. Everything
    stays on the features' device; values keep their dtype.
    """
    t, n, d = features.shape
    device = features.device
    flat = features.reshape(t * n, d)
    rep, dropped = rep.flatten(), dropped.flatten()
    own = torch.arange(t * n, device=device)
    is_rep = (rep == own) & ~dropped
    reps = is_rep.nonzero().squeeze(1)  # sorted: frame-major raster order
    if len(reps) == 0:
        raise ValueError("assemble: no token is kept")
    if (~dropped & ((rep < 0) | ~is_rep[rep.clamp(min=0)])).any():
        raise ValueError("assemble: every kept or merged token must point at a representative")
    slot = torch.full((t * n,), -1, dtype=torch.long, device=device)
    slot[reps] = torch.arange(len(reps), device=device)
    origin = torch.where(rep >= 0, slot[rep.clamp(min=0)], -1)
    if values is None:
        used = ~dropped
        merged = (rep != own) & used  # only groups with members need a mean; kept tokens are copied as they are
        values = flat[reps].clone()
        if merged.any():
            total = torch.zeros(len(reps), d, dtype=torch.float32, device=device)
            total.index_add_(0, origin[used], flat[used].float())
            count = torch.bincount(origin[used], minlength=len(reps))
            grouped = count > 1
            values[grouped] = (total[grouped] / count[grouped, None]).to(flat.dtype)
    fate = torch.full((t * n,), Fate.MERGED, dtype=torch.uint8, device=device)
    fate[dropped] = Fate.DROPPED
    fate[reps] = Fate.KEPT
    out_values = values.to(features.dtype)
    loose = (origin < 0).any()
    return VisualTokens(
        features=out_values,
        frame=reps // n,
        position=reps % n,
        size=None if loose else torch.bincount(origin, minlength=len(reps)),
        origin=origin.view(t, n),
        fate=fate.view(t, n),
        grid_hw=grid_hw,
        segments=segments if segments is not None else [(i, i) for i in range(t)],
        after_temporal=t * n if after_temporal is None else after_temporal,
        attribute=nearest_kept(flat, out_values, reps, n) if loose else None,
    )


def nearest_kept(flat: torch.Tensor, values: torch.Tensor, reps: torch.Tensor, n: int):
    """The deferred attribution of `assemble`: each loose token of `origin` [T·N] (−1) to the most
    cosine-similar output token of its own frame, or of any frame if its frame kept none.

    flat: [T·N, D] original tokens; values: [M, D] output tokens; reps: [M] flat index of each output token
    (ascending, so frame-major). Each frame is compared only with its own output tokens, padded to the
    largest count per frame ([T, N, width] similarities, not [T·N, M]: T times less work on a long clip).
    Two host reads: that width, and whether some frame kept nothing."""
    def attribute(origin: torch.Tensor) -> None:
        device, d = flat.device, flat.shape[1]
        t, m = flat.shape[0] // n, reps.shape[0]
        frame_of = reps // n  # [M], non-decreasing
        counts = torch.bincount(frame_of, minlength=t)  # output tokens per frame [T]
        width = int(counts.max())
        column = torch.arange(m, device=device) - (counts.cumsum(0) - counts)[frame_of]  # slot within its frame
        table = torch.full((t, width), -1, dtype=torch.long, device=device)  # [T, width] output index per slot
        table[frame_of, column] = torch.arange(m, device=device)
        unit = F.normalize(values.float(), dim=-1)  # [M, D]
        padded = torch.zeros(t, width, d, dtype=torch.float32, device=device)
        padded[frame_of, column] = unit
        sim = F.normalize(flat.float(), dim=-1).view(t, n, d) @ padded.transpose(1, 2)  # [T, N, width]
        sim = sim.masked_fill(table[:, None, :] < 0, float("-inf"))
        best = table.gather(1, sim.argmax(-1)).flatten()  # [T·N]; −1 in a frame without output tokens
        loose = origin < 0
        origin.copy_(torch.where(loose, best, origin))
        orphan = (loose & (best < 0)).nonzero().squeeze(1)
        if len(orphan):  # their frame kept nothing: the most similar output token of any frame
            origin[orphan] = (F.normalize(flat[orphan].float(), dim=-1) @ unit.T).argmax(-1)
    return attribute


def keep_only(features: torch.Tensor, keep: torch.Tensor, grid_hw: tuple[int, int], **kwargs) -> VisualTokens:
    """Pure pruning: keep [T, N] bool tokens as they are, drop the rest."""
    t, n, _ = features.shape
    keep = keep.flatten()
    rep = torch.where(keep, torch.arange(t * n, device=keep.device), -1)
    return assemble(features, rep.view(t, n), ~keep.view(t, n), grid_hw, **kwargs)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[..., n] bool marking the k highest scores along the last dim (ties to the earlier index)."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order[..., :k], True)


def quota_topk(scores: torch.Tensor, quotas: torch.Tensor | list[int]) -> torch.Tensor:
    """Per row, the quota highest scores, in one sort for all rows (ties to the earlier index).

    scores: [T, N] (−inf marks what may never be picked, as long as a row's quota leaves it out);
    quotas: [T] long (or a list of ints). Returns [T, N] bool."""
    quotas = torch.as_tensor(quotas, dtype=torch.long, device=scores.device)
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    rank_ok = torch.arange(scores.shape[-1], device=scores.device)[None, :] < quotas[:, None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, rank_ok)


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """[n, D] → [n, n] pairwise cosine similarity."""
    unit = F.normalize(x.float(), dim=-1)
    return unit @ unit.T
