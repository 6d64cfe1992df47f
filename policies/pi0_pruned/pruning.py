"""VLA-Pruner for lerobot's PaliGemma + action-expert policies (pi0, pi05): importance capture, selection and
the two cuts, shared by `pi0_pruned` and `pi05_pruned`.

Prefix layout (both policies): C cameras × n image tokens (n = 256 = 16×16 patches at 224 px), then the
text tokens (pi05: the prompt with the discretised state). The expert's suffix ends with the action chunk.

Importance, per camera, on the n-position grid, per batch element:
- semantic: attention from the valid text tokens to the image tokens in the prefix pass, at VLM layer
  K−1 (K = `prune_layer`; as in VLA-Pruner's code, the layer right before the cut), mean over heads and
  text queries;
- action: attention from the expert's action tokens to the image tokens while denoising, mean over heads,
  action tokens, denoising steps and the later half of the expert's layers (VLA-Pruner's notes: "later-half
  layers"; its OpenVLA code uses one middle layer). Smoothed over the last W chunks (one `ImportanceState`
  per camera on [B, n] scores: each batch element has its own history; a new batch size starts afresh).
Positions that were pruned away in a chunk were not observed: they keep their previous score and the
observed ones are rescaled to their previous total mass (`streamprune.importance.carry_over`), so a dropped
token can come back when the kept ones lose importance, instead of being frozen out with a zero score.

Cuts:
- "before": `filter_prefix` slices the image embeddings and their masks after `embed_prefix`, using the
  previous chunk's semantic scores and the smoothed action scores; every layer and step sees L' tokens.
- "inside": forward pre-hooks on VLM layers ≥ K drop the tokens using this chunk's semantic scores (layer
  K−1) and re-index hidden states, the 4D mask, position ids and RoPE tables (original positions kept);
  the prefix KV cache is then L long in layers < K and L' long in layers ≥ K, and pre-hooks on expert
  layers ≥ K select the matching columns of the expert's 4D mask.

Devices: scores, kept positions and the importance history stay on the policy's device; the selection runs
there for the whole batch, and no hook (per layer, per denoising step) reads a value back to the host.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from policies.pruning_config import ENCODER_FIELDS, PruningOptions
from streamprune.encoder import EncoderConfig, EncoderStats, StreamSet, siglip_tower
from streamprune.importance import ImportanceState, carry_over
from streamprune.reduce.vla import budget, select_tokens


def gather_rows(x: Tensor, index: Tensor, dim: int = 1) -> Tensor:
    """x[b, index[b]] along `dim` (1 or 2), broadcasting over the remaining trailing dims. index: [B, L']."""
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    view = [index.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = index.shape[1]
    return x.gather(dim, index.view(view).expand(shape))


class VisualTokenPruner:
    """Per-policy pruning state and the hooks on `paligemma_with_expert` (see module docstring).

    Active only between `begin_chunk` and `end_chunk` (inference); training passes are left untouched.
    """

    def __init__(self, options: PruningOptions, paligemma_with_expert: nn.Module, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.vlm_layers = paligemma_with_expert.paligemma.model.language_model.layers
        self.expert_layers = paligemma_with_expert.gemma_expert.model.layers
        self.action_layers = range(len(self.expert_layers) // 2, len(self.expert_layers))
        options.validate(len(self.vlm_layers) if options.cut == "inside" else None)
        self.options = options  # read per chunk and per hook call: may be replaced between chunks
        self._register()
        self.reset()

    @property
    def semantic_layer(self) -> int:
        """The VLM layer whose text → image attention is the semantic score (K − 1, as VLA-Pruner)."""
        return min(self.options.prune_layer, len(self.vlm_layers)) - 1

    @property
    def cut_layer(self) -> int:
        """First layer (VLM and expert) that sees the pruned prefix: K for "inside", 0 for "before"."""
        return self.options.prune_layer if self.options.cut == "inside" else 0

    # ----- state -------------------------------------------------------------------------------------

    def reset(self) -> None:
        """New episode: forget the action history and the last semantic scores (pruning waits W chunks)."""
        self.action_state: dict[str, ImportanceState] = {}
        self.semantic: dict[str, Tensor] = {}
        self.generator: torch.Generator | None = None  # the random baseline's, seeded 0 on the features' device
        self.last_kept: dict[str, Tensor] = {}
        self.tokens_kept = 0
        self.tokens_total = 0
        self._active = False

    @property
    def ready(self) -> bool:
        """The smoothed action importance covers W chunks: pruning may start."""
        return bool(self.action_state) and all(s.ready for s in self.action_state.values())

    def begin_chunk(self, cameras: list[str]) -> None:
        """Start recording one action chunk; `cameras` in the order their images enter the prefix."""
        self.cameras = cameras
        self._active = True
        self._keep: Tensor | None = None  # [B, L'] kept full-prefix positions, None = nothing dropped
        self._semantic_now: tuple[Tensor, Tensor] | None = None  # ([B, C·n] scores, observed) on the full prefix
        self._action_sum: Tensor | None = None  # [B, C·n] summed over steps and layers
        self._action_count: Tensor | None = None  # [B, C·n] how many of those saw each position

    def cancel_chunk(self) -> None:
        """Stop recording without updating the state (the chunk failed)."""
        self._active = False

    def end_chunk(self) -> None:
        """Fold this chunk's scores into the per-camera state and stop recording."""
        self._active = False
        if self._semantic_now is None or self._action_sum is None:
            raise RuntimeError("no attention weights were captured: pruning needs eager attention")
        n = self.tokens_per_image
        semantic, seen = self._semantic_now
        action = self._action_sum / self._action_count.clamp_min(1)
        action_seen = self._action_count > 0
        for c, cam in enumerate(self.cameras):
            cols = slice(c * n, (c + 1) * n)
            self.semantic[cam] = carry_over(semantic[:, cols], seen[:, cols], self.semantic.get(cam))
            state = self.action_state.get(cam)
            if state is None or state.latest().shape != action[:, cols].shape:  # new episode or batch size
                state = self.action_state[cam] = ImportanceState(n, window=self.options.window,
                                                                 decay=self.options.decay, device=action.device)
            state.update(action[:, cols], observed=action_seen[:, cols])

    # ----- selection ---------------------------------------------------------------------------------

    def _select(self, features: Tensor, semantic: Tensor | None) -> Tensor | None:
        """Kept full-prefix positions [B, L'] or None (warm-up or nothing to drop).

        features: [B, L, D] prefix input embeddings; semantic: [B, C·n] scores, or None to use the stored
        ones from the previous chunk ("before").
        """
        n, num_cams = self.tokens_per_image, len(self.cameras)
        k = budget(n, self.options.retain)
        self._record_kept(None, k=n)
        if k >= n or not self.ready:
            return None
        kept = []
        for c, cam in enumerate(self.cameras):
            cols = slice(c * n, (c + 1) * n)
            sem = self.semantic[cam] if semantic is None else semantic[:, cols]
            action = self.action_state[cam].value().view_as(sem)
            kept.append(self._select_camera(features[:, cols], sem, action, k))
        self._record_kept(kept, k)
        batch = features.shape[0]
        text = torch.arange(num_cams * n, features.shape[1], device=features.device).expand(batch, -1)
        offsets = torch.arange(num_cams, device=features.device).repeat_interleave(k) * n
        return torch.cat([torch.cat(kept, 1) + offsets, text], 1)

    def _select_camera(self, features: Tensor, semantic: Tensor, action: Tensor, k: int) -> Tensor:
        """Sorted kept grid positions [B, k] of one camera's images: features [B, n, D], scores [B, n]."""
        if self.generator is None:
            self.generator = torch.Generator(device=features.device).manual_seed(0)
        return select_tokens(self.options.selection, features.detach(), semantic, action, k, self.generator)

    def _record_kept(self, kept: list[Tensor] | None, k: int) -> None:
        n = self.tokens_per_image
        everything = torch.arange(n, device=self._prefix_embs.device).expand(self.batch, n)
        for c, cam in enumerate(self.cameras):
            self.last_kept[cam] = everything if kept is None else kept[c]
        self.tokens_kept = k * len(self.cameras)
        self.tokens_total = n * len(self.cameras)

    # ----- the "before" cut --------------------------------------------------------------------------

    def filter_prefix(self, embs: Tensor, pad_masks: Tensor, att_masks: Tensor, num_images: int,
                      num_text: int) -> tuple[Tensor, Tensor, Tensor]:
        """`embed_prefix` output ([B, L, D], [B, L], [B, L]) → the same, sliced for the "before" cut."""
        if not self._active:
            return embs, pad_masks, att_masks
        self.batch = embs.shape[0]
        self.tokens_per_image = (embs.shape[1] - num_text) // num_images
        self._prefix_embs = embs
        self._prefix_pad = pad_masks
        if self.options.cut != "before":
            self._record_kept(None, k=self.tokens_per_image)
            return embs, pad_masks, att_masks
        self._keep = self._select(embs, None)
        if self._keep is None:
            return embs, pad_masks, att_masks
        return gather_rows(embs, self._keep), pad_masks.gather(1, self._keep), att_masks.gather(1, self._keep)

    # ----- hooks -------------------------------------------------------------------------------------

    def _register(self) -> None:
        """Hooks for the policy's lifetime; they do nothing outside `begin_chunk` … `end_chunk`, and each
        checks the current options, so `options` (cut, layer, budget, selection) may change between chunks."""
        for i, layer in enumerate(self.vlm_layers):
            layer.self_attn.register_forward_hook(partial(self._on_semantic, i))
            layer.register_forward_pre_hook(partial(self._cut_vlm_layer, i), with_kwargs=True)
        for i in self.action_layers:
            self.expert_layers[i].self_attn.register_forward_hook(partial(self._on_action, i))
        for i, layer in enumerate(self.expert_layers):
            layer.register_forward_pre_hook(partial(self._cut_expert_layer, i), with_kwargs=True)

    def _cuts(self, layer_idx: int) -> bool:
        """Layer `layer_idx` runs on the pruned prefix of the "inside" cut."""
        return self._active and self.options.cut == "inside" and layer_idx >= self.options.prune_layer

    def _full_prefix(self, per_key: Tensor, pruned: bool) -> tuple[Tensor, Tensor]:
        """Per-key scores [B, K] of a (possibly pruned) prefix → (scores, observed) on the image part [B, C·n]."""
        width = self.tokens_per_image * len(self.cameras)
        if not pruned or self._keep is None:
            return per_key[:, :width], torch.ones_like(per_key[:, :width], dtype=torch.bool)
        full = per_key.new_zeros(per_key.shape[0], self._prefix_pad.shape[1])
        seen = torch.zeros_like(full, dtype=torch.bool)
        full.scatter_(1, self._keep, per_key)
        seen.scatter_(1, self._keep, True)
        return full[:, :width], seen[:, :width]

    def _on_semantic(self, layer_idx: int, module: nn.Module, args: Any,
                     output: tuple[Tensor, Tensor | None]) -> None:
        """Text → image attention of the prefix pass. weights: [B, H, L', L']."""
        weights = output[1]
        if not self._active or weights is None or layer_idx != self.semantic_layer:
            return
        pruned = self.options.cut == "before"
        rows = self._keep if pruned and self._keep is not None else None
        pad = self._prefix_pad if rows is None else self._prefix_pad.gather(1, rows)
        position = torch.arange(pad.shape[1], device=pad.device).expand_as(pad) if rows is None else rows
        text = (pad & (position >= self.tokens_per_image * len(self.cameras))).float()
        per_key = (weights.float().mean(1) * text[:, :, None]).sum(1) / text.sum(1, keepdim=True).clamp_min(1)
        self._semantic_now = self._full_prefix(per_key, pruned)

    def _on_action(self, layer_idx: int, module: nn.Module, args: Any,
                   output: tuple[Tensor, Tensor | None]) -> None:
        """Action → image attention of one expert layer in one denoising step. weights: [B, H, S, K + S]."""
        weights = output[1]
        if not self._active or weights is None:
            return
        suffix = weights.shape[2]
        per_key = weights[:, :, -self.chunk_size:, : weights.shape[3] - suffix].mean((1, 2))
        pruned = self.options.cut == "before" or layer_idx >= self.cut_layer
        scores, seen = self._full_prefix(per_key.float(), pruned)
        if self._action_sum is None:
            self._action_sum, self._action_count = torch.zeros_like(scores), torch.zeros_like(scores)
        self._action_sum += scores
        self._action_count += seen  # "inside": layers < K see every position, layers ≥ K the kept ones

    def _cut_vlm_layer(self, layer_idx: int, module: nn.Module, args: tuple,
                       kwargs: dict) -> tuple[tuple, dict] | None:
        """"inside": at layer K select with this chunk's semantic scores; re-index the inputs of every layer ≥ K."""
        if not self._cuts(layer_idx):
            return None
        hidden = args[0]  # [B, L or L', D]
        if hidden.shape[1] == self._prefix_pad.shape[1]:  # layer K: the full prefix arrives
            self._keep = self._select(self._prefix_embs, self._semantic_now[0])
            if self._keep is None:
                return None
            hidden = gather_rows(hidden, self._keep)
        keep = self._keep
        # The loop hands every layer the full-prefix mask, positions and RoPE tables: take the kept rows
        # (original positions, as VLA-Pruner does, so the kept tokens keep their RoPE phase).
        mask = kwargs["attention_mask"].squeeze(1)  # [B, L, L]
        kwargs["attention_mask"] = gather_rows(gather_rows(mask, keep, 1), keep, 2).unsqueeze(1)
        kwargs["position_ids"] = kwargs["position_ids"].gather(1, keep)
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (gather_rows(cos, keep), gather_rows(sin, keep))
        return (hidden, *args[1:]), kwargs

    def _cut_expert_layer(self, layer_idx: int, module: nn.Module, args: tuple,
                          kwargs: dict) -> tuple[tuple, dict] | None:
        """"inside": expert layers ≥ K attend over the L' cached prefix keys of those layers."""
        if not self._cuts(layer_idx) or self._keep is None:
            return None
        mask = kwargs["attention_mask"]  # [B, 1, S, L + S]
        prefix = self._prefix_pad.shape[1]
        suffix = torch.arange(prefix, mask.shape[-1], device=mask.device).expand(mask.shape[0], -1)
        cols = torch.cat([self._keep, suffix], 1)
        kwargs["attention_mask"] = gather_rows(mask.squeeze(1), cols, 2).unsqueeze(1)
        return args, kwargs


class EncodedImageMixin:
    """Mixed into lerobot's `PaliGemmaWithExpertModel` (pi0 / pi05) by class swap: `embed_image` runs the
    SigLIP tower through encoder-side reduction when one is configured, then the model's own projector."""

    streams: StreamSet | None = None

    def embed_image(self, image: Tensor) -> Tensor:
        if self.streams is None or not self.streams.config.active:
            return super().embed_image(image)
        hidden = self.streams.encode(image.to(torch.float32))  # the tower is kept in fp32, as lerobot does
        return self.paligemma.model.multi_modal_projector(hidden).to(image.dtype)


_ENCODED_CLASSES: dict[type, type] = {}


def attach_encoder(paligemma_with_expert: nn.Module, config: EncoderConfig) -> StreamSet:
    """Give the model's `embed_image` encoder-side reduction (class swap; same parameters)."""
    base = type(paligemma_with_expert)
    if not issubclass(base, EncodedImageMixin):
        if base not in _ENCODED_CLASSES:
            _ENCODED_CLASSES[base] = type(f"Encoded{base.__name__}", (EncodedImageMixin, base), {})
        paligemma_with_expert.__class__ = _ENCODED_CLASSES[base]
    vision = paligemma_with_expert.paligemma.model.vision_tower.vision_model
    paligemma_with_expert.streams = StreamSet(siglip_tower(vision, -1, final_norm=True), config)
    return paligemma_with_expert.streams


class PrunedPrefixMixin:
    """Mixed into `PI0Pytorch` / `PI05Pytorch`: the prefix embeddings pass through the pruner.

    Adds no parameters, so the state dict and the random init are those of the base model.
    """

    pruner: VisualTokenPruner | None = None

    def embed_prefix(self, images: list[Tensor], img_masks: list[Tensor], tokens: Tensor,
                     masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        embs, pad_masks, att_masks = super().embed_prefix(images, img_masks, tokens, masks)
        if self.pruner is None:
            return embs, pad_masks, att_masks
        return self.pruner.filter_prefix(embs, pad_masks, att_masks, len(images), tokens.shape[1])


class PrunedPolicyMixin:
    """Mixed into `PI0Policy` / `PI05Policy` (before them in the bases): pruning around each action chunk.

    After each chunk: `last_kept` (camera key → kept positions on the 16×16 grid, [B, k]), `tokens_kept`
    and `tokens_total` (image tokens per sample over all cameras, in the pruned layers).
    """

    image_padding = "centre"  # how pi0/pi05 letterbox a non-square camera image (for overlays)

    def attach_pruner(self, pruned_model_class: type) -> None:
        """Call at the end of `__init__`. The base policy builds its model itself; the pruned class only adds
        a method override, so switching the class of the built model keeps weights and seeds identical."""
        self.model.__class__ = pruned_model_class
        self.pruner = self.model.pruner = VisualTokenPruner(
            self.config.pruning_options(), self.model.paligemma_with_expert, self.config.chunk_size)
        self.streams = attach_encoder(self.model.paligemma_with_expert, self.config.encoder_config())
        self.encoder_stats: EncoderStats | None = None  # what the vision tower computed in the last chunk

    def configure_pruning(self, **changes: Any) -> None:
        """Change pruning fields of the config between chunks (`PruningConfigMixin.set_pruning`). The
        importance history is kept: compare variants from a fresh episode (`reset`). Changing the encoder
        fields starts its reuse state afresh."""
        self.pruner.options = self.config.set_pruning(len(self.pruner.vlm_layers), **changes)
        if any(name in changes for name in ENCODER_FIELDS):
            self.streams = attach_encoder(self.model.paligemma_with_expert, self.config.encoder_config())

    def reset(self) -> None:
        super().reset()
        if hasattr(self, "pruner"):  # the base __init__ calls reset() before the pruner exists
            self.pruner.reset()
            self.streams.reset()

    @property
    def last_kept(self) -> dict[str, Tensor]:
        return self.pruner.last_kept

    @property
    def tokens_kept(self) -> int:
        return self.pruner.tokens_kept

    @property
    def tokens_total(self) -> int:
        return self.pruner.tokens_total

    def last_scores(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Camera → (semantic, action) importance of the last chunk, [B, n] each (unseen ones carried over)."""
        return {cam: (self.pruner.semantic[cam], state.latest()) for cam, state in self.pruner.action_state.items()}

    def camera_order(self, batch: dict[str, Tensor]) -> list[str]:
        """Camera keys in prefix order: `_preprocess_images` puts present cameras first, then missing ones."""
        keys = list(self.config.image_features)
        return [k for k in keys if k in batch] + [k for k in keys if k not in batch]

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs: Any) -> Tensor:
        self.pruner.begin_chunk(self.camera_order(batch))
        self.streams.begin()
        try:
            actions = super().predict_action_chunk(batch, **kwargs)
        except BaseException:
            self.pruner.cancel_chunk()
            raise
        self.pruner.end_chunk()
        self.encoder_stats = self.streams.take_stats() if self.streams.config.active else None
        return actions
