"""Installs inner-LLM token merging at decoder layer K on a transformers decoder (Qwen2, Llama).

Thin patching with forward pre-hooks, no copied model code:
- layer K−1's attention (pre-hook): the last prompt token's attention row, head-averaged, computed from
  that layer's own q/k projections and RoPE — one row, so SDPA stays on and nothing runs twice;
- layer K (pre-hook, full-sequence forwards): plan which visual tokens survive, merge, and hand layers
  ≥ K the shorter hidden states with the survivors' original positions (RoPE gathered, gaps kept) and
  the matching rows/columns of the attention mask;
- layers ≥ K on decode steps: the cache of those layers holds only survivors, so the mask's key columns
  are gathered the same way. Layers < K keep the full sequence in the cache; generate's positions stay
  in the original space (layer 0's cache length), so decode tokens get the right RoPE angle everywhere.
Proportional attention (on by default) adds log(size) to the logits of keys that stand for `size` tokens,
before K (sizes from the outer reduction) and after it (sizes after the inner merge).
"""

from __future__ import annotations

import functools
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from streamprune.errors import ConfigError
from streamprune.reduce.inner import MERGES, MODES, MergePlan, apply_plan, make_plan


@dataclass
class InnerConfig:
    mode: str = "none"  # holitom | similarity | fastv | none
    layer: int | None = None  # K; None → proportional to HoliTom's 18 of 28
    ratio: float = 0.5  # fraction of visual tokens removed at K
    merge: str = "mean"  # mean | pairwise (holitom and similarity)
    # add log(size) to the attention logits of tokens that stand for `size` originals (ToMe). On by
    # default: it is exact for duplicated tokens and lowered the first-token KL by 17–32% in
    # benchmarks/bench_fidelity.py, for at most ~18% more prefill time (benchmarks/bench_proportional.py)
    proportional: bool = True

    @property
    def merging(self) -> bool:
        return self.mode != "none" and self.ratio > 0

    @property
    def active(self) -> bool:
        """Worth installing: merging at K, or biasing attention by size."""
        return self.merging or self.proportional


def default_layer(num_layers: int) -> int:
    """HoliTom merges at layer 18 of Qwen2-7B's 28; other depths get the same relative depth."""
    return max(1, min(num_layers - 1, round(18 / 28 * num_layers)))


def validate(config: InnerConfig, num_layers: int) -> int:
    """Check the config against the decoder depth; returns K."""
    if config.mode not in (*MODES, "none"):
        raise ConfigError(f"unknown inner mode {config.mode!r}; choose one of: {', '.join(MODES)}, none")
    if config.merge not in MERGES:
        raise ConfigError(f"unknown merge {config.merge!r}; choose one of: {', '.join(MERGES)}")
    if not (0.0 <= config.ratio < 1.0) or math.isnan(config.ratio):
        raise ConfigError(f"--inner-ratio must be in [0, 1), got {config.ratio}")
    layer = default_layer(num_layers) if config.layer is None else config.layer
    if not 1 <= layer <= num_layers - 1:
        raise ConfigError(f"--inner-layer must be in [1, {num_layers - 1}] for this {num_layers}-layer decoder, got {layer}")
    return layer


def model_rope(attn: torch.nn.Module):
    """The model's own RoPE for attention layer `attn`: rope(q, k, cos, sin) -> (q, k). M-RoPE models
    (Qwen2.5-VL) apply it per t/h/w channel section."""
    module = sys.modules[type(attn).__module__]
    if hasattr(module, "apply_multimodal_rotary_pos_emb"):
        return functools.partial(module.apply_multimodal_rotary_pos_emb,
                                 mrope_section=attn.config.rope_parameters["mrope_section"])
    return module.apply_rotary_pos_emb


def _head_norm(attn: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Qwen3-style per-head RMSNorm of q or k ([..., heads, head_dim]) where the layer has one."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


def query_attention(attn: torch.nn.Module, query_hidden: torch.Tensor, query_rope, keys: torch.Tensor,
                    mask_row: torch.Tensor | None = None) -> torch.Tensor:
    """Head-averaged attention of one query over keys, in one attention layer.

    query_hidden: [B, 1, C] the layer's (normed) attention input at the query; query_rope: its (cos, sin);
    keys: [B, kv_heads, L, hd] after RoPE (as a cache holds them); mask_row: [B, 1, L] bool (True = may
    attend) or additive. Returns [B, L].
    """
    rope = model_rope(attn)
    b = query_hidden.shape[0]
    q = _head_norm(attn, "q_norm", attn.q_proj(query_hidden).view(b, 1, -1, attn.head_dim)).transpose(1, 2)
    q, _ = rope(q, q, *query_rope)
    k = keys.repeat_interleave(attn.num_key_value_groups, dim=1)
    logits = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scaling  # [B, H, L]
    if mask_row is not None:
        logits = logits.masked_fill(~mask_row, float("-inf")) if mask_row.dtype == torch.bool else logits + mask_row
    return torch.softmax(logits.float(), -1).mean(1)


def last_token_attention(attn: torch.nn.Module, hidden: torch.Tensor, position_embeddings, attention_mask) -> torch.Tensor:
    """Head-averaged attention of the last token over all tokens of `hidden` [B, L, C]. Returns [B, L]."""
    rope = model_rope(attn)
    b, length, _ = hidden.shape
    cos, sin = position_embeddings
    k = _head_norm(attn, "k_norm", attn.k_proj(hidden).view(b, length, -1, attn.head_dim)).transpose(1, 2)
    _, k = rope(k, k, cos, sin)
    mask_row = None if attention_mask is None else attention_mask[:, :, -1, :length]
    return query_attention(attn, hidden[:, -1:], (cos[..., -1:, :], sin[..., -1:, :]), k, mask_row)


def _gather_rows_cols(mask: torch.Tensor | None, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor | None:
    """mask [B, 1, q, kv] → rows (query positions) and cols (key positions) per batch row."""
    if mask is None:
        return None
    mask = mask.expand(cols.shape[0], *mask.shape[1:])
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    return mask.gather(3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))


def _gather_seq(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Gather sequence positions `keep` [B, L'] from t [B|1, L] (position ids), [B|1, L, d] (RoPE cos/sin)
    or [3, B|1, L, d] (M-RoPE cos/sin, one per t/h/w row)."""
    if t.dim() == 4:
        return torch.stack([_gather_seq(row, keep) for row in t])
    t = t.expand(keep.shape[0], *t.shape[1:])
    if t.dim() == 2:
        return t.gather(1, keep)
    return t.gather(1, keep[..., None].expand(-1, -1, t.shape[-1]))


def _size_bias(mask: torch.Tensor | None, sizes: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask: the given mask (None = causal) plus log(size) on each key column."""
    b, kv = sizes.shape
    if mask is None:
        offset = kv - q_len
        causal = torch.ones(q_len, kv, dtype=torch.bool).tril(offset)
        mask = causal[None, None].expand(b, 1, q_len, kv)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return mask + sizes.clamp(min=1).log().to(dtype)[:, None, None, :]


class InnerStage:
    """Inner-LLM merging on `decoder` (a Qwen2Model/LlamaModel). Use `prepare(...)` before each new prompt,
    then run the model inside `installed()`."""

    def __init__(self, decoder: torch.nn.Module, config: InnerConfig) -> None:
        self.decoder = decoder
        self.config = config
        self.layer = validate(config, len(decoder.layers))
        self.visual_mask: torch.Tensor | None = None
        self.sizes: torch.Tensor | None = None
        self.plan: MergePlan | None = None  # decided on the first full forward, replayed afterwards
        self.freeze = False  # replay `plan` on later full forwards (no-cache recomputation)
        self.tokens_after: int | None = None  # sequence length from layer K on
        # per-forward state, set by layer 0's hook
        self._full = False  # a full-sequence forward (prefill or no-cache recomputation)
        self._kv_len = 0  # keys in layer 0's cache after this forward
        self._scores: torch.Tensor | None = None  # last token's attention at layer K−1 [B, L]
        self._prefill: dict | None = None  # reduced kwargs for layers > K in this full forward
        self._sizes_after: torch.Tensor | None = None  # sizes of the survivors [B, L']

    def prepare(self, visual_mask: torch.Tensor, sizes: torch.Tensor | None = None) -> None:
        """visual_mask [B, L] marks visual tokens in the prompt; sizes [B, L] originals per token (1 for text)."""
        self.visual_mask = visual_mask.bool()
        self.sizes = torch.ones(visual_mask.shape) if sizes is None else sizes.float()
        self.plan, self._prefill, self.tokens_after = None, None, None

    # hooks ---------------------------------------------------------------------------------------
    def _record_scores(self, module, args, kwargs):
        replaying = self.freeze and self.plan is not None
        if self._full and not replaying and self.config.merging and self.config.mode != "similarity":
            # the last *prompt* token asks; a teacher-forced forward may carry answer tokens after it
            n = self.visual_mask.shape[1]
            hidden = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])[:, :n]
            cos, sin = kwargs["position_embeddings"]
            mask = kwargs.get("attention_mask")
            self._scores = last_token_attention(module, hidden, (cos[..., :n, :], sin[..., :n, :]),
                                                None if mask is None else mask[:, :, :n, :n])

    def _before_layer(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:  # a new forward: full sequence (prefill, no-cache) or decode step?
                cache = kwargs.get("past_key_values")
                self._full = self.visual_mask is not None and hidden.shape[1] >= self.visual_mask.shape[1]
                self._kv_len = (cache.get_seq_length() if cache is not None else 0) + hidden.shape[1]
                self._prefill = None
            if self.visual_mask is None:
                return None
            if self._full and index == self.layer:
                return self._reduce(hidden, args, kwargs)
            if self._full and index > self.layer:
                kwargs.update(self._prefill)
            elif self.config.proportional:
                kwargs["attention_mask"] = self._proportional_mask(index, hidden, kwargs.get("attention_mask"))
            elif index >= self.layer and not self._full and kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = _gather_rows_cols(kwargs["attention_mask"], None, self._decode_cols())
            return args, kwargs
        return hook

    def _reduce(self, hidden, args, kwargs):
        length, prompt_len = hidden.shape[1], self.visual_mask.shape[1]
        if self.plan is None or not self.freeze and length == prompt_len:
            self.plan = make_plan(self.config.mode, hidden[:, :prompt_len], self.visual_mask, self.config.ratio,
                                  self._scores)
        plan = self.plan.extended(length)
        sizes = self._extend_ones(self.sizes, length)
        new_hidden, new_sizes = apply_plan(hidden, plan, sizes, self.config.merge)
        self._sizes_after = new_sizes[:, : self.plan.keep.shape[1]]
        self.tokens_after = int(self.plan.keep.shape[1])
        keep = plan.keep
        reduced = {
            "position_embeddings": tuple(_gather_seq(t, keep) for t in kwargs["position_embeddings"]),
            "attention_mask": _gather_rows_cols(kwargs.get("attention_mask"), keep, keep),
        }
        if kwargs.get("position_ids") is not None:
            reduced["position_ids"] = _gather_seq(kwargs["position_ids"], keep)
        if self.config.proportional:
            reduced["attention_mask"] = _size_bias(reduced["attention_mask"], new_sizes, keep.shape[1], new_hidden.dtype)
        kwargs.update(reduced)
        self._prefill = reduced
        return (new_hidden, *args[1:]), kwargs

    @staticmethod
    def _extend_ones(sizes: torch.Tensor, length: int) -> torch.Tensor:
        """Per-token sizes continued with 1 for tokens after the prompt (generated text)."""
        return torch.cat([sizes, torch.ones(sizes.shape[0], max(0, length - sizes.shape[1]))], 1)[:, :length]

    def _decode_cols(self) -> torch.Tensor:
        """Original key positions held by the cache of layers ≥ K after this step."""
        return self.plan.extended(self._kv_len).keep

    def _proportional_mask(self, index: int, hidden: torch.Tensor, mask):
        """Bias keys by log(size): outer sizes before K, inner sizes on the survivors from K on (decode)."""
        if index < self.layer:
            return _size_bias(mask, self._extend_ones(self.sizes, self._kv_len), hidden.shape[1], hidden.dtype)
        cols = self._decode_cols()
        sizes = self._extend_ones(self._sizes_after, cols.shape[1])
        mask = _gather_rows_cols(mask, None, cols) if mask is not None else None
        return _size_bias(mask, sizes, hidden.shape[1], hidden.dtype)

    @contextmanager
    def installed(self):
        handles = [self.decoder.layers[self.layer - 1].self_attn.register_forward_pre_hook(self._record_scores, with_kwargs=True)]
        handles += [layer.register_forward_pre_hook(self._before_layer(i), with_kwargs=True)
                    for i, layer in enumerate(self.decoder.layers)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
