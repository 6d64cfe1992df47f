"""The pruned lerobot policies keep their device and dtype: a tiny SmolVLA and a tiny pi0 in bf16 produce the same
action chunks, kept sets and importance with meta as the default device (tests/device_checks.py), with pruning
on after the warm-up, for both cuts. And they load where a `Runtime` says."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from policies.loading import load_pruned_policy  # noqa: E402
from policies.pi0_pruned import PI0PrunedConfig, PI0PrunedPolicy  # noqa: E402
from policies.smolvla_pruned import SmolVLAPrunedConfig, SmolVLAPrunedPolicy  # noqa: E402
from policies.tiny_features import PUSHT_INPUTS, PUSHT_OUTPUTS  # noqa: E402
from policies.tiny_pi0 import build_tiny_pi0  # noqa: E402
from policies.tiny_smolvla import build_tiny_smolvla  # noqa: E402
from streamprune.errors import ConfigError  # noqa: E402
from streamprune.policy_eval import PolicyEvalOptions  # noqa: E402
from streamprune.runtime import Runtime  # noqa: E402
from tests.device_checks import assert_on, check_device_discipline  # noqa: E402

CAMERA = "observation.image"


pytestmark = pytest.mark.usefixtures("one_thread")


def chunks(policy, batches: list[dict], noises: list[torch.Tensor]) -> dict:
    """A fresh episode of chunks (the first one warms the importance up, the next ones prune)."""
    policy.reset()
    actions = [policy.predict_action_chunk(dict(b), noise=n) for b, n in zip(batches, noises, strict=True)]
    return {"actions": actions, "kept": dict(policy.last_kept), "scores": policy.last_scores()}


def check_policy(policy, batches, noises, budget: int) -> None:
    out = check_device_discipline(lambda: chunks(policy, batches, noises), "cpu")
    assert_on(out["actions"], "cpu", torch.float32)
    assert_on(out["scores"], "cpu", torch.float32)
    assert out["kept"][CAMERA].shape == (1, budget)  # the last chunk was pruned


@pytest.mark.parametrize("selection", ["vla_pruner", "random"])
@pytest.mark.parametrize("cut", ["before", "inside"])
def test_smolvla_bf16_chunks_make_no_tensor_without_a_device(cut, selection):
    policy, pre, _ = build_tiny_smolvla(SmolVLAPrunedPolicy, SmolVLAPrunedConfig, retain=0.25, cut=cut,
                                        selection=selection, importance_window=1, dtype=torch.bfloat16)
    assert policy.model.vlm_with_expert.vlm.dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    batches = [pre({CAMERA: torch.rand(1, 3, 96, 96, generator=gen), "observation.state": torch.rand(1, 2, generator=gen),
                    "task": ["push the T onto the target"]}) for _ in range(3)]
    noises = [torch.randn(1, 50, 32, generator=gen) for _ in range(3)]
    check_policy(policy, batches, noises, budget=16)


@pytest.mark.parametrize("cut", ["before", "inside"])
def test_pi0_bf16_chunks_make_no_tensor_without_a_device(cut):
    policy, pre, _ = build_tiny_pi0(PI0PrunedPolicy, PI0PrunedConfig, retain=0.25, cut=cut, importance_window=1,
                                    dtype="bfloat16")
    layers = policy.model.paligemma_with_expert.paligemma.model.language_model.layers
    assert layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    batches = [pre({CAMERA: torch.rand(3, 96, 96, generator=gen), "observation.state": torch.rand(2, generator=gen),
                    "task": "push the T block onto the target"}) for _ in range(3)]
    config = policy.config
    noises = [torch.randn(1, config.chunk_size, config.max_action_dim, generator=gen) for _ in range(3)]
    check_policy(policy, batches, noises, budget=64)


def test_policies_load_on_the_runtime_dtype():
    features = {**PUSHT_INPUTS, **PUSHT_OUTPUTS}
    half = Runtime(torch.device("cpu"), torch.bfloat16)
    smolvla, _, _ = load_pruned_policy("smolvla", "tiny", features, half)
    assert smolvla.model.vlm_with_expert.vlm.dtype == torch.bfloat16
    assert smolvla.model.action_out_proj.weight.dtype == torch.float32  # lerobot keeps the expert side in fp32
    pi0, _, _ = load_pruned_policy("pi0", "tiny", features, half)
    assert pi0.config.dtype == "bfloat16" and pi0.config.device == "cpu"
    assert pi0.model.paligemma_with_expert.gemma_expert.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="bfloat16 or float32"):
        load_pruned_policy("pi0", "tiny", features, Runtime(torch.device("cpu"), torch.float16))
    options = PolicyEvalOptions(policy="pi0", env="pusht", device="cpu", dtype="auto")
    assert options.runtime().describe() == {"device": "cpu", "dtype": "float32", "attn_implementation": "eager",
                                            "gpu": None}
    with pytest.raises(ConfigError, match="bfloat16 or float32"):
        PolicyEvalOptions(policy="pi0", env="pusht", dtype="float16").runtime()
