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

Both models run wherever the adapter's model lives; the metrics are computed there in float32 and read back
once, as Python floats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from streamprune.models.base import EncodedVideo, LLMInputs, PromptInputs, VideoLLMAdapter
from streamprune.reduce import reduce_tokens
from streamprune.reduce.inner_cuts import InnerConfig
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
    with adapter.inner_stage(reduced, inner):
        free = adapter.generate(reduced, steps)
    return proxy_metrics(ref.logp, red_logp, ref.answer, free, ref.hidden, red_hidden, steps)


def proxy_metrics(ref_logp: torch.Tensor, red_logp: torch.Tensor, ref_answer: torch.Tensor, free: torch.Tensor,
                  ref_hidden: torch.Tensor, red_hidden: torch.Tensor, steps: int) -> dict[str, float]:
    """The proxies from both sides' outputs, on their device, read back in one go.

    ref_logp, red_logp: [steps, V] log-probs along the reference answer; ref_answer: [1, steps] its tokens;
    free: [1, s] the reduced model's own greedy answer; ref_hidden, red_hidden: [C] last prompt token's final
    hidden state (any dtype: compared in float32)."""
    kl = (ref_logp.exp() * (ref_logp - red_logp)).float().sum(-1)  # [steps]
    n = min(free.shape[1], ref_answer.shape[1])
    values = torch.stack([
        kl[0], kl.mean(),
        (red_logp.argmax(-1) == ref_answer[0]).float().mean(),
        (free[0, :n] == ref_answer[0, :n]).float().sum() / steps,
        F.cosine_similarity(ref_hidden.float(), red_hidden.float(), dim=0),
    ]).tolist()  # the one host read
    return dict(zip(("kl_first_token", "kl_mean", "teacher_forced_agreement", "greedy_agreement", "hidden_cosine"),
                    values, strict=True))


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
            "runtime": run.loaded.runtime.describe(),
            "metrics": "proxy: agreement with the unreduced model, not task accuracy",
            **result.to_dict()}
