"""The one form every inside-the-encoder reduction step takes: a token transform, plus its bookkeeping.

Shapes: B frames, L tokens entering the step, L' = L − r leaving it, C width, P patches computed.

A step maps L tokens to L' (Token Transforming's view, which covers pruning, merging and mixing):
- `kept` [B, L']: the input token each output continues (its grid position carries over).
- `dest` [B, L]: the output token that accounts for each input token. Sizes move along `dest`, so sizes
  always sum to the patches they stand for, and unmerging copies an output back to every patch it
  accounts for. A pruned token is accounted for by a survivor (its value is gone).
- values: with `weights` None, each output is the size-weighted mean of the inputs sent to it whose
  `contributes` is True (ToMe's merge_wavg; a pruned token has contributes False). With `weights`
  [B, L', L] (many-to-many) each output is Σ_l w[j, l]·size[l]·x[l] / Σ_l w[j, l]·size[l], or Σ_l w[j, l]·x[l]
  when `normalize` is False (GTP's propagation adds to the kept token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenTransform:
    dest: torch.Tensor  # [B, L] long in 0..L'-1
    kept: torch.Tensor  # [B, L'] long in 0..L-1
    contributes: torch.Tensor | None = None  # [B, L] bool; None = every token contributes
    weights: torch.Tensor | None = None  # [B, L', L] many-to-many value weights
    normalize: bool = True

    @property
    def num_out(self) -> int:
        return self.kept.shape[1]


@dataclass
class TokenState:
    """Tokens of a batch of frames inside the encoder.

    x:        [B, L, C] hidden states.
    size:     [B, L] float32, patches each token stands for (sums to the computed patches per frame).
    owner:    [B, P] long, the token accounting for each computed patch.
    position: [B, L] long, the grid position (0..N-1) of the patch each token continues.
    """

    x: torch.Tensor
    size: torch.Tensor
    owner: torch.Tensor
    position: torch.Tensor

    @classmethod
    def start(cls, x: torch.Tensor, positions: torch.Tensor | None = None) -> TokenState:
        """One token per patch: x [B, P, C] of the patches at grid `positions` [P] (default 0..P-1).

        Sizes are float32 whatever x's dtype: they count patches, which bf16 cannot (257 is not a bf16)."""
        b, p, _ = x.shape
        index = torch.arange(p, device=x.device)
        positions = index if positions is None else positions
        return cls(x, torch.ones(b, p, dtype=torch.float32, device=x.device), index.expand(b, p).clone(),
                   positions.expand(b, p).clone())

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]


def route(removed: torch.Tensor, target: torch.Tensor, num_removed: int) -> TokenTransform:
    """The transform "survivors keep their order; removed token i goes where `target[i]` goes".

    removed: [B, L] bool, `num_removed` True per row; target: [B, L] long, a surviving input index (read only
    where removed). No host sync: the count per row is given, not read back.
    """
    b, length = removed.shape
    num_out = length - num_removed
    new_index = torch.where(removed, -1, (~removed).long().cumsum(1) - 1)
    dest = torch.where(removed, new_index.gather(1, target.clamp(min=0)), new_index)
    # kept[j] = the input whose new index is j; removed inputs go to a spare last column, dropped after
    slot = torch.where(removed, num_out, new_index)
    inputs = torch.arange(length, device=removed.device).expand(b, length)
    kept = inputs.new_zeros(b, num_out + 1).scatter_(1, slot, inputs)[:, :num_out]
    return TokenTransform(dest=dest, kept=kept)


def apply_transform(state: TokenState, step: TokenTransform) -> TokenState:
    """Run one reduction step on the tokens and their bookkeeping.

    Values are averaged in float32 (weights and sizes are float32) and come out in x's dtype."""
    x, size = state.x, state.size
    b, length, c = x.shape
    size_out = size.new_zeros(b, step.num_out).scatter_add_(1, step.dest, size)
    x32 = x.float()
    if step.weights is not None and not step.normalize:
        x_out = step.weights.float() @ x32
    elif step.weights is not None:
        mass = step.weights.float() * size[:, None, :]  # [B, L', L]
        x_out = (mass @ x32) / mass.sum(-1, keepdim=True).clamp_min(1e-12)
    else:
        mass = size if step.contributes is None else size * step.contributes
        index = step.dest[..., None].expand(-1, -1, c)
        x_out = x32.new_zeros(b, step.num_out, c).scatter_add_(1, index, x32 * mass[..., None])
        total = mass.new_zeros(b, step.num_out).scatter_add_(1, step.dest, mass)
        x_out = x_out / total[..., None].clamp_min(1e-12)
    return TokenState(x_out.to(x.dtype), size_out, step.dest.gather(1, state.owner),
                      state.position.gather(1, step.kept))


SCHEDULES = ("constant", "decreasing")


def merge_schedule(num_tokens: int, num_layers: int, ratio: float, shape: str = "constant",
                   start_layer: int = 0) -> list[int]:
    """Tokens removed in each layer so that round(ratio·num_tokens) are gone after the last one.

    ToMe's schedules: `constant` (the same r in every layer from `start_layer`) or `decreasing` (r falling
    linearly to the last layer: fewer tokens early, where they cost every later layer — ToMe's
    `(r, inflect=-1)`). Each r is capped at half of the tokens its layer sees — bipartite matching cannot
    remove more — and a layer takes more when the later ones could not remove the rest.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if shape not in SCHEDULES:
        raise ValueError(f"unknown schedule {shape!r}; choose one of {', '.join(SCHEDULES)}")
    layers = max(num_layers - start_layer, 0)
    total = round(ratio * num_tokens)
    schedule = [0] * num_layers
    if layers == 0 or total == 0:
        return schedule
    weights = [1.0] * layers if shape == "constant" else [float(layers - i) for i in range(layers)]
    target, cumulative = [], 0.0
    for w in weights:  # where the cumulative removal should stand after each layer
        cumulative += total * w / sum(weights)
        target.append(cumulative)
    removed, tokens = 0, num_tokens
    for i, layer in enumerate(range(start_layer, num_layers)):
        later = layers - i - 1
        want = max(0, -(-round(target[i] * 1e6) // 1_000_000) - removed)  # ceil, robust to float noise
        while want < tokens // 2 and total - removed - want > _removable(tokens - want, later):
            want += 1
        r = min(want, tokens // 2, total - removed)
        schedule[layer] = r
        removed += r
        tokens -= r
    return schedule


def _removable(tokens: int, layers: int) -> int:
    """Most tokens `layers` bipartite merges can remove from `tokens` (each at most half)."""
    removed = 0
    for _ in range(layers):
        removed += tokens // 2
        tokens -= tokens // 2
    return removed


def unmerge(values: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Copy each token back to the patches it accounts for: values [B, L, C], owner [B, P] → [B, P, C]."""
    return values.gather(1, owner[..., None].expand(-1, -1, values.shape[-1]))
