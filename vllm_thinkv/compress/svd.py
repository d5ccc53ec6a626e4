"""`svd`: the Thin Keys recipe — a low-rank factorisation of the key projection folded
into the query projection, with RoPE applied in the r-dim space — made RoPE-aware.

How RoPE is handled. View each head's pre-RoPE q, k as d/2 complex numbers
(pair i = dims i, i + d/2); RoPE multiplies pair i by e^{jθ_i t}. A *complex*
linear map commutes with multiplying every coordinate by the same phase, so a
factorisation that only mixes pairs of (nearly) the same frequency survives
RoPE. Per KV head we

1. split the pairs by frequency: the *slow* pairs, which turn by at most
   `max_phase` radians over `horizon` tokens, are treated as position-free;
   the others form bands of adjacent frequencies no further apart than
   max_phase / horizon (mostly single pairs);
2. factor each band's complex q·k form, and the slow dims' real q·k form,
   query-aware from pre-RoPE statistics (`lowrank.query_aware_factor`; the
   KQ-SVD objective; these statistics do not depend on positions);
3. keep the r/2 thin pairs that remove the most logit error: one complex
   direction of a band, or two real directions of the slow dims; a band kept
   whole keeps its original pairs instead, so r = d is exact;
4. fold them into the weights: thin k = Aᵀk (the key side of the factorisation,
   in k_proj), thin q = Bᵀq (the query side, folded into q_proj). A band
   direction rotates at the average of its pairs' frequencies weighted by
   |a_i|·|b_i|; a slow pair at frequency 0. Both go into `rope_inv_freq`.

With single-pair bands and no slow dims this is exactly `pairs` (rescaled).
The approximation errors are the merged/zeroed frequencies (bounded by
`max_phase` over the horizon) and the truncation; the QK fine-tune
(`thinkv finetune`) absorbs what it can. Form: rope_subspace (no run-time
projection, unlike `pca`). Qwen3 is refused (its k_norm sits between k_proj
and RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm_thinkv.compress.base import LayerFit, Method, ModelInfo, head_rows
from vllm_thinkv.compress.calibrate import LayerStats, complex_pairs
from vllm_thinkv.compress.lowrank import query_aware_factor


def frequency_bands(theta: torch.Tensor, max_phase: float, horizon: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(slow, bands): `slow` = pairs that turn by at most `max_phase` over `horizon`
    tokens (treated as position-free); `bands` = the other pairs in runs of adjacent
    frequencies spanning at most max_phase / horizon."""
    limit = max_phase / horizon
    slow = (theta <= limit).nonzero().flatten()
    order = [int(i) for i in theta.argsort() if theta[i] > limit]  # slowest first
    bands: list[list[int]] = []
    for i in order:
        if bands and (theta[i] - theta[bands[-1][0]]) <= limit:
            bands[-1].append(i)
        else:
            bands.append([i])
    return slow, [torch.tensor(sorted(b)) for b in bands]


@dataclass
class _ThinPair:
    """One thin rotary pair: real vectors on a head's pre-RoPE q/k (d) for its x and y
    slots, key side (ax, ay) and query side (bx, by), its frequency, and the
    logit mean-squared error it removes."""

    value: float
    group: int  # index of the band it comes from (-1: the slow band)
    ax: torch.Tensor
    ay: torch.Tensor
    bx: torch.Tensor
    by: torch.Tensor
    omega: float


def _complex_to_real(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex [m] vector v -> real [d] vectors computing Re and Im of vᴴ(x + j·y)."""
    return torch.cat([v.real, v.imag]), torch.cat([-v.imag, v.real])


def _unit(d: int, i: int) -> torch.Tensor:
    e = torch.zeros(d, dtype=torch.float64)
    e[i] = 1
    return e


class _HeadFit:
    """All candidate thin pairs of one KV head, most valuable first."""

    def __init__(self, cq: torch.Tensor, ck: torch.Tensor, theta: torch.Tensor, slow: torch.Tensor,
                 bands: list[torch.Tensor], group: int):
        d = cq.shape[-1]
        m = d // 2
        self.theta, self.slow, self.bands, self.d = theta.double(), slow, bands, d
        self.candidates: list[_ThinPair] = []
        cq_c, ck_c = complex_pairs(cq), complex_pairs(ck)
        for bi, idx in enumerate(bands):  # complex factorisation, commutes with the band's rotation
            f = query_aware_factor(cq_c[idx][:, idx], ck_c[idx][:, idx], group)
            for j in range(idx.numel()):
                a = torch.zeros(m, dtype=cq_c.dtype)
                b = torch.zeros(m, dtype=cq_c.dtype)
                a[idx], b[idx] = f.keys[:, j], f.queries[:, j]
                w = a.abs() * b.abs()
                omega = float((w * self.theta).sum() / w.sum()) if float(w.sum()) > 0 else float(self.theta[idx].mean())
                (ax, ay), (bx, by) = _complex_to_real(a), _complex_to_real(b)
                # a complex direction's real logit error is half its complex one
                self.candidates.append(_ThinPair(float(f.mu[j]) / 2, bi, ax, ay, bx, by, omega))
        if slow.numel():  # real factorisation of the (nearly) position-free dims, two directions per thin pair
            dims = torch.cat([slow, slow + m])
            f = query_aware_factor(cq[dims][:, dims], ck[dims][:, dims], group)
            for j in range(0, dims.numel(), 2):
                vecs = []
                for col in (f.keys[:, j], f.keys[:, j + 1], f.queries[:, j], f.queries[:, j + 1]):
                    v = torch.zeros(d, dtype=torch.float64)
                    v[dims] = col
                    vecs.append(v)
                self.candidates.append(_ThinPair(float(f.mu[j] + f.mu[j + 1]), -1, *vecs[:2], *vecs[2:], 0.0))
        self.candidates.sort(key=lambda c: -c.value)

    def error(self, rank: int) -> float:
        return sum(c.value for c in self.candidates[rank // 2 :])

    def thin_pairs(self, rank: int) -> list[_ThinPair]:
        """The kept thin pairs, fastest first; a band (or the slow band) kept whole keeps
        its original rotary pairs instead, so that r = d is exact."""
        chosen = self.candidates[: rank // 2]
        sizes = {bi: idx.numel() for bi, idx in enumerate(self.bands)} | {-1: self.slow.numel()}
        counts: dict[int, int] = {}
        for c in chosen:
            counts[c.group] = counts.get(c.group, 0) + 1
        out = [c for c in chosen if counts[c.group] < sizes[c.group]]
        m = self.d // 2
        for gi, n in counts.items():
            if n == sizes[gi]:
                for i in (self.slow if gi == -1 else self.bands[gi]).tolist():
                    ex, ey = _unit(self.d, i), _unit(self.d, i + m)
                    out.append(_ThinPair(0.0, gi, ex, ey, ex, ey, float(self.theta[i])))
        return sorted(out, key=lambda c: -c.omega)


def fold(weight: torch.Tensor, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """Thin rows of one head, neox layout [x slots; y slots]: weight [d, ...] (rows, or a bias [d])."""
    return torch.stack(xs + ys).to(torch.float64) @ weight.double()


class SvdFit(LayerFit):
    def __init__(self, heads: list[_HeadFit], info: ModelInfo):
        self.heads, self.info = heads, info

    def error(self, rank: int) -> float:
        return float(sum(h.error(rank) for h in self.heads))

    def tensors(self, attn: nn.Module, rank: int) -> dict[str, torch.Tensor]:
        info, d = self.info, self.info.head_dim
        pairs = [h.thin_pairs(rank) for h in self.heads]
        rows = torch.arange(d)

        def side(param: torch.Tensor, heads: int, key: bool) -> torch.Tensor:
            parts = []
            for h in range(heads):
                tp = pairs[h if key else h // info.group]
                xs = [p.ax if key else p.bx for p in tp]
                ys = [p.ay if key else p.by for p in tp]
                parts.append(fold(param.detach()[head_rows(h, d, rows)], xs, ys))
            return torch.cat(parts).to(param.dtype)

        out = {
            "q_proj.weight": side(attn.q_proj.weight, info.num_heads, key=False),
            "k_proj.weight": side(attn.k_proj.weight, info.num_kv_heads, key=True),
            "rope_inv_freq": torch.tensor([[p.omega for p in tp] for tp in pairs], dtype=torch.float32),
        }
        if attn.q_proj.bias is not None:
            out["q_proj.bias"] = side(attn.q_proj.bias, info.num_heads, key=False)
            out["k_proj.bias"] = side(attn.k_proj.bias, info.num_kv_heads, key=True)
        return out


@dataclass
class Svd(Method):
    """`max_phase` (radians) and `horizon` (tokens, default: the model's
    max_position_embeddings): pairs turning by less than max_phase over the
    horizon are treated as position-free, and merged frequencies may drift apart
    by at most that much."""

    max_phase: float = 4.0
    horizon: int | None = None
    name = "svd"

    def fit(self, stats: LayerStats, info: ModelInfo, form: str) -> SvdFit:
        horizon = self.horizon or info.max_positions
        slow, bands = frequency_bands(info.inv_freq.double(), self.max_phase, horizon)
        return SvdFit(
            [_HeadFit(stats.cq_pre[g], stats.ck_pre[g], info.inv_freq, slow, bands, info.group) for g in range(info.num_kv_heads)],
            info,
        )

    def params(self) -> dict:
        return {"max_phase": self.max_phase, "horizon": self.horizon}
