"""Checks every video-LLM adapter's tests share: cached generation against a no-cache recomputation."""

from __future__ import annotations

import torch


class Scores:
    """Logits processor that records each step's scores (greedy generate's logits)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


def nocache_greedy(adapter, inputs, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by full uncached forwards over prompt + answer so far: (ids [1, steps], logits
    [1, steps, V])."""
    answer = torch.empty(1, 0, dtype=torch.long, device=inputs.inputs_embeds.device)
    logits = []
    for _ in range(steps):
        last = adapter.forward(inputs, answer if answer.shape[1] else None).logits[:, -1].float()
        logits.append(last)
        answer = torch.cat([answer, last.argmax(-1, keepdim=True)], 1)
    return answer, torch.stack(logits, 1)


def assert_cached_equals_nocache(adapter, inputs, inner=None, steps: int = 6, atol: float = 5e-4):
    """`generate` (KV cache; the inner stage when `inner` is given) equals greedy full recomputation: the
    same tokens, and logits within fp32 rounding of the two shapes (a wrong mask, position or merge is
    ≫ 1e-2; see tests/test_inner.py). Returns the inner stage, or None."""
    scores = Scores()
    with adapter.inner_stage(inputs, inner) as stage:
        cached = adapter.generate(inputs, steps, logits_processor=[scores])
        if stage is not None:
            stage.freeze = True  # replay the prefill's merge plan on every full-sequence forward
        ids, logits = nocache_greedy(adapter, inputs, steps)
    assert cached.tolist() == ids.tolist()
    assert torch.allclose(torch.stack(scores.steps, 1).float(), logits, atol=atol, rtol=1e-4), \
        (torch.stack(scores.steps, 1) - logits).abs().max()
    return stage
