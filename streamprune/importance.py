"""`ImportanceState`: a temporally smoothed importance per token position, shared by the streaming engine
(attention of the questions asked so far) and VLA policies (action-decode attention of recent control
steps, VLA-Pruner).

Two smoothing modes over the per-step scores S_t [N]:
- `window` (VLA-Pruner): a decaying average of the last `window` steps, Σ_i γ^i·S_{t−i} / Σ_i γ^i for
  i = 0..window−1, so the **newest step weighs most** (γ⁰ = 1). The paper's intent ("recent steps matter
  more", γ = 0.8, w = 3) is followed; the released OpenVLA code applies the weights in the reverse order
  (newest gets γ²), which we read as a bug.
- `ema`: s ← (1 − γ)·S_t + γ·s, an exponential moving average with the same decay γ.

`ready` is False until `window` steps were recorded: VLA-Pruner runs unpruned for the first W steps of
an episode, and a stream has no question-driven importance before the first question.

Partly observed steps (a pruned token receives no attention): `update(scores, observed)` fills the
unobserved positions from the previous step (`carry_over`), so a dropped token keeps its last score and
can win its slot back instead of being frozen out with a zero.

Devices: the state lives where the scores do (the first update's device and fp32); no method reads a value back
to the host, so a policy may update it inside its forward without a sync.
"""

from __future__ import annotations

from collections import deque

import torch

from streamprune.errors import ConfigError


def carry_over(scores: torch.Tensor, observed: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Fill unobserved positions from `previous`. scores, observed (bool), previous: [..., N] → [..., N].

    Observed scores are rescaled to the previous mass of the same positions (per row of the last dim):
    attention spread over fewer keys is larger per key, so this keeps observed and carried-over values
    comparable. Without `previous`, unobserved positions are 0.
    """
    scores = torch.where(observed, scores, torch.zeros_like(scores))  # unobserved may hold NaN or junk
    if previous is None:
        return scores
    previous_mass = (previous * observed).sum(-1, keepdim=True)
    mass = (scores * observed).sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    carried = torch.where(observed, scores * previous_mass / mass, previous)
    # a fully observed step is taken as it is (chosen on the device: no host sync)
    return torch.where(observed.all(), scores, carried)


class ImportanceState:
    """Smoothed importance over `num_positions` token positions (see the module docstring).

    device: where `top` puts its (empty) answer before the first update; afterwards everything follows the
    scores' device.
    """

    def __init__(self, num_positions: int, mode: str = "window", window: int = 3, decay: float = 0.8,
                 device: torch.device | str = "cpu") -> None:
        if mode not in ("window", "ema"):
            raise ConfigError(f"unknown importance mode {mode!r}; choose window or ema")
        if window < 1:
            raise ConfigError(f"importance window must be at least 1, got {window}")
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"importance decay must be in [0, 1], got {decay}")
        self.num_positions = num_positions
        self.mode = mode
        self.window = window
        self.decay = decay
        self.device = torch.device(device)
        self._weights: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Forget everything (new episode, new stream, or on demand)."""
        self._history: deque[torch.Tensor] = deque(maxlen=self.window)
        self._ema: torch.Tensor | None = None
        self.steps = 0

    def update(self, scores: torch.Tensor, observed: torch.Tensor | None = None) -> None:
        """Record one step's importance per position (e.g. attention received). scores: [..., N], the same
        leading shape at every step (e.g. [B, N]: one history per batch row); observed: bool like scores,
        False where a position was not seen this step (filled by `carry_over` from the previous step)."""
        scores = scores.detach().float()
        self.device = scores.device
        if scores.shape[-1] != self.num_positions:
            raise ValueError(f"expected {self.num_positions} scores, got {scores.shape[-1]}")
        if self._history and scores.shape != self._history[-1].shape:
            raise ValueError(f"scores of shape {tuple(scores.shape)} after {tuple(self._history[-1].shape)}: reset first")
        if observed is not None:
            scores = carry_over(scores, observed.to(scores.device), self.latest())
        self._history.append(scores)
        self._ema = scores.clone() if self._ema is None else (1 - self.decay) * scores + self.decay * self._ema
        self.steps += 1

    @property
    def ready(self) -> bool:
        """At least `window` steps recorded: the smoothed state may drive pruning."""
        return self.steps >= self.window

    def latest(self) -> torch.Tensor | None:
        """The newest recorded step (after carry-over), or None before the first update."""
        return self._history[-1] if self._history else None

    def weights(self) -> torch.Tensor:
        """Window weights for the recorded steps, oldest first: [γ^(k−1), …, γ, 1] / sum."""
        k = len(self._history)
        key = (k, self.device)
        if key not in self._weights:  # made once per length and device: no host-to-device copy per step
            w = torch.tensor([self.decay ** (k - 1 - i) for i in range(k)], device=self.device)
            self._weights[key] = w / w.sum()
        return self._weights[key]

    def value(self) -> torch.Tensor | None:
        """Smoothed importance [..., N] (the shape of the scores), or None before the first update."""
        if self.steps == 0:
            return None
        if self.mode == "ema":
            return self._ema.clone()
        history = torch.stack(list(self._history))  # [steps, ..., N]
        return (self.weights().view(-1, *[1] * (history.dim() - 1)) * history).sum(0)

    def top(self, k: int) -> torch.Tensor:
        """Positions of the k most important tokens (empty before the first update)."""
        value = self.value()
        if value is None or k <= 0:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return value.topk(min(k, self.num_positions)).indices
