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


@torch.no_grad()
def compare(adapter: VideoLLMAdapter, prompt: PromptInputs, encoded: EncodedVideo, method: str,
            retain: float, inner: InnerConfig | None = None, steps: int = 32, reference: EncodedVideo | None = None,
            **reduce_options) -> Fidelity:
    """Reduced (outer `method` at `retain`, plus optional `inner`) vs unreduced on the same video/prompt.

    `reference`: the full encode when `encoded` came from encoder-side reduction (else `encoded` is both)."""
    full_encode = reference or encoded
    unreduced = VisualTokens.unreduced(full_encode.features, full_encode.grid_hw)
    full = adapter.reduced_inputs(prompt, unreduced, full_encode)
    tokens = reduce_tokens(method, encoded.features, encoded.attention, encoded.grid_hw, retain, **reduce_options)
    reduced = adapter.reduced_inputs(prompt, tokens, encoded)

    reference = adapter.generate(full, steps)
    ref_logp, ref_hidden = teacher_forced(adapter, full, reference, None)
    red_logp, red_hidden = teacher_forced(adapter, reduced, reference, inner)
    kl = (ref_logp.exp() * (ref_logp - red_logp)).sum(-1)  # [steps]
    with adapter.inner_stage(reduced, inner):
        free = adapter.generate(reduced, steps)
    n = min(free.shape[1], reference.shape[1])
    return Fidelity(
        kl_first_token=float(kl[0]),
        kl_mean=float(kl.mean()),
        teacher_forced_agreement=float((red_logp.argmax(-1) == reference[0]).float().mean()),
        greedy_agreement=float((free[0, :n] == reference[0, :n]).float().sum() / steps),
        hidden_cosine=float(F.cosine_similarity(ref_hidden, red_hidden, dim=0)),
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
    options = reduction_options(opts)
    reference = None
    if opts.encoder.active:  # the unreduced side sees the model's own tower
        reference = run.loaded.adapter.encode(run.prompt,
                                              progress=progress and (lambda d, t: progress("full encode", d, t)))
    result = compare(run.loaded.adapter, run.prompt, run.encoded, opts.method, opts.retain, opts.inner,
                     steps=steps, reference=reference, **options)
    return {"video": str(run.clip.path), "model": run.loaded.name, "random_weights": run.loaded.random_weights,
            "method": opts.method, "retain": opts.retain, "tau": options.get("tau"),
            "inner": inner_summary(opts.inner, run.inner_layer, result.inner_installed),
            "encoder": {**opts.encoder.summary(), **run.encoded.encoder.to_dict()},
            "metrics": "proxy: agreement with the unreduced model, not task accuracy",
            **result.to_dict()}
