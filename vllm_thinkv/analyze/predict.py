"""Inter-head linear predictability (the "2-5 peer heads" claim, arXiv 2603.13314).

For a target head t and a set S of other heads of the same layer, fit
x_t ~ [x_S, 1] W by least squares on the fit split and score it on the held-out
split with

    R^2 = 1 - SSE / SST,   SSE = sum over tokens and all d dims of |x_t - x_hat_t|^2,
                           SST = sum over tokens and all d dims of |x_t - mean_heldout(x_t)|^2.

References are chosen greedily (add the head that most raises the fit-split
R^2), so the held-out R^2 is an honest out-of-sample number. Everything is
computed from the Gram matrices of `stats.LayerStats`: no activations stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Relative ridge added to the normal equations: only guards exactly collinear
# references (e.g. a head that is itself a combination of two others).
RIDGE = 1e-10


@dataclass
class HeadPrediction:
    """Greedy references of one target head and R^2 after each added reference."""

    refs: list[int]
    r2_fit: list[float]
    r2_heldout: list[float]


def _cols(heads: list[int], d: int, bias: int) -> list[int]:
    return [c for h in heads for c in range(h * d, (h + 1) * d)] + [bias]


def _solve(gram: torch.Tensor, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Ridge-guarded normal equations for every candidate set at once: f [B, m] -> beta [B, m, d]."""
    g_ff = gram[f[:, :, None], f[:, None, :]]
    g_ft = gram[f[:, :, None], t[None, None, :]]
    scale = g_ff.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None]
    eye = torch.eye(f.shape[1], dtype=gram.dtype)
    return torch.linalg.solve(g_ff + RIDGE * scale * eye, g_ft), g_ft


def _sst(gram: torch.Tensor, t: torch.Tensor) -> float:
    s = gram[-1, t]
    return float(gram[t][:, t].diagonal().sum() - s.dot(s) / gram[-1, -1])


def _sse(gram: torch.Tensor, f: torch.Tensor, t: torch.Tensor, beta: torch.Tensor) -> float:
    """sum |y - X beta|^2 = tr(Y'Y) - 2 tr(B' X'Y) + tr(B' X'X B), from the Gram of [X | Y]."""
    g_ff, g_ft = gram[f][:, f], gram[f][:, t]
    return float(gram[t][:, t].diagonal().sum() - 2 * (beta * g_ft).sum() + (beta * (g_ff @ beta)).sum())


def _r2(sse: float, sst: float) -> float:
    return 1.0 - sse / sst if sst > 0 else float("nan")


def greedy_predictability(
    fit: torch.Tensor, heldout: torch.Tensor, num_heads: int, head_dim: int, max_refs: int
) -> list[HeadPrediction]:
    """For every head, greedy references k = 1..min(max_refs, num_heads - 1) and their R^2.

    `fit`, `heldout`: Gram matrices of [x_0 | ... | x_{H-1} | 1] on each split.
    """
    fit, heldout = fit.double().cpu(), heldout.double().cpu()
    bias = fit.shape[0] - 1
    out = []
    for target in range(num_heads):
        t = torch.tensor(_cols([target], head_dim, bias)[:-1])
        sst_fit, sst_held = _sst(fit, t), _sst(heldout, t)
        tr_fit = float(fit[t][:, t].diagonal().sum())
        pred = HeadPrediction(refs=[], r2_fit=[], r2_heldout=[])
        for _ in range(min(max_refs, num_heads - 1)):
            candidates = [h for h in range(num_heads) if h != target and h not in pred.refs]
            f = torch.tensor([_cols(pred.refs + [c], head_dim, bias) for c in candidates])
            beta, g_ft = _solve(fit, f, t)
            sse_fit = tr_fit - (beta * g_ft).sum((1, 2))  # at the least-squares optimum
            best = int(torch.argmin(sse_fit))  # ties: the lowest head index
            pred.refs.append(candidates[best])
            pred.r2_fit.append(_r2(float(sse_fit[best]), sst_fit))
            pred.r2_heldout.append(_r2(_sse(heldout, f[best], t, beta[best]), sst_held))
        out.append(pred)
    return out
