"""`pairs`: keep r/2 of the d/2 rotary frequency pairs per KV head. Training-free, exact under RoPE.

Pair i (dims i and i + d/2 in HF's rotate_half layout) contributes
``Re(conj(q_i) k_i e^{jθ_i Δ})`` to q·k. Its score is the expected squared
contribution, ``E|q_i|² · E|k_i|²`` (summed over the group's query heads;
identical before and after RoPE, since RoPE only rotates a pair). Dropping the
lowest-scoring pairs removes the least logit energy; the thin model keeps the
kept pairs' original frequencies, so what is kept is computed exactly.

Output: the kept rows of q_proj/k_proj (and biases) plus `rope_inv_freq`
(form rope_subspace), or, on Qwen3 whose per-head norm needs the full head,
a 0/1 selection basis applied after RoPE (form post_rope_projection).
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_thinkv.compress.base import LayerFit, Method, ModelInfo, head_rows, selection_basis
from vllm_thinkv.compress.calibrate import LayerStats


class PairsFit(LayerFit):
    def __init__(self, scores: torch.Tensor, info: ModelInfo, form: str):
        self.scores = scores  # [Hkv, d/2]
        self.order = scores.argsort(dim=1, descending=True)
        self.info = info
        self.form = form

    def kept(self, kv_head: int, rank: int) -> torch.Tensor:
        """Kept pair indices of a KV head, in the original (frequency) order."""
        return self.order[kv_head, : rank // 2].sort().values

    def error(self, rank: int) -> float:
        return float(self.scores.gather(1, self.order[:, rank // 2 :]).sum()) / 2  # real-logit MSE

    def tensors(self, attn: nn.Module, rank: int) -> dict[str, torch.Tensor]:
        info, d, m = self.info, self.info.head_dim, self.info.head_dim // 2
        kept = [self.kept(g, rank) for g in range(info.num_kv_heads)]
        if self.form == "post_rope_projection":
            dtype = attn.q_proj.weight.dtype
            basis = torch.stack([selection_basis(k, d, dtype) for k in kept])
            return {"q_basis": basis, "k_basis": basis.clone()}
        dims = [torch.cat([k, k + m]) for k in kept]
        q_rows = torch.cat([head_rows(h, d, dims[h // info.group]) for h in range(info.num_heads)])
        k_rows = torch.cat([head_rows(g, d, dims[g]) for g in range(info.num_kv_heads)])
        out = {
            "q_proj.weight": attn.q_proj.weight.detach()[q_rows].clone(),
            "k_proj.weight": attn.k_proj.weight.detach()[k_rows].clone(),
            "rope_inv_freq": torch.stack([info.inv_freq[k] for k in kept]).float(),
        }
        if attn.q_proj.bias is not None:
            out["q_proj.bias"] = attn.q_proj.bias.detach()[q_rows].clone()
            out["k_proj.bias"] = attn.k_proj.bias.detach()[k_rows].clone()
        return out


class Pairs(Method):
    name = "pairs"

    def fit(self, stats: LayerStats, info: ModelInfo, form: str) -> PairsFit:
        m = info.head_dim // 2
        q_diag = stats.cq_pre.diagonal(dim1=-2, dim2=-1)  # [Hkv, d]
        k_diag = stats.ck_pre.diagonal(dim1=-2, dim2=-1)
        q_energy, k_energy = q_diag[:, :m] + q_diag[:, m:], k_diag[:, :m] + k_diag[:, m:]  # E|q_i|², E|k_i|²
        return PairsFit(q_energy * k_energy, info, form)
