"""The KV cache's name across the supported transformers releases: `past_key_values` up to 5.2x, `cache` from
then on (model and decoder-layer arguments, and model outputs; the old argument is deprecated, not removed)."""

from __future__ import annotations

import inspect
from functools import cache as _memo

import torch


@_memo
def _takes_cache(forward_owner: type) -> bool:
    return "cache" in inspect.signature(forward_owner.forward).parameters


def cache_kwargs(module: torch.nn.Module, kv_cache) -> dict:
    """{argument name: kv_cache} for calling `module` (a model or decoder) with a KV cache."""
    return {"cache" if _takes_cache(type(module)) else "past_key_values": kv_cache}


def layer_cache(kwargs: dict):
    """The KV cache a decoder layer (or its attention) was called with, from a pre-hook's kwargs."""
    return kwargs["cache"] if kwargs.get("cache") is not None else kwargs.get("past_key_values")


def output_cache(output):
    """The KV cache a model's output (or `generate`'s, with return_dict_in_generate) carries."""
    found = getattr(output, "cache", None)
    return found if found is not None else getattr(output, "past_key_values", None)


def crop_cache(kv_cache, length: int) -> None:
    """Keep the first `length` entries of every layer of a cache whose layers are equally long. `crop(n)` with a
    negative n (remove that many) means the same on every supported release; a positive one (keep that many) is
    refused from transformers 5.2x."""
    extra = kv_cache.get_seq_length() - length
    if extra > 0:
        kv_cache.crop(-extra)
