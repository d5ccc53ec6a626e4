"""`joint`: one key latent shared by a group of S KV heads (the inter-head structure).

Keys of different KV heads of a layer are linearly related (arXiv 2603.13314
reports R² ≈ 0.76 from a few peer heads; `thinkv analyze` measured 0.66 on
SmolLM2), which per-head bases cannot use. Per share group s, stack the
post-RoPE keys of its S KV heads, k = [k_1; …; k_S] (S·d), and cache one latent
z = Wᵀk of R = S·r dims, split across the group's S KV-head slots (r each: the
same bytes as per-head rank r). Query head h of KV head g scores q̃_hᵀz with
q̃_h = B_gᵀq_h.

The query-aware objective (as `pca`'s, attention-weighted keys):
minimise Σ_h E|q_hᵀ(E_g − B_g Wᵀ)k|², E_g selecting head g's block of k.
For a fixed W the best B_g is E_g C_k W(WᵀC_kW)⁻¹, the same for every query
head of KV head g, and the removed error is tr(Uᵀ M U) with U = C_k^{1/2}W
(orthonormalised) and M = C_k^{1/2} blockdiag(C_q,1 … C_q,S) C_k^{1/2}, C_q,g
summed over g's query heads. So it is exactly `lowrank.query_aware_factor` of
(blockdiag(C_q,g), C_k): W = C_k^{-1/2}V_R, B = C_k^{1/2}V_R with B_g its g-th
d-row block, exact at R = S·d (B Wᵀ = I). Statistics: `LayerStats.ck_joint`
(the stacked keys weighted by the attention a token receives, averaged over the
KV heads) and `cq_post`.

Cost: each query head dots S·r dims per key instead of r (S× the QK work of
per-head rank r, the same cache traffic); `share_group` bounds it, and
S·r ≤ 256 (the kernels' query/key width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm_thinkv.compress.base import LayerFit, Method, ModelInfo
from vllm_thinkv.compress.calibrate import LayerStats
from vllm_thinkv.compress.lowrank import Factor, query_aware_factor
from vllm_thinkv.errors import ThinKVError


class JointFit(LayerFit):
    """One factor per share group; `rank` is the per-KV-head slot width r (R = S·r)."""

    def __init__(self, factors: list[Factor], share_group: int, head_dim: int):
        self.factors, self.share, self.d = factors, share_group, head_dim

    def error(self, rank: int) -> float:
        return float(sum(f.mu[self.share * rank :].sum() for f in self.factors))

    def tensors(self, attn: nn.Module, rank: int) -> dict[str, torch.Tensor]:
        dtype, width, d = attn.q_proj.weight.dtype, self.share * rank, self.d
        keys, queries = zip(*(f.columns(width) for f in self.factors))
        # q_basis [Hkv, d, S·r]: KV head g = s·S + j takes rows j·d..(j+1)·d of its group's query side
        q_basis = [b[j * d : (j + 1) * d] for b in queries for j in range(self.share)]
        return {"q_basis": torch.stack(q_basis).to(dtype), "k_basis": torch.stack(keys).to(dtype)}


@dataclass
class Joint(Method):
    """`share_group`: KV heads per latent (must divide the layer's KV heads)."""

    share_group: int = 1
    name = "joint"

    def fit(self, stats: LayerStats, info: ModelInfo, form: str) -> JointFit:
        if stats.ck_joint is None:
            raise ThinKVError("method 'joint' needs the stacked key statistics (ck_joint): recollect the statistics "
                              "with this version of vllm-thinkv")
        s, d = self.share_group, info.head_dim
        if info.num_kv_heads % s:
            raise ThinKVError(f"share_group {s} does not divide the model's {info.num_kv_heads} KV heads")
        factors = []
        for first in range(0, info.num_kv_heads, s):
            heads = slice(first * d, (first + s) * d)
            cq = torch.block_diag(*stats.cq_post[first : first + s])
            factors.append(query_aware_factor(cq, stats.ck_joint[heads, heads], group=s * info.group))
        return JointFit(factors, s, d)

    def params(self) -> dict:
        return {"share_group": self.share_group}
