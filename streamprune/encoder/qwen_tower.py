"""Encoder-side reduction inside Qwen2.5-VL's and Qwen3-VL's vision transformers.

    pixels of one temporal patch group (2 frames) ─▶ the model's own embedding stage (patch convolution,
    Qwen3-VL's learned positions, rotary cos/sin, Qwen2.5-VL's window order) ─▶ reuse test per cell
    ─▶ our loop over the model's blocks (norm1, attn.qkv + the model's rotary function, attn.proj, norm2, mlp;
       merging between attention and MLP) ─▶ unmerge to patches ─▶ the model's merger (and DeepStack mergers)

Thin over the model's modules: only the loop and the attention call are ours. With nothing active the
features equal the model's `get_video_features` (a test checks it on both tested transformers versions).

Shapes: P patches per group (h·w, in the blocks' order), L ≤ P tokens after merging, U context patches,
C width, heads × d per head, D the LLM width, W attention windows.

Reuse granularity (why not per patch, as on SigLIP):
- Qwen2.5-VL: the *attention window* (8×8 patches, 112 px, 4×4 LLM tokens). 28 of its 32 blocks attend only
  inside a window, so a window none of whose patches changed would compute exactly what it computed
  before (given the same inputs), and a window with a changed patch is recomputed whole, so its windowed
  attention never mixes fresh and stale keys. Only the 4 full-attention blocks mix: there the recomputed
  tokens attend to the cached keys/values of the reused windows (SigLIP's `Context`). Finer cells (a 2×2
  merge group) would put stale keys inside recomputed windows in every windowed block and need
  per-window masks; a whole group would lose all spatial reuse.
- Qwen3-VL: no windows (every block is full attention), so the cell is the 2×2 *merge group*: the smallest
  piece whose merger and DeepStack-merger outputs (one LLM token each) depend on its patches alone, so a
  reused cell's LLM token and DeepStack features are exactly the cached ones.
A cell is recomputed when any of its patches (dilated by `halo` patches) changed by more than the
threshold.

Merging (ToMe and the other `MERGE_METHODS`) runs after every block's attention, on patches. On Qwen2.5-VL
ToMe's bipartite matching is restricted to pairs in the same window, so every token stays in one window
and windowed blocks still attend within windows; tokens are kept sorted by window (a method that merges
across windows leaves the merged token in its kept patch's window). Each token keeps its kept patch's
rotary position. Before the merger, every token is copied back to the patches it stands for (`unmerge`),
in the blocks' order the 2×2 merger and the DeepStack mergers expect.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from streamprune.encoder.config import EncoderConfig
from streamprune.encoder.encoder import EncoderStats, ReferenceState
from streamprune.encoder.tower import attention_probs
from streamprune.flops import vision_flops
from streamprune.reduce.reuse import patch_change, reuse_mask
from streamprune.reduce.vit import (
    MERGE_METHODS,
    MergeMethod,
    TokenState,
    apply_transform,
    merge_schedule,
    unmerge,
)

ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------- geometry
def window_raster_order(grid_hw: tuple[int, int], window: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Where each token (2×2 merge group) of one grid sits in Qwen2.5-VL's window order: [H·W] long, raster →
    window index (windows row-major, tokens row-major within a window). Values in window order v [H·W]
    come back to raster order as v[window_raster_order(...)]."""
    h, w = grid_hw
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)[None, :]
    windows_per_row = -(-w // window)
    key = (((rows // window) * windows_per_row + cols // window) * window + rows % window) * window + cols % window
    return torch.argsort(torch.argsort(key.flatten()))


@dataclass(frozen=True)
class GroupLayout:
    """Where each patch of one temporal patch group sits, all [P] long, indexed by the blocks' order.

    source: the processor's row of each patch (rows come merge group by merge group, groups row-major);
    raster: the patch's raster index (row·w + column) on the (h, w) patch grid;
    window: its attention window (all 0 on a tower without windows); cell: its reuse cell (see the module
    docstring); unit_raster [P/merge²]: the raster index of each merge group (LLM token) in the blocks' order.
    """

    grid: tuple[int, int]
    source: torch.Tensor
    raster: torch.Tensor
    window: torch.Tensor
    cell: torch.Tensor
    unit_raster: torch.Tensor
    num_windows: int
    num_cells: int
    window_sizes: tuple[int, ...]  # patches per window

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def group_layout(grid: tuple[int, int], merge: int, window_units: int,
                 device: torch.device | str | None) -> GroupLayout:
    """The layout of an (h, w)-patch group with `merge`×`merge` merge groups and windows of `window_units`²
    merge groups (0: no windows; then the reuse cell is the merge group)."""
    h, w = grid
    hu, wu = h // merge, w // merge
    unit = merge * merge
    if window_units:
        units = torch.argsort(window_raster_order((hu, wu), window_units, device))  # blocks' order → raster
        unit_row, unit_col = units // wu, units % wu
        windows_per_row = -(-wu // window_units)
        unit_window = (unit_row // window_units) * windows_per_row + unit_col // window_units
        num_windows = windows_per_row * -(-hu // window_units)
        unit_cell, num_cells = unit_window, num_windows
    else:
        units = torch.arange(hu * wu, device=device)
        unit_row, unit_col = units // wu, units % wu
        unit_window, num_windows = torch.zeros_like(units), 1
        unit_cell, num_cells = units, hu * wu
    sub = torch.arange(unit, device=device)
    source = (units[:, None] * unit + sub[None, :]).flatten()
    raster = ((unit_row[:, None] * merge + sub[None, :] // merge) * w + unit_col[:, None] * merge
              + sub[None, :] % merge).flatten()
    window = unit_window.repeat_interleave(unit)
    sizes = tuple(torch.bincount(window, minlength=num_windows).tolist())  # one sync per grid shape
    return GroupLayout(grid, source, raster, window, unit_cell.repeat_interleave(unit), units, num_windows, num_cells,
                       sizes)


# ------------------------------------------------------------------------------------------------ tower
@dataclass
class QwenTower:
    """What the runner needs of a Qwen-VL vision transformer (`model.model.visual`).

    full: blocks attending across the whole group (Qwen2.5-VL's fullatt_block_indexes; all on Qwen3-VL);
    taps: DeepStack blocks whose output goes through `deepstack_mergers` (Qwen3-VL); window_units: window
    side in merge groups (0: no windows); mlp_width: the 2-matrix MLP width of equal cost (FLOPs only);
    rotary: the model's own `apply_rotary_pos_emb_vision`.
    """

    visual: nn.Module
    blocks: Sequence[nn.Module]
    full: frozenset[int]
    taps: tuple[int, ...]
    merge: int
    window_units: int
    mlp_width: int
    rotary: Callable

    @property
    def width(self) -> int:
        return self.blocks[0].attn.qkv.in_features

    @property
    def importance_block(self) -> int:
        """The block whose attention gives per-patch importance: the last full-attention one."""
        return max(self.full)

    def merger(self, hidden: torch.Tensor) -> torch.Tensor:
        """[P, C] patches in the blocks' order → [P/merge², D] LLM tokens (the model's merger)."""
        return self.visual.merger(hidden)

    def deepstack(self, taps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per DeepStack block, [P, C] → [P/merge², D] (the model's DeepStack mergers)."""
        return [m(t) for m, t in zip(self.visual.deepstack_merger_list, taps, strict=True)]


def qwen_tower(visual: nn.Module) -> QwenTower:
    """A `QwenTower` over transformers' Qwen2.5-VL or Qwen3-VL vision model."""
    config = visual.config
    depth = len(visual.blocks)
    windowed = getattr(config, "fullatt_block_indexes", None) is not None and hasattr(config, "window_size")
    full = frozenset(config.fullatt_block_indexes) if windowed else frozenset(range(depth))
    window_units = config.window_size // config.spatial_merge_size // config.patch_size if windowed else 0
    mlp = visual.blocks[0].mlp
    # Qwen2.5-VL's SwiGLU has 3 matrices (1.5× a 2-matrix MLP of the same width); Qwen3-VL's MLP has 2
    mlp_width = int(1.5 * mlp.gate_proj.out_features) if hasattr(mlp, "gate_proj") else mlp.linear_fc1.out_features
    rotary = sys.modules[type(visual.blocks[0].attn).__module__].apply_rotary_pos_emb_vision
    return QwenTower(visual, list(visual.blocks), full, tuple(getattr(config, "deepstack_visual_indexes", None) or ()),
                     config.spatial_merge_size, window_units, mlp_width, rotary)


class _Reached(Exception):
    """Raised by `block_inputs`' hook: block 0's inputs are known, nothing more is needed."""


def block_inputs(visual: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor):
    """The model's own embedding stage on `pixels` [S, K] (processor rows) of `grid_thw` [1, 3]: what enters
    block 0 — hidden [S, C] and the rotary (cos, sin) [S, d], in the blocks' order.

    Read with a pre-hook on block 0 that stops the forward there: every transformers version's own
    embedding, learned-position interpolation, rotary table and window order, with nothing of it copied."""
    captured = {}

    def stop(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]
        raise _Reached

    handle = visual.blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        visual(pixels, grid_thw=grid_thw)
    except _Reached:
        pass
    finally:
        handle.remove()
    cos, sin = captured["rope"]
    return captured["hidden"], cos, sin


# ------------------------------------------------------------------------------------------------ runner
@dataclass
class Context:
    """Keys/values of the patches not recomputed, per full-attention block: {block: (keys, values)} each
    [1, heads, U, d] (rotary already applied)."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BlockRecord:
    """What a run kept: kv {full block: (k, v) [heads, P, d] per computed patch} (when asked); taps [P, C]
    per DeepStack block, unmerged; attention [1, L, L + U] (head mean, float32) at the importance block
    with its sizes [1, L] and owner [1, P]; counts per block (queries, keys per query, MLP tokens)."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    taps: list[torch.Tensor] = field(default_factory=list)
    attention: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    owner: torch.Tensor | None = None
    counts: list[tuple[int, float, int]] = field(default_factory=list)


def _qkv(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: Callable):
    """x [1, L, C] normed; cos, sin [L, d] → q, k, v [1, heads, L, d] (rotary on q, k) and the keys before
    rotary (ToMe's metric: content, not position)."""
    attn = block.attn
    length = x.shape[1]
    q, k, v = attn.qkv(x[0]).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    raw_k = k
    q, k = rotary(q, k, cos, sin)
    return (t.transpose(0, 1)[None] for t in (q, k, v, raw_k))


def _window_lengths(window_of_token: torch.Tensor, num_windows: int) -> list[int]:
    """Tokens per window, windows in order, empty ones left out (tokens are sorted by window). One sync."""
    return [n for n in torch.bincount(window_of_token, minlength=num_windows).tolist() if n]


def sort_by_window(state: TokenState, window_of_patch: torch.Tensor) -> TokenState:
    """The tokens (batch of one) reordered so windows are contiguous (stable), owners renumbered."""
    order = torch.argsort(window_of_patch[state.position[0]], stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return TokenState(state.x[:, order], state.size[:, order], rank[state.owner], state.position[:, order])


@torch.no_grad()
def run_blocks(tower: QwenTower, layout: GroupLayout, state: TokenState, cos: torch.Tensor, sin: torch.Tensor,
               schedule: Sequence[int] | None = None, method: MergeMethod | None = None,
               context: Context | None = None, proportional: bool = True, record_kv: bool = False,
               record_attention: bool = False) -> tuple[TokenState, BlockRecord]:
    """Run every block on `state` (one group, batch of one; tokens sorted by window, positions in the
    blocks' order), cos/sin [P, d] the rotary of every patch of the group.

    Windowed blocks attend within each window (one attention call per window, as the model); full blocks
    over all tokens plus the context. schedule[b]: tokens `method` removes after block b's attention.
    Proportional attention adds log(size) to the logits once some token was merged (so unreduced runs
    are untouched). One host sync per windowed block after a merge (the window lengths)."""
    record = BlockRecord()
    windowed = tower.window_units > 0
    lengths = _window_lengths(layout.window[state.position[0]], layout.num_windows) if windowed else None
    merged = False
    for index, block in enumerate(tower.blocks):
        attn = block.attn
        rope_cos, rope_sin = cos[state.position[0]], sin[state.position[0]]
        q, k, v, raw_k = _qkv(block, block.norm1(state.x), rope_cos, rope_sin, tower.rotary)
        length = state.num_tokens
        bias = state.size.log()[:, None, None, :].to(q.dtype) if proportional and merged else None
        r = schedule[index] if schedule is not None else 0
        merging = r > 0 and method is not None and length > 1
        heads = None
        if index in tower.full:
            if record_kv:
                record.kv[index] = (_per_patch(k, state.owner), _per_patch(v, state.owner))
            keys, values = k, v
            if context is not None and index in context.kv:
                ctx_k, ctx_v = context.kv[index]
                keys, values = torch.cat([k, ctx_k], 2), torch.cat([v, ctx_v], 2)
                if bias is not None:
                    bias = torch.cat([bias, bias.new_zeros(1, 1, 1, ctx_k.shape[2])], -1)
            if merging and method.needs_attention:
                heads = attention_probs(q, keys, attn.scaling, bias, per_head=True)
                out = heads.to(values.dtype) @ values
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=attn.scaling)
            record.counts.append((length, keys.shape[2], length))
        else:  # within windows: tokens are contiguous per window
            chunks = []
            start = 0
            for n in lengths:
                end = start + n
                mask = None if bias is None else bias[..., start:end]
                chunks.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end],
                                                             v[:, :, start:end], attn_mask=mask, scale=attn.scaling))
                start = end
            out = torch.cat(chunks, 2)
            record.counts.append((length, sum(n * n for n in lengths) / max(length, 1), length))
            if merging and method.needs_attention:  # the method reads attention among the tokens, per window
                keys, values = k, v
                heads = _windowed_probs(q, k, attn.scaling, bias, layout.window[state.position[0]])
        x = state.x + attn.proj(out.transpose(1, 2).reshape(1, length, -1))
        if index == tower.importance_block and record_attention:
            record.attention = heads.mean(1) if heads is not None else attention_probs(q, keys, attn.scaling, bias)
            record.sizes, record.owner = state.size, state.owner
        state = TokenState(x, state.size, state.owner, state.position)
        if merging:
            r = min(r, length // 2)
            window_of_token = layout.window[state.position[0]][None]
            step = method.plan(metric=raw_k.mean(1), r=r, x=x, size=state.size,
                               attention=None if heads is None else heads[..., :length],
                               position=layout.raster[state.position], grid=layout.grid,
                               segment=window_of_token if windowed else None, layer=index,
                               num_layers=len(tower.blocks))
            state = apply_transform(state, step)
            merged = True
            if windowed:
                state = sort_by_window(state, layout.window)
                lengths = _window_lengths(layout.window[state.position[0]], layout.num_windows)
            record.counts[-1] = (*record.counts[-1][:2], state.num_tokens)
        state.x = state.x + block.mlp(block.norm2(state.x))
        if index in tower.taps:
            record.taps.append(unmerge(state.x, state.owner)[0])
    return state, record


def _windowed_probs(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                    window_of_token: torch.Tensor) -> torch.Tensor:
    """Per-head softmax attention [1, heads, L, L] with keys outside a query's window masked (for methods
    that read the attention matrix in a windowed block)."""
    outside = window_of_token[:, None] != window_of_token[None, :]
    mask = torch.zeros(outside.shape, dtype=q.dtype, device=q.device).masked_fill(outside, float("-inf"))
    return attention_probs(q, k, scale, mask if bias is None else mask + bias, per_head=True)


def _per_patch(kv: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Keys or values of tokens [1, heads, L, d] → of the patches they account for [heads, P, d]."""
    return kv[0].gather(1, owner[0][None, :, None].expand(kv.shape[1], -1, kv.shape[-1]))


def received_per_patch(probs: torch.Tensor, sizes: torch.Tensor, owner: torch.Tensor, computed: torch.Tensor,
                       context: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Attention each patch receives, mean over the computed queries (a token's row counted once per patch
    it stands for), a token's mass shared by its patches; context patches take their own columns.

    probs [1, L, L + U] (head mean; keys: tokens, then the patches at `context` [U]); sizes [1, L]; owner
    [1, Pc] for the patches at `computed` [Pc]. Returns [P] float32; it sums to 1."""
    length = sizes.shape[1]
    weight = sizes[0] / sizes[0].sum()
    per_key = (weight[:, None] * probs[0].float()).sum(0)  # [L + U]
    out = torch.zeros(num_patches, dtype=torch.float32, device=probs.device)
    out[computed] = (per_key[:length] / sizes[0]).gather(0, owner[0])
    out[context] = per_key[length:]
    return out


# ----------------------------------------------------------------------------------------------- encoder
@dataclass
class QwenEncoderOutput:
    """features [G, N, D] per group, LLM tokens in raster order; side [n][G, N, D] DeepStack features;
    attention [G, N] float32 received per token (mean of its patches); recomputed [G, h·w] bool per patch
    in raster order; keyframe [G] bool."""

    features: torch.Tensor
    side: list[torch.Tensor]
    attention: torch.Tensor
    recomputed: torch.Tensor
    keyframe: torch.Tensor


@dataclass
class _Reference:
    """What the next group may reuse, per patch in the blocks' order: pixels [P, K], output hidden [P, C],
    DeepStack taps [n][P, C], full blocks' keys/values {block: [heads, P, d]}, attention received [P]."""

    grid: tuple[int, int]
    pixels: torch.Tensor
    hidden: torch.Tensor
    taps: list[torch.Tensor]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    received: torch.Tensor


class QwenVisionEncoder(ReferenceState):
    """A Qwen-VL vision tower with encoder-side reduction, temporal patch group after group.

    State (the reference group) persists across `encode` calls until `reset`. `pixel_level`: one 0–255
    level in the processor's normalised pixel values (1/255/std), for the reuse threshold."""

    def __init__(self, tower: QwenTower, config: EncoderConfig, pixel_level: float = 2 / 255) -> None:
        self.tower = tower
        self.config = config
        self.pixel_level = pixel_level
        self.method = MERGE_METHODS[config.merge] if config.merge and config.merge_ratio > 0 else None
        self.proportional = self.method.proportional if self.method else True
        self.reuse = config.reuse if config.reuse is not None and config.reuse.ratio > 0 else None
        self._layouts: dict = {}
        self.stats = EncoderStats()
        self.reset()

    def layout(self, grid: tuple[int, int], device: torch.device) -> GroupLayout:
        key = (grid, str(device))
        if key not in self._layouts:
            self._layouts[key] = group_layout(grid, self.tower.merge, self.tower.window_units, device)
        return self._layouts[key]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, grid_thw: tuple[int, int, int],
               progress: ProgressFn | None = None) -> QwenEncoderOutput:
        """pixels [t·h·w, K] (the processor's pixel_values_videos of one video) with grid (t, h, w) in patches
        → the tower's features per temporal patch group (see `QwenEncoderOutput`)."""
        t, h, w = grid_thw
        per_group = h * w
        outputs = []
        for g in range(t):
            outputs.append(self._encode_group(pixels[g * per_group:(g + 1) * per_group], (h, w)))
            if progress:
                progress(g + 1, t)
        return QwenEncoderOutput(torch.cat([o.features for o in outputs]),
                                 [torch.cat(side) for side in zip(*[o.side for o in outputs], strict=True)],
                                 torch.cat([o.attention for o in outputs]), torch.cat([o.recomputed for o in outputs]),
                                 torch.cat([o.keyframe for o in outputs]))

    # --------------------------------------------------------------------------------------- helpers
    def _schedule(self, tokens: int) -> list[int] | None:
        if self.method is None:
            return None
        return merge_schedule(tokens, len(self.tower.blocks), self.config.merge_ratio, self.config.merge_schedule)

    def _reused_patches(self, layout: GroupLayout, patches: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """Which patches take the reference's values: bool [P] (None: encode the group whole), and how many.
        One host sync (the count, which sets the shapes that follow)."""
        ref, options = self._ref, self.reuse
        if options is None or ref is None or ref.grid != layout.grid:
            return None, 0
        change = patch_change(ref.pixels, patches, self.pixel_level)  # [P] levels
        if options.halo > 0:  # spread each patch's change over its halo, on the raster patch grid
            grid = torch.zeros(layout.num_patches, dtype=change.dtype, device=change.device)
            grid[layout.raster] = change
            grid = F.max_pool2d(grid.view(1, 1, *layout.grid), 2 * options.halo + 1, stride=1, padding=options.halo)
            change = grid.flatten()[layout.raster]
        cell_change = torch.zeros(layout.num_cells, dtype=change.dtype, device=change.device)
        cell_change = cell_change.scatter_reduce(0, layout.cell, change, "amax")
        reuse_cell = reuse_mask(cell_change, (1, layout.num_cells), options.threshold, 0, options.ratio)
        reuse = reuse_cell[layout.cell]
        count = int(reuse.sum())  # the group's one sync
        if count / layout.num_patches < options.min_reuse:
            return None, 0
        return reuse, count

    def _count(self, layout: GroupLayout, counts: list, keyframe: bool) -> None:
        p = layout.num_patches
        s = self.stats
        s.frames += 1
        s.keyframes += int(keyframe)
        s.patches += p
        s.computed_patches += counts[0][0]
        s.flops += vision_flops(self.tower.width, self.tower.mlp_width, counts)
        s.flops_full += full_tower_flops(self.tower, layout)

    def _encode_group(self, pixels: torch.Tensor, grid: tuple[int, int]) -> QwenEncoderOutput:
        tower, device = self.tower, pixels.device
        layout = self.layout(grid, device)
        p = layout.num_patches
        grid_thw = torch.tensor([[1, grid[0], grid[1]]], dtype=torch.long, device=device)
        embeddings, cos, sin = block_inputs(tower.visual, pixels, grid_thw)  # [P, C], blocks' order
        patches = pixels[layout.source]  # [P, K] blocks' order
        reuse, num_reused = self._reused_patches(layout, patches)
        context_mode = self.reuse is not None and self.reuse.mode == "context"
        ref = self._ref
        if reuse is not None and num_reused == p:  # nothing moved: the previous output as it is
            self._count(layout, [(0, 0, 0)] * len(tower.blocks), keyframe=False)
            return self._output(layout, ref.hidden, ref.taps, ref.received, torch.zeros(p, dtype=torch.bool,
                                                                                        device=device), False)
        if reuse is None:
            computed = torch.arange(p, device=device)
            reused = computed[:0]
        else:  # computed then reused patches, each ascending (so computed ones stay sorted by window)
            order = torch.sort(reuse.to(torch.uint8), stable=True).indices
            computed, reused = order[:p - num_reused], order[p - num_reused:]
        context = None
        if reuse is not None and context_mode:
            context = Context({b: (k[:, reused][None], v[:, reused][None]) for b, (k, v) in ref.kv.items()})
        state = TokenState.start(embeddings[computed][None], computed)
        state, record = run_blocks(tower, layout, state, cos, sin, self._schedule(len(computed)), self.method,
                                   context, self.proportional, record_kv=self.reuse is not None and context_mode,
                                   record_attention=True)
        hidden = unmerge(state.x, state.owner)[0]
        fresh = received_per_patch(record.attention, record.sizes, record.owner, computed,
                                   reused if context is not None else reused[:0], p)
        keyframe = reuse is None
        self._count(layout, record.counts, keyframe)
        if self.reuse is None:
            return self._output(layout, hidden, record.taps, fresh, torch.ones(p, dtype=torch.bool, device=device),
                                True)
        if keyframe:
            ref = self._ref = _Reference(grid, patches.clone(), hidden, [t.clone() for t in record.taps],
                                         dict(record.kv), fresh)
        else:
            ref.pixels[computed] = patches[computed]
            ref.hidden[computed] = hidden
            for cached, new in zip(ref.taps, record.taps, strict=True):
                cached[computed] = new
            for b, (k, v) in record.kv.items():
                ref.kv[b][0][:, computed] = k
                ref.kv[b][1][:, computed] = v
            if context is not None:
                ref.received = fresh
            else:  # no context: the reused patches keep their scores, the computed ones rescaled to their share
                ref.received[computed] = fresh[computed] * (len(computed) / p)
        recomputed = torch.zeros(p, dtype=torch.bool, device=device)
        recomputed[computed] = True
        return self._output(layout, ref.hidden, ref.taps, ref.received, recomputed, keyframe)

    def _output(self, layout: GroupLayout, hidden: torch.Tensor, taps: list[torch.Tensor], received: torch.Tensor,
                recomputed: torch.Tensor, keyframe: bool) -> QwenEncoderOutput:
        """Merger (and DeepStack mergers) over the patches, back to raster order; one group."""
        tower = self.tower
        to_raster = torch.argsort(layout.unit_raster)  # raster token → its index in the blocks' order
        features = tower.merger(hidden)[to_raster]
        side = [f[to_raster] for f in tower.deepstack(taps)] if tower.taps else []
        unit = tower.merge ** 2
        attention = received.view(-1, unit).mean(1)[to_raster]
        recomputed_raster = torch.zeros_like(recomputed).scatter_(0, layout.raster, recomputed)
        return QwenEncoderOutput(features[None], [s[None] for s in side], attention[None], recomputed_raster[None],
                                 torch.full((1,), keyframe, dtype=torch.bool, device=hidden.device))


def full_tower_flops(tower: QwenTower, layout: GroupLayout) -> float:
    """FLOPs of the unreduced tower on one group: windowed blocks attend within their windows."""
    p = layout.num_patches
    windowed_keys = sum(n * n for n in layout.window_sizes) / p
    counts = [(p, p if b in tower.full else windowed_keys, p) for b in range(len(tower.blocks))]
    return vision_flops(tower.width, tower.mlp_width, counts)
