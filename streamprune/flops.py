"""Prefill FLOPs of a decoder-only LLM, counted two ways.

`prefill_flops` counts what the real architecture does (2 FLOPs per multiply-add): grouped K/V heads,
the 3-matrix SwiGLU MLP, causal attention (only the lower triangle of scores), the LM head on the last
token only (as `generate` runs it). On this CPU measured prefill time tracks this count within ~10%.

`fastv_prefill_flops` is the formula FastV/HoliTom/DivPrune publish, T·(4nd² + 2n²d + 2ndm) in
multiply-adds. It assumes full multi-head attention, a 2-matrix FFN and non-causal attention, so it
overstates the gain of removing tokens; report it only to compare with the papers.

`tokens` is either one length for all layers or one length per layer (inner-LLM reduction).
"""

from __future__ import annotations

from collections.abc import Sequence


def _per_layer(tokens: int | Sequence[int], num_layers: int) -> list[int]:
    if isinstance(tokens, int):
        return [tokens] * num_layers
    if len(tokens) != num_layers:
        raise ValueError(f"need one token count per layer ({num_layers}), got {len(tokens)}")
    return list(tokens)


def prefill_flops(text_config, tokens: int | Sequence[int]) -> float:
    """Real-architecture prefill FLOPs for `tokens` (one count, or one per decoder layer)."""
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    m = text_config.intermediate_size
    total = 0.0
    for n in _per_layer(tokens, text_config.num_hidden_layers):
        linear = 2 * n * d * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 3 * 2 * n * d * m
        attention = 2 * heads * head_dim * n * (n + 1)  # QKᵀ and AV over the causal triangle
        total += linear + attention
    return total + 2 * d * text_config.vocab_size


def fastv_prefill_flops(text_config, tokens: int | Sequence[int]) -> float:
    """The papers' prefill formula, Σ_layers 4nd² + 2n²d + 2ndm (multiply-adds)."""
    d, m = text_config.hidden_size, text_config.intermediate_size
    return float(sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m
                     for n in _per_layer(tokens, text_config.num_hidden_layers)))


def kv_cache_bytes_per_token(text_config, bytes_per_value: int = 4) -> int:
    """K and V for one token across all layers (fp32 by default)."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return 2 * text_config.num_hidden_layers * kv_heads * head_dim * bytes_per_value


def vision_flops(width: int, mlp_width: int, counts: Sequence[tuple[int, int, int]]) -> float:
    """FLOPs of a ViT encoder run (2 per multiply-add) from per-layer token counts.

    counts: one (queries, keys, mlp_tokens) per layer — queries get q/k/v/out projections and attend over
    `keys` (more than the queries when cached context keys join), then `mlp_tokens` (fewer after a merge
    between attention and MLP) go through the 2-matrix MLP. Merging's own similarity work is not counted.
    """
    total = 0.0
    for queries, keys, mlp_tokens in counts:
        total += 2 * queries * 4 * width * width + 2 * 2 * queries * keys * width
        total += 2 * mlp_tokens * 2 * width * mlp_width
    return total
