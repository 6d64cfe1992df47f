"""Processors of `pi05_pruned`: pi05's own (pruning changes the model, not its inputs). lerobot finds
this by naming convention when a policy is built from its type rather than from a saved folder."""

from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors


def make_pi05_pruned_pre_post_processors(config, dataset_stats=None):
    return make_pi05_pre_post_processors(config, dataset_stats=dataset_stats)
