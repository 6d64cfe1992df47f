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
"""

from __future__ import annotations

from collections import deque

import torch

from streamprune.errors import ConfigError


class ImportanceState:
    def __init__(self, num_positions: int, mode: str = "window", window: int = 3, decay: float = 0.8) -> None:
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
        self.reset()

    def reset(self) -> None:
        """Forget everything (new episode, new stream, or on demand)."""
        self._history: deque[torch.Tensor] = deque(maxlen=self.window)
        self._ema: torch.Tensor | None = None
        self.steps = 0

    def update(self, scores: torch.Tensor) -> None:
        """Record one step's importance per position, scores [N] (e.g. attention received)."""
        scores = scores.detach().float().reshape(-1)
        if scores.shape[0] != self.num_positions:
            raise ValueError(f"expected {self.num_positions} scores, got {scores.shape[0]}")
        self._history.append(scores)
        self._ema = scores.clone() if self._ema is None else (1 - self.decay) * scores + self.decay * self._ema
        self.steps += 1

    @property
    def ready(self) -> bool:
        """At least `window` steps recorded: the smoothed state may drive pruning."""
        return self.steps >= self.window

    def weights(self) -> torch.Tensor:
        """Window weights for the recorded steps, oldest first: [γ^(k−1), …, γ, 1] / sum."""
        k = len(self._history)
        w = torch.tensor([self.decay ** (k - 1 - i) for i in range(k)])
        return w / w.sum()

    def value(self) -> torch.Tensor | None:
        """Smoothed importance [N], or None before the first update."""
        if self.steps == 0:
            return None
        if self.mode == "ema":
            return self._ema.clone()
        return (self.weights()[:, None] * torch.stack(list(self._history))).sum(0)

    def top(self, k: int) -> torch.Tensor:
        """Positions of the k most important tokens (empty before the first update)."""
        value = self.value()
        if value is None or k <= 0:
            return torch.empty(0, dtype=torch.long)
        return value.topk(min(k, self.num_positions)).indices
