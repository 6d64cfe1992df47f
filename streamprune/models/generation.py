"""Fast greedy decoding: a static KV cache and a one-token decode step that `torch.compile` can capture.

    prefill ─────────────────────────────▶ DynamicCache ──copy──▶ StaticCache [B, h, max_len, d] per layer
    (the model's own generate, one token:    (layers after an inner cut
     inner stage, DeepStack, M-RoPE as        hold only the survivors)
     usual; its logits give token 1)
    decode step (compiled, CUDA graphs): embed token → decoder with a 4-D additive mask per layer group →
                                          lm_head → argmax

On a GPU the default `generate` spends 17–22 ms per token of a 7B model in Python and kernel launches
(`reference/gpu_floors.md`); a captured step takes ~7.6 ms. The prefill stays eager: it runs once, its
shapes change with every video, and the inner stage cuts tokens inside it.

Each decoder layer attends over its own cache: layers before the first inner cut hold the whole prompt,
layers after cut i only its survivors. Layers with the same cache layout share one additive mask
[B, 1, 1, max_len] in the model's dtype: 0 (or log(size) under proportional attention) on filled slots, the
dtype's minimum on empty ones; the step opens one more slot per token. Positions continue in the original
space (prompt length + t, or the M-RoPE rows + t), as the model's own generate does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from streamprune.errors import ConfigError
from streamprune.models.cache_compat import cache_kwargs, output_cache

BUCKET = 256  # static cache lengths are rounded up to this, so videos of similar length share a compiled step


@dataclass
class LayerGroup:
    """Decoder layers [first, last) whose caches hold the same prompt tokens: `fill` of them, each standing
    for `sizes` [B, fill] originals (None: all 1)."""

    first: int
    last: int
    fill: int
    sizes: torch.Tensor | None


def layer_groups(num_layers: int, prompt_len: int, stage=None) -> list[LayerGroup]:
    """The cache layouts a prefill left: one group without inner cuts, one more per cut of `stage` (an
    `InnerStage` after its prefill). Sizes only where the stage weighs attention by size."""
    proportional = stage is not None and stage.config.proportional
    if stage is None or not stage.cuts:
        return [LayerGroup(0, num_layers, prompt_len, stage.sizes if proportional else None)]
    groups = [LayerGroup(0, stage.cuts[0].step.layer, prompt_len, stage.sizes if proportional else None)]
    for i, cut in enumerate(stage.cuts):
        last = stage.cuts[i + 1].step.layer if i + 1 < len(stage.cuts) else num_layers
        groups.append(LayerGroup(cut.step.layer, last, int(cut.keep.shape[1]),
                                 cut.sizes_after if proportional else None))
    return groups


def group_bias(group: LayerGroup, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[B, 1, 1, max_len] additive bias over a static cache once every slot is filled: log(size) (or 0) on the
    `fill` prompt slots, 0 on the generated ones. A step masks the slots not yet written (`StaticDecoder.step`)."""
    bias = torch.zeros(batch, 1, 1, max_len, dtype=dtype, device=device)
    if group.sizes is not None:
        bias[:, 0, 0, : group.fill] = group.sizes.to(device).float().clamp(min=1).log().to(dtype)
    return bias


def static_cache_from(dynamic, config, max_len: int):
    """A transformers StaticCache holding what `dynamic` (a DynamicCache after the prefill) holds, layer by
    layer (lengths may differ between layers), with room for `max_len` tokens per layer."""
    from transformers import StaticCache

    static = StaticCache(config=config, max_cache_len=max_len)
    for src, dst in zip(dynamic.layers, static.layers, strict=True):
        n = src.keys.shape[2]
        if n > max_len:
            raise ValueError(f"the prompt ({n} tokens) does not fit a static cache of {max_len}")
        dst.lazy_initialization(src.keys, src.values)
        dst.keys[:, :, :n].copy_(src.keys)
        dst.values[:, :, :n].copy_(src.values)
        dst.cumulative_length.fill_(n)
    return static


class StaticDecoder:
    """Greedy decode steps over a static cache for one prompt, optionally compiled.

    decoder: the language model (a Qwen2Model / LlamaModel / Qwen-VL text model); embed / lm_head: the
    input embeddings and output head; positions: [R, B, max_new] the decode tokens' position rows (R = 3 or
    4 for M-RoPE), or None for 1-D positions prompt_len + t."""

    def __init__(self, decoder: torch.nn.Module, embed: torch.nn.Module, lm_head: torch.nn.Module, cache,
                 groups: list[LayerGroup], batch: int, prompt_len: int, max_len: int,
                 positions: torch.Tensor | None, dtype: torch.dtype, device: torch.device,
                 compiled_step: Callable | None = None) -> None:
        self.decoder, self.embed, self.lm_head, self.cache = decoder, embed, lm_head, cache
        self.groups = groups
        self.biases = [group_bias(g, batch, max_len, dtype, device) for g in groups]
        self.fills = torch.tensor([g.fill for g in groups], device=device)
        self.slots = torch.arange(max_len, device=device)
        self.min = torch.finfo(dtype).min
        self.prompt_len = prompt_len
        self.positions = positions
        self.batch = batch
        self.layer_group = [next(i for i, g in enumerate(groups) if g.first <= layer < g.last)
                            for layer in range(len(decoder.layers))]
        self.masks: list[torch.Tensor] = [b for b in self.biases]  # this step's mask per group, read by the hooks
        self._step = compiled_step or self.step

    def step(self, token: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One decode step: token [B, 1] long at step `index` [1] long (0 for the token after the prompt).
        Returns the next token [B, 1]. Pure tensor code on fixed shapes, so it compiles to one graph."""
        for g, bias in enumerate(self.biases):  # open this token's slot in every group
            self.masks[g] = torch.where(self.slots <= self.fills[g] + index, bias, self.min)
        if self.positions is None:
            position_ids = (self.prompt_len + index).view(1, 1).expand(self.batch, 1)
        else:
            position_ids = self.positions.index_select(-1, index)
        out = self.decoder(inputs_embeds=self.embed(token), attention_mask=self.masks[0], position_ids=position_ids,
                           use_cache=True, **cache_kwargs(self.decoder, self.cache))
        return self.lm_head(out.last_hidden_state[:, -1:]).argmax(-1)

    def _layer_hook(self, layer: int):
        group = self.layer_group[layer]

        def hook(module, args, kwargs):
            kwargs["attention_mask"] = self.masks[group]
            return args, kwargs
        return hook

    def run(self, first: torch.Tensor, steps: int, eos: set[int] | None = None, check_every: int = 16) -> torch.Tensor:
        """Tokens after `first` [B, 1] for up to `steps` steps (stopping once every row has produced an eos
        token, checked every `check_every` steps so the host rarely waits). Returns [B, ≤ steps + 1]
        including `first`, cut after the first eos."""
        tokens = [first]
        handles = []
        if len(self.groups) > 1:
            handles = [layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True)
                       for i, layer in enumerate(self.decoder.layers) if self.layer_group[i] > 0]
        index = torch.zeros(1, dtype=torch.long, device=first.device)
        try:
            token = first
            for s in range(steps):
                if eos and s % check_every == 0 and _finished(torch.cat(tokens, 1), eos):
                    break
                token = self._step(token, index).clone()  # a captured graph reuses its output buffer
                tokens.append(token)
                index += 1
        finally:
            for h in handles:
                h.remove()
        return _cut_at_eos(torch.cat(tokens, 1), eos)


def _finished(tokens: torch.Tensor, eos: set[int]) -> bool:
    hit = torch.isin(tokens, torch.tensor(sorted(eos), device=tokens.device))
    return bool(hit.any(1).all())


def _cut_at_eos(tokens: torch.Tensor, eos: set[int] | None) -> torch.Tensor:
    """Tokens up to and including the first eos of the (single-row) batch, as generate returns them."""
    if not eos or tokens.shape[0] != 1:
        return tokens
    hit = torch.isin(tokens[0], torch.tensor(sorted(eos), device=tokens.device)).nonzero()
    return tokens if len(hit) == 0 else tokens[:, : int(hit[0]) + 1]


def cache_length(prompt_len: int, max_new_tokens: int, bucket: int = BUCKET) -> int:
    """Static cache length: prompt plus answer, rounded up to `bucket` (fewer distinct compiled graphs)."""
    return bucket * math.ceil((prompt_len + max_new_tokens) / bucket)


def check_compilable(device: torch.device, attn_implementation: str | None, kv_pruning: bool) -> None:
    """One line for a setting `--compile` cannot serve."""
    if device.type != "cuda":
        raise ConfigError("--compile needs a CUDA device (--device cuda); on the CPU decoding runs uncompiled")
    if attn_implementation not in (None, "sdpa", "eager"):
        raise ConfigError(f"--compile decodes with an additive attention mask, which {attn_implementation} does not "
                          "take; use --attn-implementation sdpa")
    if kv_pruning:
        raise ConfigError("--compile cannot capture DyCoke's KV-cache pruning (its pick changes with the attention "
                          "of each token); drop --compile for dycoke")


_compiled_steps: dict[str, Callable] = {}


def compiled_step(mode: str = "reduce-overhead") -> Callable:
    """One compiled decode step function, shared by every `StaticDecoder` (dynamo guards on shapes, so
    prompts whose static caches have the same length reuse the compiled graph)."""
    if mode not in _compiled_steps:
        _compiled_steps[mode] = torch.compile(_decode_step, mode=mode, dynamic=False)
    return _compiled_steps[mode]


def _decode_step(decoder: StaticDecoder, token: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return decoder.step(token, index)


@torch.no_grad()
def generate_static(adapter, inputs, max_new_tokens: int, logits_processor=None, stage=None,
                    compile: bool = False, compile_mode: str = "reduce-overhead") -> torch.Tensor:
    """Greedy answer [1, ≤ max_new_tokens] of `adapter` (a `VideoLLMAdapter`) to `inputs` (`LLMInputs`): the
    model's own generate for the prefill and first token (with `stage`, the inner stage installed around this
    call, doing its cuts), then decode steps over a static cache (compiled when `compile`)."""
    out = adapter.generate(inputs, 1, logits_processor=logits_processor, return_dict_in_generate=True)
    first = out.sequences[:, -1:]
    if max_new_tokens <= 1:
        return first
    if stage is not None:
        stage.release_decode()  # from here on the decode masks below stand for the stage's decode hooks
    text_config = adapter.config.get_text_config(decoder=True)
    prompt_len = inputs.inputs_embeds.shape[1]
    max_len = cache_length(prompt_len, max_new_tokens)
    cache = static_cache_from(output_cache(out), text_config, max_len)
    positions = None
    if inputs.position_ids is not None:
        positions = inputs.positions_for(max_new_tokens)[..., prompt_len:].to(first.device)
    model = adapter.model
    decoder = StaticDecoder(adapter.language_model, model.get_input_embeddings(), model.get_output_embeddings(),
                            cache, layer_groups(text_config.num_hidden_layers, prompt_len, stage), first.shape[0],
                            prompt_len, max_len, positions, inputs.inputs_embeds.dtype, first.device)
    step = (lambda token, index: compiled_step(compile_mode)(decoder, token, index)) if compile else None
    if step is not None:
        decoder._step = step
    eos = model.generation_config.eos_token_id
    eos = None if eos is None else {eos} if isinstance(eos, int) else set(eos)
    return decoder.run(first, max_new_tokens - 1, eos)
