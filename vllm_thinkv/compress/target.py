"""Per-layer ranks for a quality target: the fewest cache bytes that meet it.

Two targets (`CompressRequest.target_logit_error` / `target_ppl_increase`):

* predicted relative logit error: each fit predicts the logit mean-squared
  error it leaves at every rank (`LayerFit.error`) and the layer's total
  (rank 0); greedy water-filling adds 8 dims at a time to the layer whose
  predicted error drops most until Σ error / Σ total ≤ the target. Free (no
  forward pass), but a logit error is not a quality a user can read.
* held-out perplexity increase: the greedy path above orders every mean rank
  (a nested family of per-layer rank vectors); a bisection over mean ranks
  builds each thin model and measures its perplexity on held-out windows (the
  calibration text's last quarter, not used for fitting) against the
  original's. log2(levels) evaluations: 3 for d = 64, 4 for d = 128.

Both report the KV capacity the ranks buy: Σ 2d / Σ (r_l + d) over layers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from vllm_thinkv.compress.base import LayerFit
from vllm_thinkv.compress.ranks import allocate_ranks
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels.checks import QK_MULTIPLE

log = logging.getLogger(__name__)


def capacity_gain(ranks: Sequence[int], head_dim: int) -> float:
    """KV tokens that fit the same memory, thin over original: Σ 2d / Σ (r_l + d)."""
    return 2 * head_dim * len(ranks) / sum(r + head_dim for r in ranks)


def relative_error(fits: Sequence[LayerFit], ranks: Sequence[int]) -> float:
    """Predicted logit error left at `ranks` over the model's total logit energy (error at rank 0)."""
    total = sum(f.error(0) for f in fits)
    return sum(f.error(r) for f, r in zip(fits, ranks)) / max(total, 1e-300)


def ranks_for_logit_error(fits: Sequence[LayerFit], target: float, top: int, step: int = QK_MULTIPLE) -> list[int]:
    """The smallest mean rank (greedy allocation) whose predicted relative logit error is <= target."""
    for budget in range(step, top + 1, step):
        ranks = allocate_ranks(fits, budget, top, step)
        if relative_error(fits, ranks) <= target:
            return ranks
    raise ThinKVError(f"no ranks up to {top} meet a predicted relative logit error of {target:g} "
                      f"(at {top}: {relative_error(fits, [top] * len(fits)):.3g})")


@dataclass
class PplSearch:
    """What the bisection measured: mean rank -> held-out PPL, and the original's."""

    original: float
    measured: dict[int, float]


def ranks_for_ppl_increase(
    fits: Sequence[LayerFit],
    target: float,
    top: int,
    thin_ppl: Callable[[list[int]], float],
    original_ppl: float,
    step: int = QK_MULTIPLE,
) -> tuple[list[int], PplSearch]:
    """The smallest mean rank (greedy allocation; bisection, assuming PPL falls with rank) whose
    `thin_ppl(ranks)` is <= (1 + target) x original_ppl."""
    levels = list(range(step, top + 1, step))
    limit = (1 + target) * original_ppl
    search = PplSearch(original_ppl, {})

    def ok(budget: int) -> bool:
        if budget not in search.measured:
            search.measured[budget] = thin_ppl(allocate_ranks(fits, budget, top, step))
            log.info("mean rank %d: held-out PPL %.3f (original %.3f, limit %.3f)", budget,
                     search.measured[budget], original_ppl, limit)
        return search.measured[budget] <= limit

    lo, hi = 0, len(levels) - 1
    if not ok(levels[hi]):
        raise ThinKVError(f"no ranks up to {top} meet a PPL increase of {target:.1%}: at mean rank {top} the held-out "
                          f"PPL is {search.measured[levels[hi]]:.3f} against {original_ppl:.3f} for the original")
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(levels[mid]):
            hi = mid
        else:
            lo = mid + 1
    return allocate_ranks(fits, levels[lo], top, step), search


def thin_ppl_function(model: nn.Module, fits: Sequence[LayerFit], cfg_for: Callable[[list[int]], object],
                      windows) -> Callable[[list[int]], float]:
    """ranks -> PPL of the thin model (a copy of `model`) on `windows`."""
    from vllm_thinkv.eval.ppl import perplexity
    from vllm_thinkv.hf.capture import attention_modules
    from vllm_thinkv.hf.thin_model import make_thin

    def run(ranks: list[int]) -> float:
        tensors = {}
        for i, (attn, fit, r) in enumerate(zip(attention_modules(model), fits, ranks)):
            for name, t in fit.tensors(attn, r).items():
                tensors[f"model.layers.{i}.self_attn.{name}"] = t.contiguous()
        thin = make_thin(copy.deepcopy(model), cfg_for(ranks), tensors)
        return perplexity(thin, windows, progress=False).ppl

    return run
