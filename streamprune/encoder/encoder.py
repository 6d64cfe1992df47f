"""`VisionEncoder`: a model's vision tower with encoder-side reduction, frame after frame.

    frames ─▶ reuse test on pixels ─▶ changed patches (+ halo) ─▶ tower layers (merging between attention
              (per patch, against the      │                          and MLP; changed patches attend to the
               pixels its cache came from)  │                          cached keys/values of the others)
                                            └─ unchanged patches: output features of the previous encode
    ─▶ unmerge to the patch grid ─▶ features [T, N, C] (+ attention received per patch)

State persists across `encode` calls (a stream, a robot's control steps) until `reset`. A frame where too
little can be reused is encoded whole and becomes the new reference (a keyframe). With nothing active the
model's own numbers come out (merging off and no reuse: the runner equals the tower exactly).

Attention received per patch (HoliTom's score) is the mean over queries of the last layer's attention. A
reused patch's query row is the one cached when it was last computed (its own attention has not been
recomputed); computed rows are fresh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch

from streamprune.encoder.config import EncoderConfig
from streamprune.encoder.tower import (
    Context,
    LayerRecord,
    Tower,
    patch_pixels,
    patch_rows,
    received_attention,
    run_layers,
)
from streamprune.errors import ConfigError
from streamprune.flops import vision_flops
from streamprune.reduce.reuse import patch_change, reuse_mask
from streamprune.reduce.vit import MERGE_METHODS, TokenState, merge_schedule, unmerge

ProgressFn = Callable[[int, int], None]


@dataclass
class EncoderStats:
    """Totals over the frames encoded since the last reset (or since the stats were read with `take`)."""

    frames: int = 0
    keyframes: int = 0  # frames encoded whole
    patches: int = 0  # patches of all frames
    computed_patches: int = 0  # patches that went through the tower
    flops: float = 0.0
    flops_full: float = 0.0  # what the unreduced tower would have cost

    @property
    def computed_fraction(self) -> float:
        return self.computed_patches / max(self.patches, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "computed_fraction": round(self.computed_fraction, 4),
                "flops_ratio": round(self.flops / self.flops_full, 4) if self.flops_full else 1.0}


def full_encode_stats(tower: Tower, frames: int) -> EncoderStats:
    """Stats of the unreduced tower on `frames` frames (every patch, every layer)."""
    n = tower.num_patches
    flops = frames * vision_flops(tower.width, tower.layers[0].mlp.fc1.out_features, [(n, n, n)] * len(tower.layers))
    return EncoderStats(frames, frames, frames * n, frames * n, flops, flops)


@dataclass
class EncoderOutput:
    """features [T, N, C] as the model's tower would give them; attention [T, N] received per patch (None
    unless asked); recomputed [T, N] bool, the patches that went through the tower; keyframe [T] bool."""

    features: torch.Tensor
    attention: torch.Tensor | None
    recomputed: torch.Tensor
    keyframe: torch.Tensor

    @property
    def computed(self) -> torch.Tensor:
        """Patches that went through the tower, per frame [T]."""
        return self.recomputed.sum(-1)


@dataclass
class _Reference:
    """What the next frame may reuse, per patch: pixels [N, K] the cache came from, the tower's output
    hidden [N, C] (before any final norm), keys/values per layer [h, N, d] (context mode), attention rows
    [N, N] of the last layer (when attention is wanted)."""

    pixels: torch.Tensor
    hidden: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    rows: torch.Tensor | None = None


class ReferenceState:
    """What every encoder with temporal reuse shares: the reference the next frame may reuse, and stats."""

    stats: EncoderStats

    def reset(self) -> None:
        """Forget the reference frame (a new video, stream or episode)."""
        self._ref = None

    def take_stats(self) -> EncoderStats:
        """The stats so far, and start counting afresh."""
        stats, self.stats = self.stats, EncoderStats()
        return stats


class VisionEncoder(ReferenceState):
    def __init__(self, tower: Tower, config: EncoderConfig, attention: bool = False, frames_per_batch: int = 8) -> None:
        self.tower = tower
        self.config = config
        self.want_attention = attention
        self.frames_per_batch = frames_per_batch
        self.method = MERGE_METHODS[config.merge] if config.merge else None
        self.proportional = self.method.proportional if self.method else True
        self._mlp = tower.layers[0].mlp.fc1.out_features
        self._flops_full = full_encode_stats(tower, 1).flops
        self.stats = EncoderStats()
        self.reset()

    # ------------------------------------------------------------------------------------------ public
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, progress: ProgressFn | None = None) -> EncoderOutput:
        """pixels [T, 3, S, S] (the model's pixel values) → features [T, N, C] and, if asked, attention [T, N]."""
        if self.config.reuse is not None and self.config.reuse.ratio > 0:
            outputs = []
            for t in range(pixels.shape[0]):
                outputs.append(self._encode_frame(pixels[t]))
                if progress:
                    progress(t + 1, pixels.shape[0])
            return _stack(outputs)
        outputs = []
        for start in range(0, pixels.shape[0], self.frames_per_batch):
            outputs.append(self._encode_whole(pixels[start:start + self.frames_per_batch]))
            if progress:
                progress(min(start + self.frames_per_batch, pixels.shape[0]), pixels.shape[0])
        return _stack(outputs)

    @torch.no_grad()
    def encode_merged(self, pixels: torch.Tensor) -> TokenState:
        """pixels [T, 3, S, S] → the merged tokens of every frame (x [T, L', C] after any final norm, sizes,
        owners), not unmerged: for `encoder.tokens.merged_visual_tokens`. Merging only, no reuse."""
        if self.config.reuse is not None or self.method is None:
            raise ConfigError("merged tokens need a merging method and no reuse (reuse mixes cached patches in)")
        states = []
        for start in range(0, pixels.shape[0], self.frames_per_batch):
            state, record = self._run(self.tower.embed(pixels[start:start + self.frames_per_batch]))
            self._count(record, state.x.shape[0], keyframe=True)
            states.append(state)
        x = torch.cat([s.x for s in states])
        return TokenState(self.tower.finish(x), torch.cat([s.size for s in states]),
                          torch.cat([s.owner for s in states]), torch.cat([s.position for s in states]))

    # ----------------------------------------------------------------------------------------- helpers
    def _features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tower's output as the model uses it; never a view of the reference, which later frames update."""
        return self.tower.finish(hidden) if self.tower.final_norm is not None else hidden.clone()

    def _schedule(self, tokens: int) -> list[int] | None:
        if self.method is None or self.config.merge_ratio <= 0:
            return None
        return merge_schedule(tokens, len(self.tower.layers), self.config.merge_ratio, self.config.merge_schedule)

    def _count(self, record: LayerRecord, frames: int, keyframe: bool) -> None:
        n = self.tower.num_patches
        s = self.stats
        s.frames += frames
        s.keyframes += frames if keyframe else 0
        s.patches += frames * n
        s.computed_patches += frames * record.counts[0][0]
        s.flops += frames * vision_flops(self.tower.width, self._mlp, record.counts)
        s.flops_full += frames * self._flops_full

    def _run(self, embeddings: torch.Tensor, positions: torch.Tensor | None = None, context: Context | None = None,
             record_kv: bool = False):
        state = TokenState.start(embeddings, positions)
        return run_layers(self.tower, state, self._schedule(embeddings.shape[1]), self.method, context,
                          proportional=self.proportional, record_kv=record_kv,
                          record_attention=self.want_attention, unit_sizes=True)

    def _encode_whole(self, pixels: torch.Tensor) -> EncoderOutput:
        """Every patch through the tower (merging if configured); no state."""
        state, record = self._run(self.tower.embed(pixels))
        hidden = unmerge(state.x, state.owner)
        attention = None
        if self.want_attention:
            attention = received_attention(record.attention, record.sizes, record.owner_last)
        self._count(record, pixels.shape[0], keyframe=True)
        everything = torch.ones(pixels.shape[0], self.tower.num_patches, dtype=torch.bool, device=hidden.device)
        return EncoderOutput(self._features(hidden), attention, everything, everything[:, 0].clone())

    def _encode_frame(self, pixels: torch.Tensor) -> EncoderOutput:
        """One frame [3, S, S] against the reference: reuse what did not change, or encode it whole.

        One host sync per frame: the count of reusable patches, which decides between a keyframe, nothing
        to compute, and which patches go through the tower (the shapes of what follows)."""
        options = self.config.reuse
        device = pixels.device
        patches = patch_pixels(pixels[None], self.tower.patch)[0]  # [N, K]
        n = self.tower.num_patches
        reuse, num_reused = None, 0
        if self._ref is not None:
            change = patch_change(self._ref.pixels, patches)
            reuse = reuse_mask(change, self.tower.grid, options.threshold, options.halo, options.ratio)
            num_reused = int(reuse.sum())  # the frame's one sync
            if num_reused / n < options.min_reuse:
                reuse = None
        context_mode = options.mode == "context"
        embeddings = self.tower.embed(pixels[None])  # cheap: one convolution
        if reuse is None:  # keyframe: everything computed, becomes the reference
            state, record = self._run(embeddings, record_kv=context_mode)
            hidden = unmerge(state.x, state.owner)[0]
            ref = _Reference(patches.clone(), hidden)
            if context_mode:
                ref.kv = [(_per_patch(k, owner), _per_patch(v, owner))
                          for (k, v), owner in zip(record.kv, record.owner, strict=True)]
            if self.want_attention:
                everything = torch.arange(n, device=device)
                ref.rows = patch_rows(record.attention, record.sizes, record.owner_last, everything[:0], everything,
                                      n)[0]
            self._ref = ref
            self._count(record, 1, keyframe=True)
            attention = ref.rows.mean(0) if self.want_attention else None
            return EncoderOutput(self._features(hidden)[None], None if attention is None else attention[None],
                                 torch.ones(1, n, dtype=torch.bool, device=device),
                                 torch.ones(1, dtype=torch.bool, device=device))

        ref = self._ref
        not_keyframe = torch.zeros(1, dtype=torch.bool, device=device)
        if num_reused == n:  # nothing moved: the previous output as it is
            self._count(LayerRecord(counts=[(0, 0, 0)] * len(self.tower.layers)), 1, keyframe=False)
            attention = ref.rows.mean(0)[None] if self.want_attention else None
            return EncoderOutput(self._features(ref.hidden)[None], attention,
                                 torch.zeros(1, n, dtype=torch.bool, device=device), not_keyframe)
        # patch indices, the computed ones then the reused ones, each ascending (a stable sort of the mask)
        order = torch.sort(reuse.to(torch.uint8), stable=True).indices
        computed, reused = order[:n - num_reused], order[n - num_reused:]
        context = None
        if context_mode:
            context = Context([k[:, reused][None] for k, _ in ref.kv], [v[:, reused][None] for _, v in ref.kv])
        state, record = self._run(embeddings[:, computed], computed, context, record_kv=context_mode)
        ref.hidden[computed] = unmerge(state.x, state.owner)[0]
        ref.pixels[computed] = patches[computed]
        if context_mode:
            for (k, v), (new_k, new_v), owner in zip(ref.kv, record.kv, record.owner, strict=True):
                k[:, computed] = _per_patch(new_k, owner)
                v[:, computed] = _per_patch(new_v, owner)
        attention = None
        if self.want_attention:
            context_positions = reused if context_mode else reused[:0]
            ref.rows[computed] = patch_rows(record.attention, record.sizes, record.owner_last, context_positions,
                                            computed, n)[0]
            attention = ref.rows.mean(0)[None]
        self._count(record, 1, keyframe=False)
        return EncoderOutput(self._features(ref.hidden)[None], attention, ~reuse[None], not_keyframe)


def _per_patch(kv: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Keys or values of tokens [1, h, L, d] → of the patches they account for [h, P, d]."""
    return kv[0].gather(1, owner[0][None, :, None].expand(kv.shape[1], -1, kv.shape[-1]))


def _stack(outputs: list[EncoderOutput]) -> EncoderOutput:
    attention = None if outputs[0].attention is None else torch.cat([o.attention for o in outputs])
    return EncoderOutput(torch.cat([o.features for o in outputs]), attention,
                         torch.cat([o.recomputed for o in outputs]), torch.cat([o.keyframe for o in outputs]))


class StreamSet:
    """One `VisionEncoder` per independent image stream — each camera of each batch element of a robot
    policy — so reuse compares a camera's image with the same camera's previous one.

    `begin()` at the start of a control step; then `encode(images)` once per camera in a fixed order (the
    order is the camera's identity, as in a policy's prefix). `reset()` at an episode's start. Without reuse
    nothing is kept between calls, so a camera's whole batch goes through one encoder at once.
    """

    def __init__(self, tower: Tower, config: EncoderConfig) -> None:
        self.tower = tower
        self.config = config
        self._stateful = config.reuse is not None and config.reuse.ratio > 0
        self._encoders: dict[tuple[int, int], VisionEncoder] = {}
        self._calls = 0
        self.stats = EncoderStats()

    def reset(self) -> None:
        self._encoders.clear()
        self._calls = 0

    def begin(self) -> None:
        self._calls = 0

    def take_stats(self) -> EncoderStats:
        stats, self.stats = self.stats, EncoderStats()
        return stats

    def _encoder(self, key: tuple[int, int]) -> VisionEncoder:
        encoder = self._encoders.get(key)
        if encoder is None:
            encoder = self._encoders[key] = VisionEncoder(self.tower, self.config)
        return encoder

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] of the next camera → its tower output [B, N, C] (final norm applied)."""
        camera, self._calls = self._calls, self._calls + 1
        if not self._stateful:
            encoder = self._encoder((0, 0))  # stateless: one for every camera
            features = encoder.encode(images).features
            _add(self.stats, encoder.take_stats())
            return features
        features = []
        for b in range(images.shape[0]):
            encoder = self._encoder((camera, b))
            features.append(encoder.encode(images[b:b + 1]).features)
            _add(self.stats, encoder.take_stats())
        return torch.cat(features)


def _add(total: EncoderStats, part: EncoderStats) -> None:
    for f in fields(EncoderStats):
        setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
