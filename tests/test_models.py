"""Adapter selection from a checkpoint's config.json, and the tiny-model registry."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, LlamaConfig

from streamprune.errors import ModelError
from streamprune.models import adapter_for, resolve_model_source
from streamprune.models.llava_onevision import LlavaOnevisionAdapter
from streamprune.models.llava_video import LlavaVideoAdapter
from streamprune.models.qwen2_5_vl import Qwen2_5_VLAdapter
from streamprune.models.qwen3_vl import Qwen3VLAdapter
from streamprune.models.smolvlm2 import SmolVLM2Adapter
from streamprune.models.tiny import TINY_MODELS

EXPECTED = {"tiny": LlavaOnevisionAdapter, "tiny-llava-onevision": LlavaOnevisionAdapter,
            "tiny-llava-video": LlavaVideoAdapter, "tiny-qwen2.5-vl": Qwen2_5_VLAdapter,
            "tiny-qwen3-vl": Qwen3VLAdapter, "tiny-smolvlm2": SmolVLM2Adapter}


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_each_tiny_model_gets_its_adapter_from_its_config(name):
    source, local_only = resolve_model_source(name)
    assert local_only
    assert adapter_for(AutoConfig.from_pretrained(source)) is EXPECTED[name]


def test_unsupported_model_type_is_a_clear_error():
    with pytest.raises(ModelError, match=r"unsupported model type 'llama'; supported: .*qwen2_5_vl.*smolvlm"):
        adapter_for(LlamaConfig())


def test_unknown_tiny_name_lists_the_tiny_models():
    with pytest.raises(ModelError, match="unknown tiny model 'tiny-nope'; choose one of: tiny, "):
        resolve_model_source("tiny-nope")
