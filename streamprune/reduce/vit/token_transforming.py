"""Token Transforming (Zeng, Yu, Kong & Tang, 2025): token reduction as a many-to-many matrix Y = W·X.

Pruning (one-to-one) and merging (many-to-one) are special forms of W; Token Transforming lets a removed
token feed several kept ones, keeping more of its information. Between a layer's attention and MLP:
- kept tokens: the L − r that receive the most attention (head mean, mean over queries: SigLIP has no
  [CLS] token whose row the paper could use);
- each removed token is spread over its k most similar kept tokens (cosine of the keys), with weights
  softmax(similarity / τ) over those k; each kept token keeps itself with weight 1;
- every output is the size-weighted mean of what it receives (so sizes, and proportional attention, stay
  exact for duplicates).

Adaptation: the paper's matrix construction (its temperature, sparsity and schedule) could not be read
offline; k = 4 and τ = 0.1 are our defaults, and the schedule is the shared constant one. The unifying
framework and the many-to-many form are the paper's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamprune.reduce.vit.transform import TokenTransform, route

PAPER = "Zeng, Yu, Kong & Tang, Token Transforming: A Unified and Training-Free Token Compression Framework, 2025"
TOP_K = 4
TEMPERATURE = 0.1


def token_transforming(metric: torch.Tensor, r: int, *, attention: torch.Tensor, top_k: int = TOP_K,
                       temperature: float = TEMPERATURE, **_: object) -> TokenTransform:
    """Remove r tokens. metric [B, L, d] keys (head mean); attention [B, h, L, L]."""
    b, length, _ = metric.shape
    received = attention.mean(1).mean(-2)  # [B, L]
    removed = torch.zeros(b, length, dtype=torch.bool, device=metric.device)
    removed.scatter_(1, received.topk(r, -1, largest=False).indices, True)
    unit = F.normalize(metric.float(), dim=-1)
    similar = (unit @ unit.transpose(1, 2)).masked_fill(removed[:, None, :], -float("inf"))  # [B, L, L]: to kept
    step = route(removed, similar.argmax(-1), r)
    kept_sim = similar.gather(2, step.kept[:, None, :].expand(-1, length, -1))  # [B, L, L'] token → kept token
    k = min(top_k, step.num_out)
    top = kept_sim.topk(k, -1)
    spread = torch.zeros_like(kept_sim).scatter_(-1, top.indices, torch.softmax(top.values / temperature, -1))
    weights = (spread * removed[..., None]).transpose(1, 2)  # [B, L', L]: removed tokens only
    weights.scatter_(2, step.kept[..., None], 1.0)
    step.weights = weights
    return step
