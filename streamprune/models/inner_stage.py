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

The cuts it executes are described in `streamprune.reduce.inner_cuts` (`InnerConfig`, built by the methods).

Devices: the stage's state follows the hidden states' device (moved once per forward when it differs), every
tensor it makes is made there, and masks/biases are in the hidden states' dtype. A decode step makes no host
sync: what layers share within a step (each segment's mask between cuts) is computed once, at its first layer,
and DyCoke's keep-or-refresh choice is a `torch.where`. The prefill syncs a few times per cut (budgets).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamprune.models.cache_compat import layer_cache
from streamprune.reduce.inner import InnerStep, MergePlan, apply_plan, step_plan
from streamprune.reduce.inner_cuts import InnerConfig, validate


def model_rope(attn: torch.nn.Module):
    """The model's own RoPE for attention layer `attn`: rope(q, k, cos, sin) -> (q, k), picked by the rank of
    cos. M-RoPE cos/sin [3, B, L, d] (Qwen2.5-VL up to transformers 5.16) go through the module's
    `apply_multimodal_rotary_pos_emb` per t/h/w channel section; [B, L, d] (every other model, and Qwen2.5-VL
    from 5.17, whose rotary embedding recomposes the sections itself) through its `apply_rotary_pos_emb`."""
    module = sys.modules[type(attn).__module__]

    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        if cos.dim() == 4:
            return module.apply_multimodal_rotary_pos_emb(q, k, cos, sin,
                                                          mrope_section=attn.config.rope_parameters["mrope_section"])
        return getattr(module, "apply_rotary_pos_emb", _apply_rotary)(q, k, cos, sin)
    return rope


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Standard RoPE (cos/sin [B, L, d], q/k [B, heads, L, d]) for a module that only ships M-RoPE."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _head_norm(attn: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Qwen3-style per-head RMSNorm of q or k ([..., heads, head_dim]) where the layer has one."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


def query_attention(attn: torch.nn.Module, query_hidden: torch.Tensor, query_rope, keys: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of queries over keys in one attention layer, averaged over heads and queries.

    query_hidden: [B, q, C] the layer's (normed) attention input at the queries; query_rope: their (cos, sin),
    or None to score without rotary embeddings; keys: [B, kv_heads, L, hd] as a cache holds them (after RoPE,
    unless query_rope is None); mask: [B, 1, q, L] bool (True = may attend) or additive. A query that may
    attend nowhere (padding) counts as attending nowhere. Returns [B, L].
    """
    b, n_queries, _ = query_hidden.shape
    q = _head_norm(attn, "q_norm", attn.q_proj(query_hidden).view(b, n_queries, -1, attn.head_dim)).transpose(1, 2)
    if query_rope is not None:
        q, _ = model_rope(attn)(q, q, *query_rope)
    k = keys.repeat_interleave(attn.num_key_value_groups, dim=1)
    logits = (q @ k.transpose(-1, -2)).float() * attn.scaling  # [B, H, q, L]
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    return torch.softmax(logits, -1).nan_to_num(0.0).mean((1, 2))


def queries_attention(attn: torch.nn.Module, hidden: torch.Tensor, position_embeddings, attention_mask,
                      queries: torch.Tensor, rope: bool = True) -> torch.Tensor:
    """Attention over all tokens of `hidden` [B, L, C], averaged over heads and the query positions
    `queries` [q] (causal when no mask is given). rope=False scores q·k without rotary embeddings
    (FEATHER's criterion). Returns [B, L]."""
    b, length, _ = hidden.shape
    cos, sin = position_embeddings
    k = _head_norm(attn, "k_norm", attn.k_proj(hidden).view(b, length, -1, attn.head_dim)).transpose(1, 2)
    query_rope = None
    if rope:
        _, k = model_rope(attn)(k, k, cos, sin)
        query_rope = tuple(_gather_seq(t, queries.expand(b, -1)) for t in (cos, sin))
    if attention_mask is None:
        mask = (torch.arange(length, device=hidden.device)[None, :] <= queries[:, None])[None, None]  # causal
    else:
        mask = attention_mask[:, :, queries, :length]
    return query_attention(attn, hidden[:, queries], query_rope, k, mask)


def _batch_row(t: torch.Tensor, row: int) -> torch.Tensor:
    """Row `row` of RoPE cos/sin: [B|1, L, d] or M-RoPE [3, B|1, L, d] (batch on dim −3)."""
    return t if t.shape[-3] == 1 else t.narrow(t.dim() - 3, row, 1)


def transition_variation(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """TransPrune's token transition variation through one layer: relative change of magnitude plus change
    of direction (1 − cos). before/after: [B, L, C]. Returns [B, L]."""
    before, after = before.float(), after.float()
    norm_before = before.norm(dim=-1).clamp(min=1e-6)
    magnitude = (after.norm(dim=-1) - norm_before).abs() / norm_before
    return magnitude + 1 - torch.nn.functional.cosine_similarity(before, after, dim=-1)


def _minmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, L] scaled to [0, 1] over the True positions of mask (per row)."""
    lo = x.masked_fill(~mask, float("inf")).min(1, keepdim=True).values
    hi = x.masked_fill(~mask, float("-inf")).max(1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp(min=1e-12)


def _gather_rows_cols(mask: torch.Tensor | None, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor | None:
    """mask [B, 1, q, kv] → rows (query positions) and cols (key positions) per batch row."""
    if mask is None:
        return None
    mask = mask.expand(cols.shape[0], *mask.shape[1:])
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    return mask.gather(3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))


def _gather_seq(t: torch.Tensor, keep: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Gather sequence positions `keep` [B, L'] from t, batch (B or 1) on the dim before the sequence's `dim`:
    position ids [B|1, L] (sequence on dim −1, the default for 2-D t) or RoPE cos/sin [..., B|1, L, d]
    (sequence on dim −2, the default otherwise: [B, L, d], or M-RoPE [3, B, L, d] up to transformers 5.16)."""
    dim = (-1 if t.dim() == 2 else -2) if dim is None else dim
    dim %= t.dim()
    shape = [*t.shape[:dim - 1], keep.shape[0], keep.shape[1], *t.shape[dim + 1:]]
    view = [1] * (dim - 1) + list(keep.shape) + [1] * (t.dim() - dim - 1)
    t = t.expand(*shape[:dim], t.shape[dim], *shape[dim + 1:])
    return t.gather(dim, keep.view(view).expand(shape))


def _size_bias(mask: torch.Tensor | None, sizes: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask [B, 1, q_len, kv] in `dtype` (the hidden states'), on sizes' device: the given mask
    (bool, True = may attend; additive; or None = causal over the last q_len keys) plus log(size) on each key
    column. sizes: [B, kv]."""
    kv = sizes.shape[1]
    log_size = sizes.clamp(min=1).log().to(dtype)[:, None, None, :]  # [B, 1, 1, kv]
    if mask is None:
        mask = torch.ones(q_len, kv, dtype=torch.bool, device=sizes.device).tril(kv - q_len)[None, None]
    if mask.dtype == torch.bool:  # min + log(size) rounds to min: where() is the sum, in one pass
        return torch.where(mask, log_size, torch.finfo(dtype).min).expand(sizes.shape[0], 1, q_len, kv)
    return mask.to(dtype) + log_size


def _additive(mask: torch.Tensor | None, batch: int, q_len: int, kv: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """A mask as an additive float mask [B|1, 1, q_len, kv] in `dtype` (None = causal over the last q_len
    keys)."""
    if mask is None:
        mask = torch.ones(q_len, kv, dtype=torch.bool, device=device).tril(kv - q_len)[None, None]
    if mask.dtype == torch.bool:
        return torch.where(mask, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)
    return mask.to(dtype)


@dataclass
class _Cut:
    """What one step decided on the prompt, in the coordinates of the sequence entering it."""

    step: InnerStep
    plan: MergePlan | None = None
    keep: torch.Tensor | None = None  # [B, L_out] survivors as positions of the original prompt
    sizes_after: torch.Tensor | None = None  # [B, L_out]


class InnerStage:
    """Cuts inside the LLM on `decoder` (a Qwen2Model/LlamaModel): one or more steps at layers K1 < K2 < …,
    and/or DyCoke's decode-time KV pruning. Use `prepare(...)` before each new prompt, then run the model
    inside `installed()`."""

    def __init__(self, decoder: torch.nn.Module, config: InnerConfig) -> None:
        self.decoder = decoder
        self.config = config
        num_layers = len(decoder.layers)
        self.layer = validate(config, num_layers)
        self.steps = config.schedule(num_layers)
        self.visual_mask: torch.Tensor | None = None
        self.sizes: torch.Tensor | None = None
        self.cuts: list[_Cut] = []
        self.freeze = False  # replay the prefill's plans on later full forwards (no-cache recomputation)
        # per-forward state, set by layer 0's hook
        self._full = False  # a full-sequence forward (prefill or no-cache recomputation)
        self._released = False  # decode steps left to a static-cache decoder (`release_decode`)
        self._kv_len = 0  # keys in layer 0's cache after this forward
        self._scores: dict[int, torch.Tensor] = {}  # step → its criterion's scores [B, L_in]
        self._transition: dict[int, torch.Tensor] = {}  # step → accumulated transition variation
        self._layer_input: torch.Tensor | None = None
        self._prefill: dict | None = None  # reduced kwargs for the layers after the latest cut
        self._raw_mask: torch.Tensor | None = None  # the latest cut's mask before the size bias
        self._masks: dict = {}  # masks layers share in this forward: (group, id(mask in)) → (mask in, out)
        self._kv_keep = 0  # KV pruning: image keys a decode step keeps, counted at prepare
        self._kv_scores: torch.Tensor | None = None  # KV pruning: image attention the selection came from
        self._kv_cols: torch.Tensor | None = None  # KV pruning: [B, prompt] bool prompt keys layers ≥ L may see

    def prepare(self, visual_mask: torch.Tensor, sizes: torch.Tensor | None = None) -> None:
        """visual_mask [B, L] marks visual tokens in the prompt; sizes [B, L] originals per token (1 for text).
        Both stay on their device (the hooks move them to the hidden states' device if that differs)."""
        self.visual_mask = visual_mask.bool()
        self.sizes = torch.ones(visual_mask.shape, device=visual_mask.device) if sizes is None else sizes.float()
        self.cuts = []
        self._released = False
        self._kv_scores, self._kv_cols = None, None
        if self.config.kv is not None:  # the image token count, once per prompt rather than every decode step
            n_image = int(self.visual_mask[0].sum())
            self._kv_keep = max(1, int(n_image * (1 - self.config.kv.ratio)))

    def release_decode(self) -> None:
        """Leave decode steps to a static-cache decoder (`models.generation`), which masks each layer's cache from
        this stage's cuts and sizes itself; full-sequence forwards are still the stage's."""
        self._released = True

    @property
    def tokens_after(self) -> int | None:
        """Prompt length after the last cut (None before the prefill)."""
        return int(self.cuts[-1].keep.shape[1]) if self.cuts and self.cuts[-1].keep is not None else None

    def tokens_by_layer(self, num_layers: int, seq_len: int) -> list[int]:
        """Prompt tokens each decoder layer processed in the prefill."""
        counts, current = [], seq_len
        done = {c.step.layer: int(c.keep.shape[1]) for c in self.cuts if c.keep is not None}
        for i in range(num_layers):
            current = done.get(i, current)
            counts.append(current)
        return counts

    # hooks ---------------------------------------------------------------------------------------
    def _replaying(self, s: int) -> bool:
        return self.freeze and len(self.cuts) > s and self.cuts[s].plan is not None

    def _local_prompt(self, s: int) -> tuple[int, torch.Tensor]:
        """Prompt length and visual mask entering step s."""
        if s == 0:
            return self.visual_mask.shape[1], self.visual_mask
        prev = self.cuts[s - 1]
        return prev.keep.shape[1], self.visual_mask.gather(1, prev.keep)

    @staticmethod
    def _text_queries(visual_mask: torch.Tensor) -> list[torch.Tensor]:
        """Per row, the prompt's text tokens after its last visual token (the instruction); else the last token.
        visual_mask: [B, n]. Returns B position tensors [q] on its device (one host sync for all rows)."""
        n = visual_mask.shape[1]
        positions = torch.arange(n, device=visual_mask.device)
        last_visual = torch.where(visual_mask, positions, -1).max(1).values.tolist()
        return [positions[last + 1:] if last + 1 < n else positions[-1:] for last in last_visual]

    def _queries(self, criterion: str, visual_mask: torch.Tensor) -> list[torch.Tensor]:
        """Per row, the query positions [q] of a criterion over a prompt with visual_mask [B, n]."""
        b, n = visual_mask.shape
        positions = torch.arange(n, device=visual_mask.device)
        if criterion in ("last", "last-norope"):
            return [positions[-1:]] * b
        if criterion == "received":
            return [positions] * b
        return self._text_queries(visual_mask)

    def _score_hook(self, s: int):
        step = self.steps[s]

        def hook(module, args, kwargs):
            if not self._full or self._replaying(s) or step.criterion == "similarity":
                return
            n, vis = self._local_prompt(s)
            hidden = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])[:, :n]
            cos, sin = kwargs["position_embeddings"]
            mask = kwargs.get("attention_mask")
            mask = None if mask is None else mask[:, :, :n, :n]
            rows = []
            for r, queries in enumerate(self._queries(step.criterion, vis)):  # they differ per row (left padding)
                rope = tuple(_batch_row(t[..., :n, :], r) for t in (cos, sin))
                row_mask = None if mask is None else mask[r:r + 1] if mask.shape[0] > 1 else mask
                rows.append(queries_attention(module, hidden[r:r + 1], rope, row_mask, queries,
                                              rope=step.criterion != "last-norope"))
            scores = torch.cat(rows)
            if step.criterion == "transition":
                scores = _minmax(scores, vis) + _minmax(self._transition.get(s, torch.zeros_like(scores)), vis)
            self._scores[s] = scores
        return hook

    def _transition_hooks(self, s: int):
        """Accumulate transition variation of the tokens entering step s over layers [since, K)."""
        def before(module, args, kwargs):
            if self._full and not self._replaying(s):
                n, _ = self._local_prompt(s)
                self._layer_input = (args[0] if args else kwargs["hidden_states"])[:, :n].detach()

        def after(module, args, kwargs, output):
            if self._full and not self._replaying(s) and self._layer_input is not None:
                out = output[0] if isinstance(output, tuple) else output
                ttv = transition_variation(self._layer_input, out[:, : self._layer_input.shape[1]])
                self._transition[s] = self._transition.get(s, 0) + ttv
        return before, after

    def _before_layer(self, index: int):
        cut_at = {step.layer: s for s, step in enumerate(self.steps)}

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:  # a new forward: full sequence (prefill, no-cache) or decode step?
                self._full = self.visual_mask is not None and hidden.shape[1] >= self.visual_mask.shape[1]
            if self._released and not self._full:  # a static-cache decode step: its own masks stand for ours
                return None
            if index == 0:
                cache = layer_cache(kwargs)
                self._kv_len = (cache.get_seq_length() if cache is not None else 0) + hidden.shape[1]
                self._prefill, self._raw_mask = None, None
                self._scores, self._transition, self._masks = {}, {}, {}
                if self.visual_mask is not None:  # the stage works where the model does (no-op once there)
                    self.visual_mask, self.sizes = self.visual_mask.to(hidden.device), self.sizes.to(hidden.device)
            if self.visual_mask is None:
                return None
            if self._full and index in cut_at:
                return self._cut(cut_at[index], hidden, args, kwargs)
            if self._full and self._prefill is not None:
                kwargs.update(self._prefill)
            elif not self._full:
                kwargs["attention_mask"] = self._decode_mask(index, hidden, kwargs.get("attention_mask"))
            elif self.config.proportional:
                kwargs["attention_mask"] = self._shared(("full",), kwargs.get("attention_mask"), lambda mask: _size_bias(
                    mask, self._extend_ones(self.sizes, self._kv_len), hidden.shape[1], hidden.dtype))
            return args, kwargs
        return hook

    def _shared(self, group: tuple, mask: torch.Tensor | None, make) -> torch.Tensor | None:
        """`make(mask)` once per forward for each group of layers and incoming mask (transformers hands every
        layer of one attention type the same mask object), reused by the group's other layers."""
        key = (group, id(mask))
        hit = self._masks.get(key)
        if hit is None or hit[0] is not mask:  # the entry holds the mask, so its id is not reused meanwhile
            hit = self._masks[key] = (mask, make(mask))
        return hit[1]

    def _cut(self, s: int, hidden, args, kwargs):
        """Step s on a full forward: plan (or replay), merge/drop, and shorten everything for later layers."""
        if self._prefill is not None:  # the inputs of this layer are those of the previous cut's survivors
            kwargs.update(self._prefill)
            kwargs["attention_mask"] = self._raw_mask
        length = hidden.shape[1]
        n, vis = self._local_prompt(s)
        if len(self.cuts) <= s:
            self.cuts.append(_Cut(self.steps[s]))
        cut = self.cuts[s]
        if cut.plan is None or not self.freeze and length == n:
            cut.plan = step_plan(cut.step, hidden[:, :n], vis, self._scores.get(s))
        plan = cut.plan.extended(length)
        sizes_in = self.sizes if s == 0 else self.cuts[s - 1].sizes_after
        new_hidden, new_sizes = apply_plan(hidden, plan, self._extend_ones(sizes_in, length), self.config.merge)
        planned = cut.plan.keep.shape[1]
        cut.sizes_after = new_sizes[:, :planned]
        if s == 0:
            previous = torch.arange(self.visual_mask.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        else:
            previous = self.cuts[s - 1].keep
        cut.keep = previous.gather(1, cut.plan.keep)
        keep = plan.keep
        raw_mask = _gather_rows_cols(kwargs.get("attention_mask"), keep, keep)
        reduced = {"position_embeddings": tuple(_gather_seq(t, keep) for t in kwargs["position_embeddings"]),
                   "attention_mask": raw_mask}
        if kwargs.get("position_ids") is not None:
            reduced["position_ids"] = _gather_seq(kwargs["position_ids"], keep, dim=-1)
        if self.config.proportional:
            reduced["attention_mask"] = _size_bias(raw_mask, new_sizes, keep.shape[1], new_hidden.dtype)
        kwargs.update(reduced)
        self._prefill, self._raw_mask = reduced, raw_mask
        return (new_hidden, *args[1:]), kwargs

    @staticmethod
    def _extend_ones(sizes: torch.Tensor, length: int) -> torch.Tensor:
        """Per-token sizes [B, L] continued with 1 for tokens after the prompt (generated text): [B, length]."""
        return torch.cat([sizes, sizes.new_ones(sizes.shape[0], max(0, length - sizes.shape[1]))], 1)[:, :length]

    def _decode_mask(self, index: int, hidden: torch.Tensor, mask):
        """A decode step's mask at layer `index`: the key columns its cache holds (survivors of the cuts at or
        before it), log(size) on them when proportional, and the KV-pruning selection. Computed once per step
        for the layers between two cuts (and on each side of the KV-pruning layer)."""
        done = sum(1 for c in self.cuts if c.step.layer <= index and c.keep is not None)
        pruned = self.config.kv is not None and index >= self.config.kv.layer and self._kv_cols is not None
        return self._shared(("decode", done, pruned), mask,
                            lambda m: self._make_decode_mask(done, pruned, hidden, m))

    def _make_decode_mask(self, done: int, pruned: bool, hidden: torch.Tensor, mask):
        """`_decode_mask` for layers after `done` cuts, with the KV-pruning selection when `pruned`.
        hidden: [B, q, C]; mask: [B|1, 1, q, kv] bool or additive, or None (causal)."""
        b, q_len = hidden.shape[:2]
        if done:
            cut = self.cuts[done - 1]
            generated = torch.arange(self.visual_mask.shape[1], self._kv_len, device=hidden.device)
            cols = torch.cat([cut.keep, generated.expand(b, -1)], 1)
            mask = _gather_rows_cols(mask, None, cols) if mask is not None else None
            sizes = self._extend_ones(cut.sizes_after, cols.shape[1])
        else:
            sizes = self._extend_ones(self.sizes, self._kv_len)
        if self.config.proportional:
            mask = _size_bias(mask, sizes, q_len, hidden.dtype)
        if pruned:  # prompt keys outside the selection are masked; text and generated ones stay visible
            mask = _additive(mask, b, q_len, self._kv_len, hidden.dtype, hidden.device)
            visible = F.pad(self._kv_cols, (0, mask.shape[-1] - self._kv_cols.shape[1]), value=True)
            mask = mask.masked_fill(~visible[:, None, None, :], torch.finfo(mask.dtype).min)
        return mask

    def _kv_hook(self, module, args, kwargs):
        """DyCoke: on a decode step, layer L−1's attention of the current token over the cached image keys
        picks the image KV layers ≥ L use; the previous pick stays while that attention barely moved (cosine ≥
        refresh). Both choices are computed and one is kept with `torch.where`: no host sync."""
        kv = self.config.kv
        if self._full or self.visual_mask is None or self._released:
            return
        cache = layer_cache(kwargs)
        if cache is None:
            return
        keys = cache.layers[kv.layer - 1].keys  # [B, kv_heads, L_cached, hd], RoPE applied
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        scores = query_attention(module, hidden[:, -1:], (cos[..., -1:, :], sin[..., -1:, :]), keys)
        image = self.visual_mask  # [B, P]: the images are in the prompt
        image_scores = scores[:, : image.shape[1]].masked_fill(~image, 0.0)
        top = image_scores.topk(self._kv_keep, dim=-1).indices
        keep_image = torch.zeros_like(image).scatter_(1, top, True)
        if self._kv_scores is not None:
            stable = (F.cosine_similarity(self._kv_scores, image_scores, dim=-1) >= kv.refresh).all()
            keep_image = torch.where(stable, self._kv_cols & image, keep_image)
            image_scores = torch.where(stable, self._kv_scores, image_scores)  # compare with the pick's own
        self._kv_scores = image_scores
        self._kv_cols = ~image | keep_image  # text keys of the prompt stay visible

    @contextmanager
    def installed(self):
        layers = self.decoder.layers
        handles = [layer.register_forward_pre_hook(self._before_layer(i), with_kwargs=True)
                   for i, layer in enumerate(layers)]
        for s, step in enumerate(self.steps):
            handles.append(layers[step.layer - 1].self_attn.register_forward_pre_hook(self._score_hook(s), with_kwargs=True))
            if step.criterion == "transition":  # registered after the cut hooks: they see the shortened inputs
                first = step.since if step.since is not None else max(0, step.layer - 2)
                first = max(first, self.steps[s - 1].layer if s else 0)
                before, after = self._transition_hooks(s)
                for layer in layers[first:step.layer]:
                    handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
                    handles.append(layer.register_forward_hook(after, with_kwargs=True))
        if self.config.kv is not None:
            handles.append(layers[self.config.kv.layer - 1].self_attn.register_forward_pre_hook(
                self._kv_hook, with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
