"""Fidelity of a reduced model against the unreduced one on the same inputs — proxy metrics, not accuracy.

With no trained weights to score benchmarks, we measure how far reduction moves the model's output:
- `kl_first_token`: KL(p_unreduced ‖ p_reduced) of the first answer token's distribution (nats);
- `kl_mean`: the same, averaged over the first `steps` answer positions, teacher-forced on the
  unreduced model's greedy answer;
- `teacher_forced_agreement`: fraction of those positions where both models' top-1 tokens agree;
- `greedy_agreement`: fraction of the first `steps` tokens that match when each model generates freely;
- `hidden_cosine`: cosine of the last prompt token's final hidden state;
- `vision_feature_cosine`: with encoder-side reduction, the mean cosine of the visual tokens (after the
  projector and pooling) against a full encode of the same frames (1.0 without).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from streamprune.models.base import EncodedVideo, LLMInputs, PromptInputs, VideoLLMAdapter
from streamprune.models.inner_stage import InnerConfig
from streamprune.reduce import reduce_tokens
from streamprune.tokens import VisualTokens


@dataclass
class Fidelity:
    kl_first_token: float
    kl_mean: float
    teacher_forced_agreement: float
    greedy_agreement: float
    hidden_cosine: float
    steps: int
    llm_input_tokens: int
    llm_input_tokens_unreduced: int
    inner_installed: bool  # whether the inner stage (merging and/or proportional attention) ran
    vision_feature_cosine: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def teacher_forced(adapter: VideoLLMAdapter, inputs: LLMInputs, answer: torch.Tensor,
                   inner: InnerConfig | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward over prompt + answer[:-1]. Returns log-probs [steps, V] at the answer positions
    and the last prompt token's final hidden state [C]."""
    steps = answer.shape[1]
    with adapter.inner_stage(inputs, inner):
        out = adapter.forward(inputs, answer[:, :-1], output_hidden_states=True)
    logits = out.logits[0, -steps:]
    return F.log_softmax(logits.float(), -1), out.hidden_states[-1][0, -steps]


@dataclass
class Reference:
    """The unreduced model's side of a comparison, computed once per video and prompt."""

    inputs: LLMInputs
    answer: torch.Tensor  # [1, steps] its greedy answer
    logp: torch.Tensor  # [steps, V] log-probs along that answer
    hidden: torch.Tensor  # [C] last prompt token's final hidden state


@torch.no_grad()
def reference(adapter: VideoLLMAdapter, full: LLMInputs, steps: int) -> Reference:
    answer = adapter.generate(full, steps)
    logp, hidden = teacher_forced(adapter, full, answer, None)
    return Reference(full, answer, logp, hidden)


@torch.no_grad()
def against(adapter: VideoLLMAdapter, ref: Reference, reduced: LLMInputs, inner: InnerConfig | None,
            steps: int) -> dict:
    """The proxies of `reduced` (with `inner` installed) against the reference: KL, agreements, cosine."""
    red_logp, red_hidden = teacher_forced(adapter, reduced, ref.answer, inner)
    kl = (ref.logp.exp() * (ref.logp - red_logp)).sum(-1)  # [steps]
    with adapter.inner_stage(reduced, inner):
        free = adapter.generate(reduced, steps)
    n = min(free.shape[1], ref.answer.shape[1])
    return {"kl_first_token": float(kl[0]), "kl_mean": float(kl.mean()),
            "teacher_forced_agreement": float((red_logp.argmax(-1) == ref.answer[0]).float().mean()),
            "greedy_agreement": float((free[0, :n] == ref.answer[0, :n]).float().sum() / steps),
            "hidden_cosine": float(F.cosine_similarity(ref.hidden, red_hidden, dim=0))}


@torch.no_grad()
def compare(adapter: VideoLLMAdapter, prompt: PromptInputs, encoded: EncodedVideo, method: str,
            retain: float, inner: InnerConfig | None = None, steps: int = 32, reference_encode: EncodedVideo | None = None,
            **reduce_options) -> Fidelity:
    """Reduced (`method` at `retain` before the LLM, plus the cuts of `inner` inside) vs unreduced on the
    same video/prompt.

    `reference_encode`: the full encode when `encoded` came from encoder-side reduction (else `encoded` is both)."""
    full_encode = reference_encode or encoded
    full = adapter.reduced_inputs(prompt, VisualTokens.unreduced(full_encode.features, full_encode.grid_hw), full_encode)
    tokens = reduce_tokens(method, encoded.features, encoded.attention, encoded.grid_hw, retain, **reduce_options)
    reduced = adapter.reduced_inputs(prompt, tokens, encoded)
    metrics = against(adapter, reference(adapter, full, steps), reduced, inner, steps)
    return Fidelity(
        **metrics,
        steps=steps,
        llm_input_tokens=int(reduced.visual_mask.sum()),
        llm_input_tokens_unreduced=int(full.visual_mask.sum()),
        inner_installed=adapter.needs_stage(reduced, inner),
        vision_feature_cosine=float(F.cosine_similarity(encoded.features.float(), full_encode.features.float(), -1).mean()),
    )


def run_fidelity(opts, steps: int = 32, progress=None) -> dict:
    """`streamprune fidelity`: one video, one reduction config (a `SummarizeOptions`), against unreduced."""
    from streamprune.summarize import encode_video, inner_summary, reduction_options

    run = encode_video(opts, progress)
    options = reduction_options(opts, run.loaded.adapter)
    reference = None
    if opts.encoder.active:  # the unreduced side sees the model's own tower
        reference = run.loaded.adapter.encode(run.prompt,
                                              progress=progress and (lambda d, t: progress("full encode", d, t)))
    result = compare(run.loaded.adapter, run.prompt, run.encoded, opts.method, opts.retain, run.inner,
                     steps=steps, reference_encode=reference, **options)
    return {"video": str(run.clip.path), "model": run.loaded.name, "random_weights": run.loaded.random_weights,
            "method": opts.method, "retain": opts.retain, "tau": options.get("tau"),
            "inner": inner_summary(run.inner, run.inner_layer, result.inner_installed),
            "encoder": {**opts.encoder.summary(), **run.encoded.encoder.to_dict()},
            "metrics": "proxy: agreement with the unreduced model, not task accuracy",
            **result.to_dict()}
