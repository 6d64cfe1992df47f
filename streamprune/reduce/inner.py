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
        extra = torch.arange(planned, length).expand(b, -1)
        pad = torch.full((b, length - planned), -1, dtype=torch.long)
        return MergePlan(torch.cat([self.keep, extra], 1), torch.cat([self.target, pad], 1))


def removal_count(visual_mask: torch.Tensor, ratio: float) -> int:
    """Visual tokens each row loses: round(r·n_visual), the same for every row so lengths stay equal."""
    return int(min(round(ratio * int(n)) for n in visual_mask.sum(1)))


def plan_by_attention(scores: torch.Tensor, visual_mask: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Positions to remove: the `n_remove` visual tokens with the lowest scores per row.

    scores: [B, L], visual_mask: [B, L] bool. Returns removed [B, L] bool.
    """
    masked = scores.float().masked_fill(~visual_mask, float("inf"))
    lowest = masked.topk(n_remove, dim=1, largest=False).indices
    return torch.zeros_like(visual_mask).scatter_(1, lowest, True)


def nearest_kept(hidden: torch.Tensor, removed: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """For each removed token, the most cosine-similar candidate (per row). Returns target [B, L]."""
    unit = F.normalize(hidden.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # [B, L, L]
    sim = sim.masked_fill(~candidates[:, None, :], float("-inf"))
    target = sim.argmax(-1)
    return torch.where(removed, target, torch.full_like(target, -1))


def bipartite_plan(hidden: torch.Tensor, visual_mask: torch.Tensor, n_remove: int) -> torch.Tensor:
    """ToMe bipartite soft matching over visual tokens, repeated until `n_remove` are merged.

    Each round splits the surviving visual tokens alternately into A and B, links every A token to its
    most similar B token and merges the most similar links. Returns target [B, L] pointing at the final
    surviving token (chains from earlier rounds resolved).
    """
    b, length, _ = hidden.shape
    unit = F.normalize(hidden.float(), dim=-1)
    target = torch.full((b, length), -1, dtype=torch.long)
    for row in range(b):
        alive = visual_mask[row].nonzero().squeeze(1)
        left = n_remove
        while left > 0 and len(alive) > 1:
            a, bb = alive[0::2], alive[1::2]
            sim = unit[row, a] @ unit[row, bb].T  # [|A|, |B|]
            best_sim, best = sim.max(-1)
            take = best_sim.topk(min(left, len(a))).indices
            target[row, a[take]] = bb[best[take]]
            gone = torch.zeros(length, dtype=torch.bool)
            gone[a[take]] = True
            alive = alive[~gone[alive]]
            left -= len(take)
        # resolve chains a → b → c so every merged token points at a survivor
        for _ in range(length):
            nxt = torch.where(target[row] >= 0, target[row, target[row].clamp(min=0)], -1)
            chained = (target[row] >= 0) & (nxt >= 0)
            if not chained.any():
                break
            target[row] = torch.where(chained, nxt, target[row])
    return target


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
    return MergePlan(torch.arange(length).expand(b, -1), torch.full((b, length), -1, dtype=torch.long))


def uniform_picks(visual_mask: torch.Tensor, count: int) -> torch.Tensor:
    """[B, L] bool: `count` visual tokens per row at an even stride over the row's visual positions."""
    picks = torch.zeros_like(visual_mask)
    for row in range(visual_mask.shape[0]):
        where = visual_mask[row].nonzero().squeeze(1)
        if count > 0 and len(where):
            picks[row, where[torch.linspace(0, len(where) - 1, min(count, len(where))).round().long()]] = True
    return picks


def step_plan(step: InnerStep, hidden: torch.Tensor, visual_mask: torch.Tensor,
              scores: torch.Tensor | None = None) -> MergePlan:
    """Decide which tokens survive `step`. hidden: [B, L, C] (the input of its layer); scores: [B, L]
    (higher = keep) for every criterion but `similarity`."""
    n_remove = removal_count(visual_mask, step.ratio)
    if n_remove == 0:
        return _keep_all(visual_mask)
    if step.criterion == "similarity":
        target = bipartite_plan(hidden, visual_mask, n_remove)
        removed = target >= 0
    else:
        if scores is None:
            raise ValueError(f"criterion {step.criterion!r} needs scores")
        survivors = int(visual_mask[0].sum()) - n_remove
        # the uniform picks survive whatever their score (FEATHER's coverage of the whole frame)
        picked = uniform_picks(visual_mask, round(step.uniform * survivors))
        scores = scores.float().masked_fill(picked, float("inf"))
        removed = plan_by_attention(scores, visual_mask, n_remove)
        if step.action == "merge":
            target = nearest_kept(hidden, removed, visual_mask & ~removed)
        else:
            target = torch.full(removed.shape, -1, dtype=torch.long)
    keep = (~removed).nonzero()[:, 1].view(visual_mask.shape[0], -1)  # row-major nonzero: sorted per row
    return MergePlan(keep, target)


def merge_weights(plan: MergePlan, sizes: torch.Tensor, merge: str = "mean") -> torch.Tensor:
    """Weight of every token in the value of the surviving token it ends up in. Returns [B, L].

    `mean`: size / total size of the group. `pairwise`: HoliTom's running average in index order —
    with members j1 < … < jm merged into t, t keeps 2^-m and member jk gets 2^-(m-k+1).
    Dropped tokens get weight 0; untouched survivors 1.
    """
    if merge not in MERGES:
        raise ConfigError(f"unknown merge {merge!r}; choose one of: {', '.join(MERGES)}")
    b, length = plan.target.shape
    merged = plan.target >= 0
    group = torch.where(merged, plan.target, torch.arange(length).expand(b, -1))
    survives = torch.zeros(b, length, dtype=torch.bool).scatter_(1, plan.keep, True)
    in_group = merged | survives
    if merge == "mean":
        sizes = sizes.float() * in_group
        totals = torch.zeros(b, length).scatter_add_(1, group, sizes)
        return sizes / totals.gather(1, group).clamp(min=1e-12)
    # pairwise: rank of each member within its group (index order), and group member counts
    weights = in_group.float()
    count = torch.zeros(b, length).scatter_add_(1, group, merged.float())
    for row in range(b):
        members = merged[row].nonzero().squeeze(1)  # ascending index order
        tg = plan.target[row, members]
        order = torch.argsort(tg, stable=True)
        tg_sorted = tg[order]
        starts = torch.searchsorted(tg_sorted, tg_sorted, right=False)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order)) - starts + 1  # 1-based position among its target's members
        m = count[row, tg]
        weights[row, members] = torch.pow(2.0, -(m - rank + 1))
        # the surviving token of each group with members keeps 2^-m
    has = count > 0
    weights = torch.where(has & survives, torch.pow(2.0, -count), weights)
    return weights


def apply_plan(hidden: torch.Tensor, plan: MergePlan, sizes: torch.Tensor,
               merge: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge and gather: returns hidden [B, L', C] and sizes [B, L'] of the survivors."""
    b, length, c = hidden.shape
    weights = merge_weights(plan, sizes, merge).to(hidden.dtype)
    group = torch.where(plan.target >= 0, plan.target, torch.arange(length).expand(b, -1))
    merged = torch.zeros_like(hidden).scatter_add_(1, group[..., None].expand(-1, -1, c), hidden * weights[..., None])
    grouped_sizes = torch.zeros(b, length, dtype=sizes.dtype).scatter_add_(
        1, group, torch.where((plan.target >= 0) | _survivors(plan, length), sizes, torch.zeros_like(sizes)))
    keep = plan.keep
    return merged.gather(1, keep[..., None].expand(-1, -1, c)), grouped_sizes.gather(1, keep)


def _survivors(plan: MergePlan, length: int) -> torch.Tensor:
    return torch.zeros(plan.target.shape[0], length, dtype=torch.bool).scatter_(1, plan.keep, True)
