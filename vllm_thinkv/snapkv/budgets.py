"""A request's own SnapKV budget (plain Python): read from its extra_args and
resolved against the deployment's settings by the one rule (`kept_len`) that
the engine core's KV manager and the worker's tracker both apply.

    {"thinkv_snapkv_budget": 256}        tokens kept per KV head besides the window
    {"thinkv_snapkv_budget_ratio": 0.25} a fraction of the prompt
    {"thinkv_snapkv_budget": "off"}      no compaction

No key: the deployment's setting. The deployment's `max_budget` (if set) caps
every request, `off` included; a request that asks for more (`above_max`) is
refused on the OpenAI server by `serve.budget_limit` and capped (with a warning)
by the engine elsewhere. How requests reach vLLM: `snapkv.requests`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_thinkv.snapkv.config import SnapKVConfig

BUDGET_KEY = "thinkv_snapkv_budget"
RATIO_KEY = "thinkv_snapkv_budget_ratio"
OFF = "off"
# The logits processor a deployment names to take per-request budgets (`snapkv.requests`),
# spelled here so that `thinkv serve` can look for it without importing vLLM.
PROCESSOR = "vllm_thinkv.snapkv.requests:SnapKVRequestBudgets"
PROCESSOR_NAMES = frozenset({PROCESSOR, PROCESSOR.replace(":", ".")})  # vLLM takes either spelling


@dataclass(frozen=True)
class RequestBudget:
    """One request's own setting (exactly one field set)."""

    budget: int | None = None
    budget_ratio: float | None = None
    off: bool = False

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> RequestBudget | None:
        """The request's setting, None when it names none; ValueError naming the problem."""
        extra_args = extra_args or {}
        unknown = sorted(k for k in extra_args if k.startswith("thinkv_snapkv") and k not in (BUDGET_KEY, RATIO_KEY))
        if unknown:
            raise ValueError(f"unknown per-request SnapKV key(s) {unknown}; supported: {BUDGET_KEY}, {RATIO_KEY}")
        budget, ratio = extra_args.get(BUDGET_KEY), extra_args.get(RATIO_KEY)
        if budget is not None and ratio is not None:
            raise ValueError(f"give one of {BUDGET_KEY} and {RATIO_KEY}, not both")
        if budget is not None:
            if budget == OFF:
                return cls(off=True)
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise ValueError(f"{BUDGET_KEY} must be a positive integer (tokens kept per KV head besides the "
                                 f"window) or \"{OFF}\", got {budget!r}")
            return cls(budget=budget)
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
                raise ValueError(f"{RATIO_KEY} must be a number in (0, 1) (the fraction of the prompt kept), "
                                 f"got {ratio!r}")
            return cls(budget_ratio=float(ratio))
        return None

    def above_max(self, deployment: SnapKVConfig) -> str | None:
        """What this request asks for beyond the deployment's `max_budget`, as the message
        that refuses it (the API server) or warns that it is capped (the engine); None when
        it asks for no more. A ratio is never above: what it keeps depends on the prompt's
        length, known only once the engine has tokenized it, so it is capped instead."""
        cap = deployment.max_budget
        if cap is None or self.budget_ratio is not None:
            return None
        if self.off or self.budget > cap:
            asked = f'"{OFF}" (no compaction)' if self.off else self.budget
            return f"{BUDGET_KEY} {asked} is above this deployment's max_budget ({cap})"
        return None

    def budget_for(self, deployment: SnapKVConfig, prompt_len: int) -> int | None:
        """Tokens kept per KV head outside the window; None: no compaction."""
        if self.off:
            return deployment.max_budget
        wanted = self.budget if self.budget is not None else int(self.budget_ratio * prompt_len)
        return wanted if deployment.max_budget is None else min(wanted, deployment.max_budget)


def request_budget(extra_args: dict[str, Any] | None) -> RequestBudget | None:
    """A request's setting from its extra_args; requests that reached the engine were
    checked at admission, so this does not raise for them."""
    return RequestBudget.from_extra_args(extra_args)


def kept_len(deployment: SnapKVConfig, request: RequestBudget | None, prompt_len: int) -> int | None:
    """The one rule both the KV manager and the worker apply: positions a compacted
    prompt keeps ([0, kept)), or None when it is not compacted."""
    if request is None:
        return deployment.kept_len(prompt_len)
    budget = request.budget_for(deployment, prompt_len)
    return None if budget is None else deployment.kept_len(prompt_len, budget)
