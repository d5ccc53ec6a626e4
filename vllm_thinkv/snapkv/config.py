"""SnapKV settings, read from the model's HF config (`--hf-overrides`).

    --hf-overrides '{"thinkv_snapkv": {"budget": 1024, "window": 32, "kernel_size": 7, "pooling": "max"}}'

`budget` (tokens kept per KV head besides the window) or `budget_ratio` (a
fraction of the prompt). `policy` picks how the budget is spent
(`snapkv.policies`): `snapkv` (window attention, pooled), `recent` (the tokens
just before the window: a naive baseline), `value_aware` (SnapKV x value norm,
CriticalKV-style), `keydiff` (key diversity; ignores the question), `merge` (SnapKV's
tokens, with the evicted ones folded into their nearest kept neighbour: `policies.merge`). `sinks`: the
first N prompt tokens are always kept, counted in the budget. `max_budget` caps
what any request keeps per KV head outside the window (a ratio, or a request's
own budget: `snapkv.requests`). A prompt of length P is compacted when P > budget + window:
afterwards it occupies token positions [0, budget + window) of its cache and the
positions [budget + window, P) form a gap whose whole blocks are freed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vllm_thinkv.errors import ThinKVError

HF_CONFIG_KEY = "thinkv_snapkv"
POOLINGS = ("max", "avg")
POLICIES = ("snapkv", "recent", "value_aware", "keydiff", "merge")


# Fields the deployment sets (`snapkv.requests.deployment_settings`), not `thinkv_snapkv` keys.
DEPLOYMENT_FIELDS = ("per_request", "resumed_prefill")


@dataclass(frozen=True)
class SnapKVConfig:
    budget: int | None = None
    budget_ratio: float | None = None
    window: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    policy: str = "snapkv"
    max_budget: int | None = None
    sinks: int = 0
    # Not a `thinkv_snapkv` key: set by the deployment check (`backend.deployment`) when the deployment
    # names the per-request logits processor (`snapkv.requests`). Requests' own budgets are read by the
    # engine core's KV manager exactly when the worker, through that processor, reads them too.
    per_request: bool = False
    # Not a `thinkv_snapkv` key either: set by the deployment check when vLLM's V2 model runner runs. It
    # re-admits a preempted request with all its tokens so far as prefill (`is_prefilling` until they are
    # recomputed), so the engine core's KV manager puts the compaction step after them, as the worker does.
    resumed_prefill: bool = False

    def __post_init__(self) -> None:
        def bad(msg: str) -> ThinKVError:
            return ThinKVError(f"{HF_CONFIG_KEY}: {msg}")

        if (self.budget is None) == (self.budget_ratio is None):
            raise bad("give exactly one of `budget` (tokens per KV head) or `budget_ratio` (fraction of the prompt)")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise bad(f"window must be a positive integer, got {self.window!r}")
        if self.budget is not None:
            if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget <= 0:
                raise bad(f"budget must be a positive integer, got {self.budget!r}")
            if self.window >= self.budget:
                raise bad(f"window ({self.window}) must be smaller than budget ({self.budget})")
        if self.budget_ratio is not None:
            if not isinstance(self.budget_ratio, (int, float)) or not 0.0 < self.budget_ratio < 1.0:
                raise bad(f"budget_ratio must be in (0, 1), got {self.budget_ratio!r}")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise bad(f"kernel_size must be an odd integer >= 1, got {self.kernel_size!r}")
        if self.pooling not in POOLINGS:
            raise bad(f"unknown pooling {self.pooling!r} (supported: {', '.join(POOLINGS)})")
        if self.max_budget is not None:
            if not isinstance(self.max_budget, int) or isinstance(self.max_budget, bool) or self.max_budget <= 0:
                raise bad(f"max_budget must be a positive integer, got {self.max_budget!r}")
            if self.budget is not None and self.budget > self.max_budget:
                raise bad(f"budget ({self.budget}) exceeds max_budget ({self.max_budget})")
        if self.policy not in POLICIES:
            raise bad(f"unknown policy {self.policy!r} (supported: {', '.join(POLICIES)})")
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or self.sinks < 0:
            raise bad(f"sinks must be a non-negative integer (first prompt tokens always kept), got {self.sinks!r}")
        if self.budget is not None and self.sinks >= self.budget:
            raise bad(f"sinks ({self.sinks}) must be smaller than budget ({self.budget})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SnapKVConfig:
        if not isinstance(d, dict):
            raise ThinKVError(f"{HF_CONFIG_KEY} must be a JSON object, got {d!r}")
        known = [name for name in cls.__dataclass_fields__ if name not in DEPLOYMENT_FIELDS]
        unknown = set(d) - set(known)
        if unknown:
            raise ThinKVError(f"{HF_CONFIG_KEY}: unknown keys {sorted(unknown)} (known: {', '.join(known)})")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf_config) -> SnapKVConfig | None:
        """The deployment's settings, or None when SnapKV is off (the default)."""
        d = getattr(hf_config, HF_CONFIG_KEY, None)
        return None if d is None else cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The `thinkv_snapkv` settings (what `from_dict` reads back)."""
        return {k: v for k, v in asdict(self).items() if v is not None and k not in DEPLOYMENT_FIELDS}

    def budget_for(self, prompt_len: int) -> int:
        """Tokens kept per KV head outside the window, for a prompt of this length."""
        budget = self.budget if self.budget is not None else int(self.budget_ratio * prompt_len)
        return budget if self.max_budget is None else min(budget, self.max_budget)

    def kept_len(self, prompt_len: int, budget: int | None = None) -> int | None:
        """Positions a compacted prompt occupies ([0, kept)), or None when the
        prompt is too short to compact. `budget`: a request's own (`snapkv.requests`)."""
        budget = self.budget_for(prompt_len) if budget is None else budget
        kept = budget + self.window
        return kept if budget >= 1 and prompt_len > kept else None


def check_tensor_parallel(num_kv_heads: int, tp_size: int) -> None:
    """SnapKV scores each KV head by the mean over its query heads. When the TP size exceeds
    the KV heads, vLLM replicates each KV head on several ranks and splits its query heads
    among them: each replica would be scored by part of its queries and keep other tokens."""
    if tp_size > num_kv_heads:
        raise ThinKVError(
            f"{HF_CONFIG_KEY}: the tensor-parallel size ({tp_size}) exceeds the model's {num_kv_heads} KV heads, so "
            "vLLM replicates each KV head and splits its query heads among ranks, and each replica would select "
            f"different tokens; use a tensor-parallel size of at most {num_kv_heads} with SnapKV"
        )
