"""Inner-LLM token reduction at decoder layer K: which visual tokens survive and what the others become.

Pure tensor code over a batch of hidden states. Shapes: B rows, L tokens, C hidden width.
A `MergePlan` says, per row, which positions survive (`keep` [B, L'], sorted, the same L' in every row)
and where each removed visual token went (`target` [B, L]: index of the surviving token it was merged
into, or -1 if it survives or was dropped). Applying a plan is deterministic, so the same plan replayed
on a longer sequence (decode without cache) gives the same values.

Modes:
- `holitom`: keep the top-(1−r) visual tokens by the last prompt token's attention; merge every other
  visual token into its most cosine-similar kept token (HoliTom §3.3).
- `similarity`: no attention; bipartite soft matching (ToMe) over visual tokens in rounds until r of
  them are merged. Query-free, for streaming.
- `fastv`: keep the top-(1−r) by attention; drop the rest (FastV baseline).

A method's schedule is a list of `InnerStep`s (several layers for progressive pruning); a mode is the
one-step schedule it names. A step scores visual tokens by a criterion read at layer K−1 (`last`: the
last prompt token's attention; `text`: mean attention of the prompt's text tokens after the video;
`received`: mean attention received from every prompt token, one PageRank step from uniform, AIM's
criterion; `last-norope`: `last` without rotary embeddings, FEATHER's fix for its bias toward late positions;
`transition`: token transition variation accumulated over layers plus `text` attention, TransPrune),
keeps an optional `uniform` share of survivors at an even stride over the visual tokens, and drops the
rest or merges them into their most similar survivor.

Merge values: `mean` (default) is the size-weighted mean of everything merged into a token — order
independent and consistent with `VisualTokens.size`. `pairwise` is HoliTom's running average
h[i] ← (h[i] + h[j]) / 2 applied in index order, which weights later tokens more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamprune.errors import ConfigError

MODES = ("holitom", "similarity", "fastv")
MERGES = ("mean", "pairwise")
CRITERIA = ("last", "text", "received", "last-norope", "transition", "similarity")
ACTIONS = ("drop", "merge")


@dataclass(frozen=True)
class InnerStep:
    """One cut inside the LLM: at decoder layer `layer`, remove `ratio` of the visual tokens entering it."""

    layer: int
    ratio: float  # 1.0 removes every visual token
    criterion: str = "last"  # one of CRITERIA
    action: str = "drop"  # drop | merge (similarity always merges)
    uniform: float = 0.0  # share of the survivors picked at an even stride over the visual tokens
    since: int | None = None  # transition: first layer whose transitions count (default: two before)

    def validate(self, num_layers: int) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f"unknown inner criterion {self.criterion!r}; choose one of: {', '.join(CRITERIA)}")
        if self.action not in ACTIONS:
            raise ConfigError(f"unknown inner action {self.action!r}; choose one of: {', '.join(ACTIONS)}")
        if not 0.0 <= self.ratio <= 1.0:  # 1: every visual token leaves (ToDRE, AIM's last layers)
            raise ConfigError(f"inner ratio must be in [0, 1], got {self.ratio}")
        if not 0.0 <= self.uniform <= 1.0:
            raise ConfigError(f"inner uniform share must be in [0, 1], got {self.uniform}")
        if not 1 <= self.layer <= num_layers - 1:
            raise ConfigError(f"inner layer must be in [1, {num_layers - 1}] for this {num_layers}-layer decoder, "
                              f"got {self.layer}")


def mode_step(mode: str, layer: int, ratio: float) -> InnerStep:
    """The one-step schedule a mode names."""
    criterion, action = {"holitom": ("last", "merge"), "fastv": ("last", "drop"),
                         "similarity": ("similarity", "merge")}[mode]
    return InnerStep(layer, ratio, criterion, action)


@dataclass
class MergePlan:
    keep: torch.Tensor  # [B, L'] long, sorted positions that survive layer K
    target: torch.Tensor  # [B, L] long, surviving position each merged token joins; -1 otherwise

    def extended(self, length: int) -> MergePlan:
        """The plan for a sequence that continues past the planned prompt: later tokens all survive."""
        b, planned = self.target.shape
        extra = torch.arange(planned, length, device=self.target.device).expand(b, -1)
        pad = self.target.new_full((b, length - planned), -1)
        return MergePlan(torch.cat([self.keep, extra], 1), torch.cat([self.target, pad], 1))


def removal_count(visual_mask: torch.Tensor, ratio: float) -> int:
    """Visual tokens each row loses: round(r·n_visual), the same for every row so lengths stay equal."""
    return _removal(visual_mask.sum(1).tolist(), ratio)


def _removal(visual_counts: list[int], ratio: float) -> int:
    """round(r·n) of the row with the fewest visual tokens (round is monotone: the smallest of the rows')."""
    return round(ratio * min(visual_counts))


def _true_positions(mask: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] long: the positions of each row's True entries in index order, padded with the positions of
    its False entries (callers mask the padding out with `mask.gather(1, positions)`). mask: [B, L] bool."""
    return torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]


def _rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, L, C] at positions [B, K]: [B, K, C] (advanced indexing copies whole rows: ~5× faster than
    gather with an index expanded over C, on CPU)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], positions]


def plan_by_attention(scores: torch.Tensor, visual_mask: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Positions to remove: the `n_remove` visual tokens with the lowest scores per row.

    scores: [B, L], visual_mask: [B, L] bool. Returns removed [B, L] bool.
    """
    masked = scores.float().masked_fill(~visual_mask, float("inf"))
    lowest = masked.topk(n_remove, dim=1, largest=False).indices
    return torch.zeros_like(visual_mask).scatter_(1, lowest, True)


def nearest_kept(hidden: torch.Tensor, removed: torch.Tensor, candidates: torch.Tensor,
                 widths: tuple[int, int] | None = None) -> torch.Tensor:
    """For each removed token, the most cosine-similar candidate (per row; the first on ties). Returns
    target [B, L]: that candidate's position for removed tokens, −1 elsewhere.

    hidden: [B, L, C]; removed, candidates: [B, L] bool. Only removed × candidate pairs are compared
    ([B, R, K] similarities rather than [B, L, L]); `widths` = (R, K), the most removed and candidate tokens
    in a row, when the caller knows them (else one host sync). A row without candidates points at position 0.
    """
    if widths is None:
        widths = tuple(torch.stack([removed.sum(1).max(), candidates.sum(1).max()]).tolist())
    n_removed, n_candidates = widths[0], max(1, widths[1])
    from_pos = _true_positions(removed, n_removed)  # [B, R]
    to_pos = _true_positions(candidates, n_candidates)  # [B, K]
    unit_from = F.normalize(_rows(hidden, from_pos).float(), dim=-1)
    unit_to = F.normalize(_rows(hidden, to_pos).float(), dim=-1)
    sim = unit_from @ unit_to.transpose(1, 2)  # [B, R, K]
    sim = sim.masked_fill(~candidates.gather(1, to_pos)[:, None, :], float("-inf"))
    nearest = to_pos.gather(1, sim.argmax(-1))  # [B, R] positions
    nearest = torch.where(removed.gather(1, from_pos), nearest, -1)  # padding writes −1, as elsewhere
    return torch.full_like(removed, -1, dtype=torch.long).scatter_(1, from_pos, nearest)


def _bipartite_rounds(visual_counts: list[int], n_remove: int) -> list[list[int]]:
    """Host bookkeeping of `bipartite_plan`: tokens each round merges in each row, min(left, |A|) while a row
    has some left to merge and two tokens alive."""
    alive, left, rounds = list(visual_counts), [n_remove] * len(visual_counts), []
    while True:
        take = [min(lf, (a + 1) // 2) if lf > 0 and a > 1 else 0 for a, lf in zip(alive, left, strict=True)]
        if not any(take):
            return rounds
        rounds.append(take)
        alive = [a - t for a, t in zip(alive, take, strict=True)]
        left = [lf - t for lf, t in zip(left, take, strict=True)]


def bipartite_plan(hidden: torch.Tensor, visual_mask: torch.Tensor, n_remove: int,
                   visual_counts: list[int] | None = None) -> torch.Tensor:
    """ToMe bipartite soft matching over visual tokens, repeated until `n_remove` are merged.

    Each round splits the surviving visual tokens alternately into A and B, links every A token to its
    most similar B token and merges the most similar links. Returns target [B, L] pointing at the final
    surviving token (chains from earlier rounds resolved).

    hidden: [B, L, C], visual_mask: [B, L] bool. All rows at once, in the space of each row's visual tokens
    ([B, V]); how many each round merges is host bookkeeping over `visual_counts` (the rows' visual token
    counts; one host sync when not given).
    """
    b, length, _ = hidden.shape
    counts = visual_mask.sum(1).tolist() if visual_counts is None else visual_counts
    rounds = _bipartite_rounds(counts, n_remove)
    target = torch.full((b, length), -1, dtype=torch.long, device=hidden.device)
    if not rounds:
        return target
    visual_pos = _true_positions(visual_mask, max(counts))  # [B, V]
    unit = F.normalize(_rows(hidden, visual_pos).float(), dim=-1)  # [B, V, C]
    alive = visual_mask.gather(1, visual_pos)  # [B, V]
    into = torch.full_like(visual_pos, -1)  # [B, V] visual index each merged token joins
    spare = visual_pos.shape[1]  # rows that take fewer than others write into a spare column V, cut off
    for take in rounds:  # counts: tokens alive in each row
        rank = alive.long().cumsum(1) - 1
        side_a, side_b = alive & (rank % 2 == 0), alive & (rank % 2 == 1)
        a_idx = _true_positions(side_a, max((n + 1) // 2 for n in counts))  # [B, |A|]
        b_idx = _true_positions(side_b, max(1, max(n // 2 for n in counts)))  # [B, |B|]
        sim = _rows(unit, a_idx) @ _rows(unit, b_idx).transpose(1, 2)  # [B, |A|, |B|]
        padded = len(set(counts)) > 1  # rows of fewer tokens pad A and B: mask the padding out
        if padded:
            sim = sim.masked_fill(~side_b.gather(1, b_idx)[:, None, :], float("-inf"))
        best_sim, best = sim.max(-1)  # [B, |A|]
        if padded:
            best_sim = best_sim.masked_fill(~side_a.gather(1, a_idx), float("-inf"))
        order = best_sim.topk(max(take), dim=1).indices  # most similar links first
        taken = torch.arange(max(take), device=hidden.device) < torch.tensor(take, device=hidden.device)[:, None]
        merged_a = torch.where(taken, a_idx.gather(1, order), spare)  # [B, max take]
        joins = b_idx.gather(1, best.gather(1, order))
        into = torch.cat([into, into.new_full((b, 1), -1)], 1).scatter_(1, merged_a, joins)[:, :spare]
        alive = torch.cat([alive, alive.new_zeros(b, 1)], 1).scatter_(1, merged_a, False)[:, :spare]
        counts = [n - t for n, t in zip(counts, take, strict=True)]
    # resolve chains a → b → c so every merged token points at a survivor (a chain has at most one link a round)
    for _ in range(len(rounds) - 1):
        nxt = torch.where(into >= 0, into.gather(1, into.clamp(min=0)), -1)
        into = torch.where((into >= 0) & (nxt >= 0), nxt, into)
    joins = torch.where(into >= 0, visual_pos.gather(1, into.clamp(min=0)), -1)
    return target.scatter_(1, visual_pos, joins)


def make_plan(mode: str, hidden: torch.Tensor, visual_mask: torch.Tensor, ratio: float,
              scores: torch.Tensor | None = None) -> MergePlan:
    """Decide which tokens survive layer K. hidden: [B, L, C] (the input of layer K)."""
    if mode not in (*MODES, "none"):
        raise ConfigError(f"unknown inner mode {mode!r}; choose one of: {', '.join(MODES)}, none")
    if mode == "none":
        return _keep_all(visual_mask)
    return step_plan(mode_step(mode, 0, ratio), hidden, visual_mask, scores)


def _keep_all(visual_mask: torch.Tensor) -> MergePlan:
    b, length = visual_mask.shape
    keep = torch.arange(length, device=visual_mask.device).expand(b, -1)
    return MergePlan(keep, torch.full((b, length), -1, dtype=torch.long, device=visual_mask.device))


def uniform_picks(visual_mask: torch.Tensor, count: int, visual_counts: list[int] | None = None) -> torch.Tensor:
    """[B, L] bool: `count` visual tokens per row at an even stride over the row's visual positions.

    The stride is host bookkeeping over the rows' visual token counts (`visual_counts`; one host sync when not
    given): which ranks among a row's visual tokens are picked, copied over once.
    """
    counts = visual_mask.sum(1).tolist() if visual_counts is None else visual_counts
    if count <= 0 or max(counts, default=0) == 0:
        return torch.zeros_like(visual_mask)
    picked_rank = torch.zeros(len(counts), max(counts), dtype=torch.bool, device="cpu")  # [B, V] host table
    for row, n in enumerate(counts):
        if n:
            picked_rank[row, torch.linspace(0, n - 1, min(count, n), device="cpu").round().long()] = True
    rank = visual_mask.long().cumsum(1) - 1  # [B, L] rank of each visual token within its row
    return visual_mask & picked_rank.to(visual_mask.device).gather(1, rank.clamp(min=0))


def step_plan(step: InnerStep, hidden: torch.Tensor, visual_mask: torch.Tensor,
              scores: torch.Tensor | None = None) -> MergePlan:
    """Decide which tokens survive `step`. hidden: [B, L, C] (the input of its layer); scores: [B, L]
    (higher = keep) for every criterion but `similarity`. One host sync (the rows' visual token counts, from
    which every budget follows)."""
    counts = visual_mask.sum(1).tolist()
    n_remove = _removal(counts, step.ratio)
    if n_remove == 0:
        return _keep_all(visual_mask)
    if step.criterion == "similarity":
        target = bipartite_plan(hidden, visual_mask, n_remove, counts)
        removed = target >= 0
        # a row of fewer than two visual tokens merges fewer; rows of unequal lengths cannot be batched
        n_removed = {sum(t) for t in zip(*_bipartite_rounds(counts, n_remove), strict=True)}
        if len(n_removed) > 1:
            raise ValueError(f"similarity merging removes {sorted(n_removed)} tokens in different rows")
        n_remove = n_removed.pop()
    else:
        if scores is None:
            raise ValueError(f"criterion {step.criterion!r} needs scores")
        survivors = counts[0] - n_remove
        # the uniform picks survive whatever their score (FEATHER's coverage of the whole frame)
        picked = uniform_picks(visual_mask, round(step.uniform * survivors), counts)
        scores = scores.float().masked_fill(picked, float("inf"))
        removed = plan_by_attention(scores, visual_mask, n_remove)
        if step.action == "merge":
            widths = (n_remove, max(counts) - n_remove)
            target = nearest_kept(hidden, removed, visual_mask & ~removed, widths)
        else:
            target = torch.full(removed.shape, -1, dtype=torch.long, device=removed.device)
    keep = _true_positions(~removed, visual_mask.shape[1] - n_remove)  # sorted per row, no host sync
    return MergePlan(keep, target)


def merge_weights(plan: MergePlan, sizes: torch.Tensor, merge: str = "mean") -> torch.Tensor:
    """Weight of every token in the value of the surviving token it ends up in. Returns [B, L] float32.

    `mean`: size / total size of the group. `pairwise`: HoliTom's running average in index order —
    with members j1 < … < jm merged into t, t keeps 2^-m and member jk gets 2^-(m-k+1).
    Dropped tokens get weight 0; untouched survivors 1.
    """
    if merge not in MERGES:
        raise ConfigError(f"unknown merge {merge!r}; choose one of: {', '.join(MERGES)}")
    b, length = plan.target.shape
    position = torch.arange(length, device=plan.target.device).expand(b, -1)
    merged = plan.target >= 0
    group = torch.where(merged, plan.target, position)
    survives = _survivors(plan, length)
    in_group = merged | survives
    if merge == "mean":
        sizes = sizes.float() * in_group
        totals = torch.zeros(b, length, device=sizes.device).scatter_add_(1, group, sizes)
        return sizes / totals.gather(1, group).clamp(min=1e-12)
    # pairwise: rank of each member within its group (index order) from one sort by (target, index),
    # non-members last; and group member counts
    count = torch.zeros(b, length, device=plan.target.device).scatter_add_(1, group, merged.float())
    order = (torch.where(merged, plan.target, length) * length + position).argsort(dim=1)  # unique keys
    sorted_group = torch.where(merged, plan.target, length).gather(1, order)
    first = torch.searchsorted(sorted_group, sorted_group)  # slot where each one's group starts
    rank = torch.empty_like(order).scatter_(1, order, position - first + 1)  # 1-based among its target's members
    m = count.gather(1, plan.target.clamp(min=0))
    weights = torch.where(merged, torch.pow(2.0, -(m - rank + 1)), in_group.float())
    # the surviving token of each group with members keeps 2^-m
    return torch.where((count > 0) & survives, torch.pow(2.0, -count), weights)


def apply_plan(hidden: torch.Tensor, plan: MergePlan, sizes: torch.Tensor,
               merge: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge and gather: returns hidden [B, L', C] (hidden's dtype; sums accumulated in float32) and sizes
    [B, L'] (sizes' dtype) of the survivors. hidden: [B, L, C], sizes: [B, L]."""
    b, length, c = hidden.shape
    kept = plan.keep.shape[1]
    weights = merge_weights(plan, sizes, merge)
    group = torch.where(plan.target >= 0, plan.target, torch.arange(length, device=hidden.device).expand(b, -1))
    # each token's slot among the survivors; dropped tokens go to a spare slot L' that is cut off
    slot_of = torch.full((b, length), kept, dtype=torch.long, device=hidden.device)
    slot_of.scatter_(1, plan.keep, torch.arange(kept, device=hidden.device).expand(b, -1))
    slot = slot_of.gather(1, group)  # [B, L]
    weighted = hidden.float() * weights[..., None]
    merged = weighted.new_zeros(b, kept + 1, c).scatter_add_(1, slot[..., None].expand(-1, -1, c), weighted)
    in_group = (plan.target >= 0) | _survivors(plan, length)
    grouped_sizes = sizes.new_zeros(b, kept + 1).scatter_add_(1, slot, torch.where(in_group, sizes, 0))
    return merged[:, :kept].to(hidden.dtype), grouped_sizes[:, :kept]


def _survivors(plan: MergePlan, length: int) -> torch.Tensor:
    """[B, L] bool: positions in plan.keep."""
    b = plan.target.shape[0]
    return torch.zeros(b, length, dtype=torch.bool, device=plan.keep.device).scatter_(1, plan.keep, True)
