"""Features and dataset-free normalisation stats shared by the tiny offline policies (`tiny_smolvla`, `tiny_pi0`)."""

from __future__ import annotations

import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.utils.constants import ACTION, OBS_IMAGE, OBS_STATE

PUSHT_INPUTS = {
    OBS_IMAGE: PolicyFeature(type=FeatureType.VISUAL, shape=(3, 96, 96)),
    OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(2,)),
}
PUSHT_OUTPUTS = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(2,))}
ALOHA_INPUTS = {
    "observation.images.top": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 480, 640)),
    OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(14,)),
}
ALOHA_OUTPUTS = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(14,))}
FEATURE_PRESETS = {"pusht": (PUSHT_INPUTS, PUSHT_OUTPUTS), "aloha": (ALOHA_INPUTS, ALOHA_OUTPUTS)}


def neutral_stats(features: dict[str, PolicyFeature]) -> dict[str, dict[str, torch.Tensor]]:
    """Identity-like normalisation stats (mean 0, std 1, range and quantiles ±1) for the non-visual
    features (images are not normalised by these policies): no dataset needed."""
    stats = {}
    for key, feature in features.items():
        if feature.type is FeatureType.VISUAL:
            continue
        zeros, ones = torch.zeros(feature.shape), torch.ones(feature.shape)
        stats[key] = {"mean": zeros, "std": ones, "min": -ones, "max": ones, "q01": -ones, "q99": ones}
    return stats
