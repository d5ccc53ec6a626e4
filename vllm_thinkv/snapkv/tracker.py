"""When each request is compacted, decided on the worker from per-step metadata.

The worker sees rows (one per scheduled request), not request ids. A request
is recognised by the physical id of its first KV block (`first_block`), which is unique among
running requests (SnapKV turns prefix caching off, and compaction never frees
a request's first block). Its life: prefill rows (its trailing queries are
kept as the SnapKV window) until the first row that starts at or after the
prompt end; that row's start C is the compaction point: the request keeps
`kept_len(C)` tokens and [kept_len(C), C) becomes a gap. The KV-cache manager
(`kv_cache.SnapKVManager`) derives the same C from the same scheduling steps
and frees the gap's whole blocks once that step has run. After preemption the
request is prefilled again from position 0, which restarts its life here.
"Prefill rows" are the model runner's `is_prefilling` ones: V1 counts only the prompt, the
V2 runner all tokens a re-admitted request had (its prefill_len); the manager mirrors
whichever runs (`SnapKVConfig.resumed_prefill`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_thinkv.snapkv.config import SnapKVConfig
from vllm_thinkv.snapkv.budgets import RequestBudget, kept_len

_PREFILLING = "prefilling"
_FULL = "full"  # prompt too short to compact


@dataclass
class Compaction:
    row: int
    first_block: int  # the request's identity on the worker
    prompt_len: int  # C: positions [0, C) are the "prompt" being compacted
    kept_len: int  # positions [0, kept_len) remain; [kept_len, C) is the gap


@dataclass
class SnapKVStep:
    """What the layers do this step (shared by all layers of the KV-cache group)."""

    config: SnapKVConfig  # the deployment's settings, from the KV spec (the manager holds an equal copy)
    first_blocks: list[int]  # per row: its request's first block id
    window_rows: list[int] = field(default_factory=list)  # prefill rows: keep their trailing queries
    restart_rows: list[int] = field(default_factory=list)  # rows starting at position 0
    compactions: list[Compaction] = field(default_factory=list)
    # first blocks whose saved window the layers drop: the prompt turned out too short, or
    # (requests aborted during prefill) the oldest windows beyond the tracker's bound
    released: list[int] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # per row [start, end); (0, 0) = none

    @property
    def has_gaps(self) -> bool:
        return any(end > start for start, end in self.gaps)


class SnapKVTracker:
    """`max_windows`: how many requests' window queries the layers may hold at once
    (None: no bound). A request aborted during prefill never reaches its compaction
    step, and the worker is not told; its window goes once there are more than this
    many, oldest update first (the engine uses twice the number of requests that can
    run at once)."""

    def __init__(self, config: SnapKVConfig, max_windows: int | None = None):
        self.config = config
        self.max_windows = max_windows
        # first block id -> _PREFILLING, _FULL, or the Compaction that happened
        self._state: dict[int, str | Compaction] = {}
        # first block ids whose window the layers hold, oldest update first
        self._windows: dict[int, None] = {}

    def step(self, first_blocks: list[int], query_start: list[int], seq_lens: list[int],
             is_prefilling: list[bool], requests: dict[int, RequestBudget] | None = None) -> SnapKVStep:
        """`requests`: row -> that request's own budget (`snapkv.requests`); other rows get the deployment's."""
        requests = requests or {}
        plan = SnapKVStep(config=self.config, first_blocks=list(first_blocks))
        for row, first_block in enumerate(first_blocks):
            q_len = query_start[row + 1] - query_start[row]
            start = seq_lens[row] - q_len
            state = self._state.get(first_block)
            if q_len > 0 and is_prefilling[row]:
                if start == 0 or state is None:
                    self._state[first_block] = state = _PREFILLING
                    plan.restart_rows.append(row)
                plan.window_rows.append(row)
                self._windows.pop(first_block, None)  # re-inserted last: the dict stays in update order
                self._windows[first_block] = None
            elif q_len > 0 and state == _PREFILLING:
                kept = kept_len(self.config, requests.get(row), start)
                state = _FULL if kept is None else Compaction(row, first_block, start, kept)
                self._state[first_block] = state
                if kept is None:
                    plan.released.append(first_block)
                else:
                    plan.compactions.append(state)
            compacted = isinstance(state, Compaction)
            plan.gaps.append((state.kept_len, state.prompt_len) if compacted else (0, 0))
        for first_block in plan.released:
            self._windows.pop(first_block, None)
        for compaction in plan.compactions:
            self._windows.pop(compaction.first_block, None)
        # Compacted and released windows are gone already: only live ones count against the bound.
        while self.max_windows is not None and len(self._windows) > self.max_windows:
            oldest = next(iter(self._windows))
            del self._windows[oldest]
            plan.released.append(oldest)
        return plan
