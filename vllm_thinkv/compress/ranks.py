"""Per-layer rank allocation under a mean-rank budget (`--rank-budget AVG`).

Each layer's fit predicts its logit error at every allowed rank (multiples of 8
up to d). Greedy water-filling: start every layer at the smallest rank and
repeatedly give 8 more dims to the layer whose predicted error drops most,
until the mean rank equals the budget. The error curves are convex (tail sums
of sorted eigenvalues / pair scores), so greedy is optimal for the prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm_thinkv.compress.base import LayerFit
from vllm_thinkv.kernels.checks import QK_MULTIPLE
from vllm_thinkv.errors import ThinKVError


def allocate_ranks(fits: Sequence[LayerFit], budget: int, head_dim: int, step: int = QK_MULTIPLE) -> list[int]:
    """Ranks (multiples of `step` in [step, head_dim]) with mean exactly `budget`."""
    if budget % step or not step <= budget <= head_dim:
        raise ThinKVError(f"rank budget {budget} must be a multiple of {step} in [{step}, {head_dim}]")
    levels = list(range(step, head_dim + 1, step))
    curves = [[fit.error(r) for r in levels] for fit in fits]
    idx = [0] * len(fits)
    for _ in range(len(fits) * (levels.index(budget))):
        gains = [
            (curves[i][idx[i]] - curves[i][idx[i] + 1]) if idx[i] + 1 < len(levels) else float("-inf")
            for i in range(len(fits))
        ]
        best = max(range(len(fits)), key=gains.__getitem__)
        idx[best] += 1
    return [levels[i] for i in idx]
