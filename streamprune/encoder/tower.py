"""Run a SigLIP-family vision tower layer by layer, with token reduction between attention and MLP.

Thin over the model's own modules: each layer's `layer_norm1`, `self_attn.{q,k,v,out}_proj`,
`layer_norm2` and `mlp` are called as they are; only the loop and the attention call are ours, so that
a layer can (a) merge tokens after attention (ToMe's place), (b) weigh keys by the patches they stand
for (proportional attention), and (c) attend to extra keys/values of patches that were not recomputed
(temporal reuse). With none of those, the result equals the model's own tower (a test checks it).

Covers transformers' SigLIP (LLaVA-OneVision, PaliGemma/pi0) and SmolVLM's vision transformer (SmolVLA):
same layer structure, no [CLS] token.

Shapes: B frames, N patches per frame (grid H×W), P ≤ N patches computed, L tokens (after merging),
U context patches, C width, h heads, d head width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from streamprune.reduce.vit import MergeMethod
from streamprune.reduce.vit.transform import TokenState, apply_transform


@dataclass
class Tower:
    """What the runner needs of a model's vision tower.

    embed: pixel_values [B, 3, S, S] → patch embeddings with positions [B, N, C] (the model's own module).
    layers: the encoder layers whose output the model uses (e.g. all but the last for vision_feature_layer −2).
    final_norm: applied to the last layer's output when the model does (post_layernorm), else None.
    grid: (H, W) patches per frame; patch: pixels per patch side.
    """

    embed: Callable[[torch.Tensor], torch.Tensor]
    layers: Sequence[nn.Module]
    final_norm: nn.Module | None
    grid: tuple[int, int]
    patch: int

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def width(self) -> int:
        return self.layers[0].self_attn.embed_dim

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.final_norm is None else self.final_norm(hidden)


def siglip_tower(vision_model: nn.Module, feature_layer: int = -1, final_norm: bool = False) -> Tower:
    """A `Tower` over transformers' SiglipVisionTransformer / SmolVLMVisionTransformer, or the
    SiglipVisionModel around it (up to transformers 5.16 it holds them in `.vision_model`; from 5.17 the
    embeddings, encoder and post_layernorm sit on the SiglipVisionModel itself).

    feature_layer indexes hidden_states as transformers does (0 = embeddings, −1 = last layer's output).
    final_norm: whether the model applies post_layernorm to the features it uses (PaliGemma, SmolVLM: yes;
    LLaVA-OneVision reads hidden_states[−1]: no).
    """
    vision_model = getattr(vision_model, "vision_model", vision_model)
    layers = vision_model.encoder.layers
    used = len(layers) + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= used <= len(layers):
        raise ValueError(f"feature layer {feature_layer} selects no encoder layer output")
    config = vision_model.config
    side = config.image_size // config.patch_size
    embeddings = vision_model.embeddings
    if "patch_attention_mask" in embeddings.forward.__code__.co_varnames:  # SmolVLM: bucketed positions
        def embed(pixels):
            mask = torch.ones(pixels.shape[0], side, side, dtype=torch.bool, device=pixels.device)
            return embeddings(pixel_values=pixels, patch_attention_mask=mask)
    else:
        def embed(pixels):
            return embeddings(pixels)
    return Tower(embed, list(layers[:used]), vision_model.post_layernorm if final_norm else None,
                 (side, side), config.patch_size)


@dataclass
class Context:
    """Keys/values of patches that are not recomputed, per layer: keys[l], values[l] [B, h, U, d]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass
class LayerRecord:
    """What a run kept for the caller. kv[l] = (keys, values) [B, h, L_l, d] of the tokens entering layer l,
    with owner[l] [B, P] mapping computed patches to them; attention [B, L, L + U] (head mean, softmax) of
    the last layer, over its tokens then the context keys."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    owner: list[torch.Tensor] = field(default_factory=list)
    attention: torch.Tensor | None = None
    sizes: torch.Tensor | None = None  # [B, L] sizes at the last layer's attention
    owner_last: torch.Tensor | None = None  # [B, P] owner at the last layer's attention
    counts: list[tuple[int, int, int]] = field(default_factory=list)  # per layer: queries, keys, MLP tokens


def _heads(x: torch.Tensor, proj: nn.Linear, heads: int) -> torch.Tensor:
    b, length, _ = x.shape
    return proj(x).view(b, length, heads, -1).transpose(1, 2)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                    per_head: bool = False, head_chunk: int = 4) -> torch.Tensor:
    """Softmax attention from q [B, h, Lq, d], k [B, h, Lk, d] and an additive bias [B, 1, 1, Lk]:
    [B, h, Lq, Lk] per head, or the head mean [B, Lq, Lk] computed a few heads at a time (bounded memory).

    Logits in q's dtype, softmax in float32 (as transformers' eager attention): the result is float32, for
    the scores read from it; cast it to the values' dtype to apply it."""
    if per_head:
        logits = q @ k.transpose(-1, -2) * scale
        return (logits if bias is None else logits + bias).softmax(-1, dtype=torch.float32)
    total = None
    for h in range(0, q.shape[1], head_chunk):
        logits = q[:, h:h + head_chunk] @ k[:, h:h + head_chunk].transpose(-1, -2) * scale
        if bias is not None:
            logits = logits + bias
        part = logits.softmax(-1, dtype=torch.float32).sum(1)
        total = part if total is None else total + part
    return total / q.shape[1]


@torch.no_grad()
def run_layers(tower: Tower, state: TokenState, schedule: Sequence[int] | None = None,
               method: MergeMethod | None = None, context: Context | None = None, proportional: bool = True,
               record_kv: bool = False, record_attention: bool = False,
               unit_sizes: bool | None = None) -> tuple[TokenState, LayerRecord]:
    """Run the tower's layers on `state` (tokens after embedding, or already merged ones).

    schedule[l]: tokens `method` removes after layer l's attention (None: no reduction). context: extra
    keys/values of patches that are not computed (size 1 each). Proportional attention adds log(size) to
    the logits of merged tokens (only once some size differs from 1, so unreduced runs are untouched).
    unit_sizes: whether every size of `state` is 1 (None: read once here; `TokenState.start` gives True).
    Sizes change only in a merge step, so after that a Python flag says it, without a sync per layer.
    Hidden states keep the tower's dtype; attention probabilities handed to methods and recorded are float32.
    Tokens come out of a merge in the method's order (`tome`: the release's, not raster); nothing here reads
    that order: `owner` and `position` carry each token's patches and grid position.
    """
    record = LayerRecord()
    last = len(tower.layers) - 1
    merged = not unit_sizes if unit_sizes is not None else bool((state.size != 1).any())
    for index, layer in enumerate(tower.layers):
        attn = layer.self_attn
        h = layer.layer_norm1(state.x)
        q, k, v = (_heads(h, proj, attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        if record_kv:
            record.kv.append((k, v))
            record.owner.append(state.owner)
        keys, values = k, v
        if context is not None:
            keys = torch.cat([k, context.keys[index]], 2)
            values = torch.cat([v, context.values[index]], 2)
        bias = None
        if proportional and merged:
            log_size = state.size.log()
            if context is not None:
                log_size = torch.cat([log_size, log_size.new_zeros(log_size.shape[0], keys.shape[2] - k.shape[2])], 1)
            bias = log_size[:, None, None, :].to(q.dtype)  # SDPA takes a mask in the query's dtype
        r = schedule[index] if schedule is not None else 0
        merging = r > 0 and method is not None
        if merging and method.needs_attention:  # the method reads the attention matrix: compute it once
            heads = attention_probs(q, keys, attn.scale, bias, per_head=True)
            out = heads.to(values.dtype) @ values
        else:
            heads = None
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=attn.scale)
        b, length, c = state.x.shape
        x = state.x + attn.out_proj(out.transpose(1, 2).reshape(b, length, c))
        if index == last and record_attention:
            probs = heads.mean(1) if heads is not None else attention_probs(q, keys, attn.scale, bias)
            record.attention, record.sizes, record.owner_last = probs, state.size, state.owner
        state = TokenState(x, state.size, state.owner, state.position)
        if merging:
            metric = k.mean(1)  # ToMe's metric: keys averaged over heads [B, L, d]
            step = method.plan(metric=metric, r=r, x=x, size=state.size,
                               attention=None if heads is None else heads[..., :length],
                               position=state.position, grid=tower.grid, layer=index, num_layers=len(tower.layers))
            state = apply_transform(state, step)
            merged = True  # each removed token's size went to a survivor: some size is now above 1
        state.x = state.x + layer.mlp(layer.layer_norm2(state.x))
        record.counts.append((length, keys.shape[2], state.num_tokens))
    return state, record


def received_attention(probs: torch.Tensor, sizes: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Mean attention each patch receives, from the last layer's attention among tokens (no context).

    probs [B, L, L] (head mean, softmax), sizes [B, L], owner [B, N]. A query token stands for `size`
    queries and a key token's mass is shared by the patches it stands for, so for duplicated tokens this
    equals the unmerged computation. Returns [B, N].
    """
    per_key = (sizes[:, :, None] * probs).sum(1) / sizes  # [B, L]: mass received per patch of each token
    return per_key.gather(1, owner) / sizes.sum(1, keepdim=True)


def patch_rows(probs: torch.Tensor, sizes: torch.Tensor, owner: torch.Tensor, context_positions: torch.Tensor,
               computed_positions: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Attention rows of the computed patches over all N patches, from token-level attention with context.

    probs [B, L, L + U] (keys: tokens, then the context patches at `context_positions` [U]); sizes [B, L];
    owner [B, P] for the patches at `computed_positions` [P]. Returns [B, P, N].
    """
    b, length = sizes.shape
    per_patch_key = (probs[:, :, :length] / sizes[:, None, :]).gather(2, owner[:, None, :].expand(-1, length, -1))
    cols = probs.new_zeros(b, length, num_patches)
    cols[:, :, computed_positions] = per_patch_key
    cols[:, :, context_positions] = probs[:, :, length:]
    return cols.gather(1, owner[..., None].expand(-1, -1, num_patches))


def patch_pixels(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """pixel_values [B, 3, S, S] → per-patch pixels [B, N, 3·patch²] (what the patch convolution sees)."""
    b, c, s, _ = pixels.shape
    side = s // patch
    crop = pixels[:, :, :side * patch, :side * patch]
    return crop.unfold(2, patch, patch).unfold(3, patch, patch).permute(0, 2, 3, 1, 4, 5).reshape(
        b, side * side, c * patch * patch)
