"""Query-aware low-rank factorisation of a q·k bilinear form (KQ-SVD objective).

Given second moments C_q = E[q qᴴ] (summed over the query heads sharing the
basis) and C_k = E[k kᴴ], find key vectors A and query vectors B (columns) so
that the thin logit ``(Bᴴq)ᴴ(Aᴴk) = qᴴ B Aᴴ k`` approximates ``qᴴk`` with the
least expected squared error ``E|qᴴ(I − BAᴴ)k|²`` over independent q, k.
With S = C_k^{1/2} and V the eigenvectors of S C_q S (eigenvalues μ, descending),
A = S⁻¹V and B = SV; keeping r directions leaves an error of Σ_{j>r} μ_j
(Eckart–Young in the whitened key space). For all directions B Aᴴ = I,
whatever the conditioning, up to rounding; `Factor.columns` hands out the
identity pair at full width instead, so r = d reproduces the model exactly.

Works for real symmetric (post-RoPE, `pca`) and complex Hermitian (rotary-pair
view, `svd`) statistics alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factor:
    """Directions sorted by importance: eigenvalues μ [n] (the logit error each one
    removes), key vectors A [n, n] and query vectors B [n, n] (columns)."""

    mu: torch.Tensor
    keys: torch.Tensor
    queries: torch.Tensor

    def columns(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and query vectors [n, width] of the `width` most important directions.
        At full width the identity pair instead: r = d is the identity compression, and
        B Aᴴ = I holds for the factor only up to the rounding of the model's dtype
        (~1e-6 relative in float32, worse in bf16), for the identity exactly."""
        n = self.keys.shape[0]
        if width == n:
            eye = torch.eye(n, dtype=self.keys.dtype, device=self.keys.device)
            return eye, eye.clone()
        return self.keys[:, :width], self.queries[:, :width]


def _hermitian_sqrt(c: torch.Tensor, rel_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    lam, u = torch.linalg.eigh(c)
    floor = rel_eps * lam.clamp(min=0).mean().clamp(min=torch.finfo(lam.dtype).tiny)
    lam = lam.clamp(min=floor)
    s = (u * lam.sqrt().to(u.dtype)) @ u.mH
    s_inv = (u * lam.rsqrt().to(u.dtype)) @ u.mH
    return s, s_inv


def query_aware_factor(cq: torch.Tensor, ck: torch.Tensor, group: int = 1, rel_eps: float = 1e-6) -> Factor:
    """Factor one head's form. `cq`, `ck` [n, n] (float64 or complex128).

    `rel_eps` floors C_k's eigenvalues at rel_eps × their mean: a never-seen key
    direction is treated as barely used instead of dividing by zero; it does not
    change B Aᴴ = I at full rank.

    Each direction is balanced (A's column scaled by c, B's by 1/c) so that the
    thin key and the thin query of one head have equal second moments: the cached
    values stay in a sensible range for low-precision caches. The key side is
    measured against the floored C_k that S whitens, under which every column of
    S⁻¹V has unit second moment (VᴴS⁻¹C_kS⁻¹V = I), so c = (μ/group)^¼. Measuring it
    against the raw C_k instead (issue 19) divided by ~0 along key directions that
    are exactly zero (Gemma 3's q/k norms zero whole rotary pairs): c reached 1e73,
    the basis overflowed float32 and r = d gave NaN logits.
    """
    s, s_inv = _hermitian_sqrt(ck, rel_eps)
    m = s @ cq @ s
    m = (m + m.mH) / 2
    mu, v = torch.linalg.eigh(m)
    mu, v = mu.flip(0).clamp(min=0), v.flip(1)
    keys, queries = s_inv @ v, s @ v
    q_var = mu / group  # thin query second moments; the thin keys' are 1 (see above)
    c = q_var.clamp(min=max(float(q_var.max()) * 1e-12, 1e-300)) ** 0.25
    return Factor(mu=mu, keys=keys * c.to(keys.dtype), queries=queries / c.to(queries.dtype))
