"""From one run's raw record (per-token arrival times, scheduler timeline) to the
reported numbers. Offline and server runs produce the same raw record:

    {"num_gpu_blocks", "block_size", "timeline": [{"t", "running", ...}], "preemptions",
     "requests": [{"token_ids", "token_times", "sent"?}]}

Times are seconds since all requests were submitted; a request's `sent`
(default 0) is when its HTTP request went out.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np


def _stats(xs: list[float], scale: float = 1.0) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "p99": None}
    return {"mean": statistics.fmean(xs) * scale, "p99": float(np.percentile(xs, 99)) * scale}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Throughput, latency and the scheduler's concurrency/preemption numbers of one run."""
    reqs = raw["requests"]
    ttft = [r["token_times"][0] - r.get("sent", 0.0) for r in reqs if r["token_times"]]
    itl = [b - a for r in reqs for a, b in zip(r["token_times"], r["token_times"][1:])]
    end = max((r["token_times"][-1] for r in reqs if r["token_times"]), default=0.0)
    out_tokens = sum(len(r["token_times"]) for r in reqs)
    timeline = raw["timeline"]
    return {
        "kv_cache_tokens": raw["num_gpu_blocks"] * raw["block_size"] if raw.get("num_gpu_blocks") else None,
        "num_gpu_blocks": raw.get("num_gpu_blocks"),
        "peak_running": max((s["running"] for s in timeline), default=None),
        "preemptions": raw.get("preemptions"),
        "duration_s": end,
        "requests_per_s": len(reqs) / end if end else None,
        "output_tokens_per_s": out_tokens / end if end else None,
        "output_tokens": out_tokens,
        "ttft_s": _stats(ttft),
        "itl_ms": _stats(itl, 1e3),
    }


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """How far greedy outputs match the reference's, request by request: the fraction of output
    tokens before the first differing token (after it the contexts differ, so later tokens are not
    comparable), averaged over requests, and how many requests are identical."""
    if not reference or len(reference) != len(other):
        return {"requests": 0, "prefix_fraction": None, "identical": None}
    fractions, identical = [], 0
    for a, b in zip(reference, other):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        fractions.append(n / max(len(a), 1))
        identical += a == b
    return {"requests": len(reference), "prefix_fraction": statistics.fmean(fractions), "identical": identical}
