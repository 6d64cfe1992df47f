"""SmolVLA with VLA-Pruner-style visual-token pruning (Liu et al., 2025), wrapping lerobot's SmolVLAPolicy.

Nothing of lerobot's model is re-implemented. After `SmolVLAPolicy.__init__` builds the model, the two inner
modules get thin subclasses (class swap, same weights and state):
- `PrunableVLMWithExpert(SmolVLMWithExpertModel)` overrides `embed_image` (cut "before"),
  `forward_attn_layer` / `forward_cross_attn_layer` (per-layer sequence/mask slicing for cut "inside") and
  `get_attention_interface` (wraps the eager attention to read attention probabilities);
- `PrunableFlowMatching(VLAFlowMatching)` overrides `embed_prefix` (prefix layout) and `denoise_step`
  (per-layer KV-cache crop for cut "inside").
All of them are no-ops unless a `ChunkPruner` is installed, which the policy does for one action chunk at a time.

Importance (per camera, 64 tokens on the 8×8 grid):
- semantic: attention from the valid language queries to the camera's visual keys in the prefix pass at VLM
  layer K−1, averaged over language queries and heads;
- action: attention from the 50 action queries to the camera's visual keys while denoising, averaged over heads,
  action queries, all denoising steps and the later half of the layers (VLA-Pruner's "later-half layers"; the
  same rule as pi0/pi05). Recorded once per chunk (batch mean) into an `ImportanceState` (decaying window, w, γ).
Tokens missing from a recorded step (pruned away: every layer for cut "before", layers ≥ K for cut "inside") keep
their last observed score, and the seen ones are rescaled to their previous total
(`streamprune.importance.carry_over`) so that both stay comparable.

Selection (k = budget(64, retain) per camera): `select_tokens` on the connector features — `dual_level_select`,
or the semantic-only, action-only or seeded random baselines — for the whole batch at once. The first
`importance_window` chunks of an episode run unpruned.
- cut "before": the current chunk's semantic scores exist only after its prefix pass, so the *previous*
  chunk's semantic scores are used; kept tokens are renumbered contiguously (lerobot's cumsum positions).
- cut "inside": the current chunk's layer-K−1 semantic scores are used; from layer K on, the prefix keeps
  its original RoPE positions (VLA-Pruner); the cache holds all tokens for layers < K and the kept ones for
  layers ≥ K, with per-layer denoising masks and per-layer cache crops.

Devices: scores, kept sets and the importance history stay on the policy's device, and the hooks that run per
layer and per denoising step never read a value back to the host (shapes and Python ints only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy, VLAFlowMatching
from lerobot.policies.smolvla.smolvlm_with_expert import SmolVLMWithExpertModel
from torch import Tensor

from policies.pruning_config import ENCODER_FIELDS
from streamprune.encoder import StreamSet, siglip_tower
from streamprune.errors import ConfigError
from streamprune.importance import ImportanceState, carry_over
from streamprune.reduce.vla import budget, select_tokens

from .configuration_smolvla_pruned import SmolVLAPrunedConfig

GRID = 64  # visual tokens per camera image: 512 px / patch 16 / pixel-shuffle 4 → 8×8

# select(camera, features [B, 64, D], semantic [B, 64]) -> kept indices [B, k]
Selector = Callable[[str, Tensor, Tensor], Tensor]


def attention_probs(mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """Softmax attention as lerobot's eager attention computes it: q [B, Q, H, D], k [B, K, Hkv, D] (GQA),
    mask [B, Q, K] → probs [B, H, Q, K] (fp32). Used for reading scores only; outputs come from lerobot."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask.bool()[:, None], torch.finfo(scores.dtype).min)
    return scores.softmax(-1)


def gather_seq(x: Tensor, index: Tensor, dim: int = 1) -> Tensor:
    """Per-sample gather along `dim`: x [B, ..., T, ...], index [B, T'] → x with T' entries along `dim`."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    return x.gather(dim, index.view(shape).expand(*x.shape[:dim], index.shape[1], *x.shape[dim + 1:]))


def to_grid(values: Tensor, kept: Tensor) -> Tensor:
    """Scores of kept tokens values [B, m] at grid positions kept [B, m] → [B, 64] fp32 on their device, NaN
    where not seen."""
    grid = torch.full((values.shape[0], GRID), float("nan"), device=values.device)
    return grid.scatter(1, kept, values.detach().float())


def all_positions(batch: int, device: torch.device) -> Tensor:
    """Every grid position of each batch row: [B, 64] (an unpruned camera's kept set)."""
    return torch.arange(GRID, device=device).expand(batch, GRID)


class ChunkPruner:
    """Pruning plan and score recorder for one action chunk (one prefix pass + its denoising steps).

    cameras: names of the prefix images in order; active: prune this chunk (else only record);
    select: the policy's selection rule; prior_semantic: last chunk's semantic grid per camera [64] (cut
    "before"); depth: VLM layers (the expert runs alongside each); keep: fixed kept indices per camera [B, k]
    that bypass selection (replays, tests).
    """

    def __init__(self, config: SmolVLAPrunedConfig, cameras: list[str], active: bool, select: Selector,
                 prior_semantic: dict[str, Tensor], depth: int, keep: dict[str, Tensor] | None = None) -> None:
        self.cut = config.cut
        self.layer_k = config.prune_layer
        self.action_layers = range(depth // 2, depth)
        self.image_extra = (2, 1) if config.add_image_special_tokens else (0, 0)  # special tokens around an image
        self.cameras = cameras
        self.active = active or keep is not None
        self.select = select
        self.prior_semantic = prior_semantic
        self.keep: dict[str, Tensor] = dict(keep or {})
        self.features: list[Tensor] = []  # connector output per camera [B, 64, D]
        self.semantic: dict[str, Tensor] = {}  # [B, 64], NaN where unseen
        self.action_sum: dict[str, Tensor] = {}  # [B, 64] summed over recorded calls where seen
        self.action_seen: dict[str, Tensor] = {}  # [B, 64] how many of those calls saw each token
        self.keep_full: Tensor | None = None  # cut "inside": kept prefix positions [B, P']
        self.lang_masks: Tensor | None = None
        self.layer = -1
        self.stage = ""

    # -- layout ------------------------------------------------------------------------------------------
    def begin_prefix(self, num_images: int, lang_masks: Tensor) -> None:
        """Called by embed_prefix: the prefix is [images..., language, state]."""
        if num_images != len(self.cameras):
            raise ValueError(f"expected {len(self.cameras)} images, got {num_images}")
        self.lang_masks = lang_masks
        self.features = []

    def pruned_before(self) -> bool:
        return self.active and self.cut == "before"

    def sees_pruned(self) -> bool:
        """The current layer's keys hold only the kept visual tokens: every layer for cut "before", layers ≥ K
        for cut "inside"."""
        return self.pruned_before() or (self.active and self.cut == "inside" and self.layer >= self.layer_k)

    def kept(self, camera: str, batch: int, device: torch.device) -> Tensor:
        """Grid indices present in the current layer's keys for `camera` [B, m]."""
        if self.sees_pruned():
            return self.keep[camera]
        return all_positions(batch, device)

    def image_starts(self, sizes: list[int]) -> tuple[list[int], int]:
        """Start of each camera's visual tokens and of the language tokens, for per-camera sizes."""
        pre, post = self.image_extra
        starts, pos = [], 0
        for m in sizes:
            starts.append(pos + pre)
            pos += pre + m + post
        return starts, pos

    def recorded_sizes(self) -> list[int]:
        """Visual tokens per camera in the current layer's keys (see the module docstring)."""
        if self.sees_pruned():
            return [self.keep[c].shape[1] for c in self.cameras]
        return [GRID] * len(self.cameras)

    # -- hooks called by PrunableVLMWithExpert ---------------------------------------------------------
    def on_image(self, emb: Tensor) -> Tensor:
        """Connector output of the next camera [B, 64, D] → what enters the prefix [B, m, D]."""
        camera = self.cameras[len(self.features)]
        self.features.append(emb.detach())
        if not self.pruned_before():
            return emb
        if camera not in self.keep:
            semantic = self.prior_semantic[camera].expand(emb.shape[0], GRID)
            self.keep[camera] = self.select(camera, self.features[-1], semantic)
        return gather_seq(emb, self.keep[camera].to(emb.device))

    def on_layer(self, layer_idx: int, inputs_embeds: list, position_ids: Tensor,
                 attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Before a layer: note the stage; for cut "inside" at layers ≥ K drop the pruned prefix columns
        from the mask (and rows/positions/hidden states when the VLM stream is present).

        At layer K the VLM stream is pruned in place in `inputs_embeds`: SmolVLMWithExpertModel.forward passes
        its list to the layer and reads it back for the residual, so both see the pruned sequence.
        """
        self.layer = layer_idx
        vlm, expert = inputs_embeds[0] is not None, len(inputs_embeds) > 1 and inputs_embeds[1] is not None
        self.stage = "joint" if vlm and expert else ("prefix" if vlm else "denoise")
        if not (self.active and self.cut == "inside" and layer_idx >= self.layer_k):
            return position_ids, attention_mask
        total = attention_mask.shape[-1]
        prefix_len = total - (inputs_embeds[1].shape[1] if expert else 0)
        if self.keep_full is None:
            self.keep_full = self.full_keep(prefix_len, attention_mask.shape[0], attention_mask.device)
        suffix = torch.arange(prefix_len, total, device=attention_mask.device).expand(self.keep_full.shape[0], -1)
        index = torch.cat([self.keep_full, suffix], 1)
        attention_mask = gather_seq(attention_mask, index, dim=2)
        if vlm:
            if layer_idx == self.layer_k:
                inputs_embeds[0] = gather_seq(inputs_embeds[0], self.keep_full)
            attention_mask = gather_seq(attention_mask, index, dim=1)
            position_ids = gather_seq(position_ids, index)
        return position_ids, attention_mask

    def full_keep(self, prefix_len: int, batch: int, device: torch.device) -> Tensor:
        """Cut "inside": select per camera (current semantic scores), then the kept prefix positions [B, P']."""
        if self.stage == "denoise":
            raise RuntimeError("cut 'inside' needs the prefix pass to run through layer K before denoising")
        starts, _ = self.image_starts([GRID] * len(self.cameras))
        keep = torch.ones(batch, prefix_len, dtype=torch.bool, device=device)
        kept_count = prefix_len
        for camera, features, start in zip(self.cameras, self.features, starts, strict=True):
            if camera not in self.keep:
                if camera not in self.semantic:
                    raise RuntimeError("a joint (no-cache) pass with cut 'inside' needs a fixed `keep`")
                self.keep[camera] = self.select(camera, features, self.semantic[camera])
            keep[:, start:start + GRID] = False
            keep.scatter_(1, self.keep[camera].to(device) + start, True)
            kept_count -= GRID - self.keep[camera].shape[1]
        # each row's kept positions, ascending; every row keeps `kept_count`, so no host sync is needed
        return torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :kept_count]

    def on_attention(self, mask: Tensor, q: Tensor, k: Tensor) -> None:
        """Every eager-attention call: record semantic (prefix, layer K−1) or action (denoising) scores."""
        if self.stage == "prefix" and self.layer == self.layer_k - 1:
            self.record_semantic(mask, q, k)
        elif self.stage == "denoise" and self.layer in self.action_layers:
            self.record_action(mask, q, k)

    def record_semantic(self, mask: Tensor, q: Tensor, k: Tensor) -> None:
        """Language → vision attention, mean over valid language queries and heads, per camera."""
        starts, lang_start = self.image_starts(self.recorded_sizes())
        rows = slice(lang_start, lang_start + self.lang_masks.shape[1])
        probs = attention_probs(mask[:, rows], q[:, rows], k).mean(1)  # [B, L, K]
        weights = self.lang_masks.float()[:, :, None]
        per_key = (probs * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, K]
        for camera, start, m in zip(self.cameras, starts, self.recorded_sizes(), strict=True):
            self.semantic[camera] = to_grid(per_key[:, start:start + m], self.kept(camera, q.shape[0], q.device))

    def record_action(self, mask: Tensor, q: Tensor, k: Tensor) -> None:
        """Action → vision attention, mean over heads and action queries, summed over calls, per camera."""
        starts, _ = self.image_starts(self.recorded_sizes())
        per_key = attention_probs(mask, q, k).mean((1, 2))  # [B, K]
        for camera, start, m in zip(self.cameras, starts, self.recorded_sizes(), strict=True):
            grid = to_grid(per_key[:, start:start + m], self.kept(camera, q.shape[0], q.device))
            seen = ~grid.isnan()
            self.action_sum[camera] = self.action_sum.get(camera, 0) + grid.nan_to_num(0.0)
            self.action_seen[camera] = self.action_seen.get(camera, 0) + seen

    # -- hook called by PrunableFlowMatching ---------------------------------------------------------
    def restore_cache(self, cache) -> None:
        """After a denoising step (lerobot cropped every layer to the full prefix length): crop layers ≥ K
        back to the pruned prefix length."""
        if self.keep_full is None:
            return
        for layer in cache.layers[self.layer_k:]:
            layer.crop(self.keep_full.shape[1])

    def action_scores(self, camera: str) -> Tensor:
        """This chunk's action grid [B, 64]: the mean over the calls that saw each token, NaN where none did."""
        seen = self.action_seen[camera]
        return torch.where(seen > 0, self.action_sum[camera] / seen.clamp_min(1), float("nan"))


class PrunableVLMWithExpert(SmolVLMWithExpertModel):
    """lerobot's SmolVLMWithExpertModel with pruning hooks (assigned by class swap, never constructed)."""

    pruner: ChunkPruner | None = None
    streams: StreamSet | None = None  # encoder-side reduction, one reuse state per camera and batch element

    def embed_image(self, image: Tensor) -> Tensor:
        """lerobot's `embed_image` (SigLIP, then the connector), with encoder-side reduction when configured.
        image: [B, 3, H, W] → [B, 64, D], or [B, m, D] once the "before" cut prunes."""
        vlm = self.get_vlm_model()
        pixels = image.to(dtype=vlm.vision_model.dtype)
        if self.streams is not None and self.streams.config.active:
            hidden = self.streams.encode(pixels)
        else:
            # the all-True patch mask made on the image's device: left to transformers, it is made on the CPU
            # and copied over, a host round trip per chunk on a GPU
            patches = vlm.vision_model.patch_size
            mask = torch.ones(image.shape[0], image.shape[2] // patches, image.shape[3] // patches,
                              dtype=torch.bool, device=image.device)
            hidden = vlm.vision_model(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state
        emb = vlm.connector(hidden)
        return emb if self.pruner is None else self.pruner.on_image(emb)

    def forward_attn_layer(self, model_layers, inputs_embeds, layer_idx, position_ids, attention_mask,
                           *args, **kwargs):
        if self.pruner is not None:
            position_ids, attention_mask = self.pruner.on_layer(layer_idx, inputs_embeds, position_ids,
                                                                attention_mask)
        return super().forward_attn_layer(model_layers, inputs_embeds, layer_idx, position_ids, attention_mask,
                                          *args, **kwargs)

    def forward_cross_attn_layer(self, model_layers, inputs_embeds, layer_idx, position_ids, attention_mask,
                                 *args, **kwargs):
        if self.pruner is not None:
            position_ids, attention_mask = self.pruner.on_layer(layer_idx, inputs_embeds, position_ids,
                                                                attention_mask)
        return super().forward_cross_attn_layer(model_layers, inputs_embeds, layer_idx, position_ids,
                                                attention_mask, *args, **kwargs)

    def get_attention_interface(self):
        eager = super().get_attention_interface()
        pruner = self.pruner
        if pruner is None:
            return eager

        def attend(attention_mask, batch_size, head_dim, query_states, key_states, value_states):
            pruner.on_attention(attention_mask, query_states, key_states)
            return eager(attention_mask, batch_size, head_dim, query_states, key_states, value_states)

        return attend


class PrunableFlowMatching(VLAFlowMatching):
    """lerobot's VLAFlowMatching with pruning hooks (assigned by class swap, never constructed)."""

    @property
    def pruner(self) -> ChunkPruner | None:
        return self.vlm_with_expert.pruner

    def embed_prefix(self, images, img_masks, lang_tokens, lang_masks, state: Tensor | None = None):
        if self.pruner is not None:
            self.pruner.begin_prefix(len(images), lang_masks)
        return super().embed_prefix(images, img_masks, lang_tokens, lang_masks, state=state)

    def denoise_step(self, prefix_pad_masks, past_key_values, x_t, timestep):
        v_t = super().denoise_step(prefix_pad_masks, past_key_values, x_t, timestep)
        if self.pruner is not None and past_key_values is not None:
            self.pruner.restore_cache(past_key_values)
        return v_t


class SmolVLAPrunedPolicy(SmolVLAPolicy):
    """SmolVLA that keeps `retain` of the visual tokens per camera (see the module docstring).

    After each chunk: `last_kept` camera → kept grid indices [B, k] (all 64 while unpruned),
    `tokens_kept` / `tokens_total` visual tokens per sample in the prefix.
    """

    config_class = SmolVLAPrunedConfig
    name = "smolvla_pruned"
    image_padding = "top_left"  # how SmolVLA letterboxes a non-square camera image (for overlays)

    def __init__(self, config: SmolVLAPrunedConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        # thin subclasses over the modules lerobot just built: same parameters and buffers, extra hooks
        self.model.__class__ = PrunableFlowMatching
        self.model.vlm_with_expert.__class__ = PrunableVLMWithExpert
        if config.prune_layer >= self.model.vlm_with_expert.num_vlm_layers:
            raise ConfigError(f"prune_layer must be below the {self.model.vlm_with_expert.num_vlm_layers} "
                              f"VLM layers, got {config.prune_layer}")
        self._attach_encoder()

    def _attach_encoder(self) -> None:
        """Encoder-side reduction on SmolVLM's SigLIP (its output goes through post_layernorm, then the connector)."""
        vision = self.model.vlm_with_expert.get_vlm_model().vision_model
        self.model.vlm_with_expert.streams = StreamSet(siglip_tower(vision, -1, final_norm=True),
                                                       self.config.encoder_config())

    @property
    def encoder_stats(self):
        """What the vision tower computed in the last chunk (`EncoderStats`), or None before any chunk."""
        return getattr(self, "_encoder_stats", None)

    def configure_pruning(self, **changes) -> None:
        """Change pruning fields of the config between chunks (`PruningConfigMixin.set_pruning`). The
        importance history is kept: compare variants from a fresh episode (`reset`). Changing the encoder
        fields starts its reuse state afresh."""
        self.config.set_pruning(self.model.vlm_with_expert.num_vlm_layers, **changes)
        if any(name in changes for name in ENCODER_FIELDS):
            self._attach_encoder()

    def reset(self) -> None:
        """Episode start: empty the action queue, forget importance history, re-seed the random baseline."""
        super().reset()
        streams = getattr(self.model.vlm_with_expert, "streams", None)
        if streams is not None:  # the base __init__ calls reset() before the encoder is attached
            streams.reset()
        self.action_importance: dict[str, ImportanceState] = {}
        self.seen_semantic: dict[str, Tensor] = {}
        self.generator: torch.Generator | None = None  # the random baseline's, seeded 0 on the features' device
        self.last_kept: dict[str, Tensor] = {}
        self.tokens_kept = 0
        self.tokens_total = 0

    def last_scores(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Camera → (semantic, action) importance of the last chunk, [1, 64] each (batch mean; unseen ones
        carried over)."""
        return {cam: (self.seen_semantic[cam][None], state.latest()[None])
                for cam, state in self.action_importance.items()}

    @property
    def budget(self) -> int:
        """Visual tokens kept per camera when pruning."""
        return budget(GRID, self.config.retain)

    def camera_names(self, batch: dict[str, Tensor]) -> list[str]:
        """Names of the prefix images in SmolVLAPolicy.prepare_images order (present, then empty cameras)."""
        present = [key for key in self.config.image_features if key in batch]
        missing = len(self.config.image_features) - len(present)
        return present + [f"empty_camera_{i}" for i in range(min(missing, self.config.empty_cameras))]

    def ready(self, cameras: list[str]) -> bool:
        """Warm-up over: every camera has `importance_window` chunks of action importance."""
        return all(c in self.action_importance and self.action_importance[c].ready for c in cameras)

    def select(self, camera: str, features: Tensor, semantic: Tensor) -> Tensor:
        """Kept grid indices [B, k] from features [B, 64, D] and semantic scores [B, 64] (on their device)."""
        action = self.action_importance[camera].value()  # [64], the batch's shared history
        if self.generator is None:
            self.generator = torch.Generator(device=features.device).manual_seed(0)
        action = None if action is None else action.expand_as(semantic)
        return select_tokens(self.config.selection, features, semantic, action, self.budget, self.generator)

    @contextmanager
    def pruning(self, cameras: list[str], keep: dict[str, Tensor] | None = None) -> Iterator[ChunkPruner]:
        """Install a ChunkPruner for the model calls inside the block (prunes once warmed up, or with `keep`)."""
        pruner = ChunkPruner(self.config, cameras, self.ready(cameras), self.select, self.seen_semantic,
                             self.model.vlm_with_expert.num_vlm_layers, keep)
        self.model.vlm_with_expert.pruner = pruner
        try:
            yield pruner
        finally:
            self.model.vlm_with_expert.pruner = None

    def _get_action_chunk(self, batch: dict[str, Tensor], noise: Tensor | None = None, **kwargs) -> Tensor:
        streams = self.model.vlm_with_expert.streams
        streams.begin()
        with self.pruning(self.camera_names(batch)) as pruner:
            actions = super()._get_action_chunk(batch, noise, **kwargs)
        self._encoder_stats = streams.take_stats() if streams.config.active else None
        self.remember(pruner)
        return actions

    def remember(self, pruner: ChunkPruner) -> None:
        """After a chunk: update the per-camera importance history and the exposed kept sets."""
        self.last_kept, self.tokens_kept, self.tokens_total = {}, 0, 0
        for i, camera in enumerate(pruner.cameras):
            batch = pruner.features[i].shape[0]
            semantic = pruner.semantic[camera].nanmean(0)  # batch mean [64], NaN where unseen
            self.seen_semantic[camera] = carry_over(semantic, ~semantic.isnan(), self.seen_semantic.get(camera))
            action = pruner.action_scores(camera).nanmean(0)
            state = self.action_importance.setdefault(
                camera, ImportanceState(GRID, window=self.config.importance_window,
                                        decay=self.config.importance_decay, device=action.device))
            state.update(action, observed=~action.isnan())
            self.last_kept[camera] = pruner.keep.get(camera, all_positions(batch, pruner.features[i].device))
            self.tokens_kept += self.last_kept[camera].shape[1]
            self.tokens_total += GRID
