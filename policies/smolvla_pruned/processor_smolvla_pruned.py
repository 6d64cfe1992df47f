"""Processors of `smolvla_pruned`: SmolVLA's own (pruning changes the model, not its inputs). lerobot finds
this by naming convention when a policy is built from its type rather than from a saved folder."""

from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors


def make_smolvla_pruned_pre_post_processors(config, dataset_stats=None):
    return make_smolvla_pre_post_processors(config, dataset_stats=dataset_stats)
