"""Singular-value spectra and energy-based effective rank.

Effective rank at energy p: the smallest r with sum_{i<=r} s_i^2 >= p * sum_i s_i^2,
where s are the singular values of a matrix (a projection weight, or an
activation matrix [tokens, d]). It is the rank a truncated SVD of that matrix
needs to keep a fraction p of its squared Frobenius norm.
"""

from __future__ import annotations

import torch


def energy_rank(singular_values: torch.Tensor, p: float) -> int:
    """Smallest r keeping a fraction `p` of sum(s^2); 0 for an all-zero matrix."""
    energy = singular_values.double().pow(2).sort(descending=True).values
    total = float(energy.sum())
    if total <= 0.0:
        return 0
    cum = energy.cumsum(0) / total
    # the tolerance keeps exact thresholds (e.g. 8 equal values at p = 0.875) stable
    return int((cum < p - 1e-12).sum()) + 1


def energy_ranks(singular_values: torch.Tensor, energies: tuple[float, ...]) -> dict[str, int]:
    """{"0.9": r90, "0.95": r95, ...}."""
    return {f"{p:g}": energy_rank(singular_values, p) for p in energies}


# Eigenvalues below this fraction of the (uncentred) Gram's trace are rounding
# residue of the float64 sums, e.g. what centring leaves of a constant vector.
RESIDUE = 1e-10


def gram_singular_values(gram: torch.Tensor, n: float, reference: torch.Tensor | None = None) -> torch.Tensor:
    """RMS singular values s_i / sqrt(n) of X [n, d] from its Gram matrix X^T X, descending.

    Eigenvalues below RESIDUE x trace(`reference`, default `gram`) count as zero.
    """
    gram = gram.double().cpu()
    floor = RESIDUE * float((gram if reference is None else reference).double().trace())
    eig = torch.linalg.eigvalsh(gram).flip(0)
    eig = torch.where(eig > floor, eig, torch.zeros_like(eig))
    return (eig / max(n, 1.0)).sqrt()


def centred_singular_values(gram: torch.Tensor, col_sum: torch.Tensor, n: float) -> torch.Tensor:
    """RMS singular values of X - mean(X), from the Gram of X and its column sums."""
    centred = gram.double() - torch.outer(col_sum.double(), col_sum.double()) / max(n, 1.0)
    return gram_singular_values(centred, n, reference=gram)


def weight_singular_values(weight: torch.Tensor, num_heads: int, head_dim: int) -> list[torch.Tensor]:
    """Singular values of each head's slice (rows h*d:(h+1)*d) of a q/k/v projection weight."""
    w = weight.detach().double().cpu()
    return [torch.linalg.svdvals(w[h * head_dim : (h + 1) * head_dim]) for h in range(num_heads)]
