"""Processors of `pi0_pruned`: pi0's own (pruning changes the model, not its inputs). lerobot finds
this by naming convention when a policy is built from its type rather than from a saved folder."""

from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors


def make_pi0_pruned_pre_post_processors(config, dataset_stats=None):
    return make_pi0_pre_post_processors(config, dataset_stats=dataset_stats)
