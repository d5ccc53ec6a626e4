"""When each request is compacted, decided on the worker from per-step metadata.

The worker sees rows (one per scheduled request), not request ids. A request
is recognised by the physical id of its first KV block, which is unique among
running requests (SnapKV turns prefix caching off, and compaction never frees
a request's first block). Its life: prefill rows (its trailing queries are
kept as the SnapKV window) until the first row that starts at or after the
prompt end; that row's start C is the compaction point: the request keeps
`kept_len(C)` tokens and [kept_len(C), C) becomes a gap. The KV-cache manager
(`kv_cache.SnapKVManager`) derives the same C from the same scheduling steps
and frees the gap's whole blocks once that step has run. After preemption the
request is prefilled again from position 0, which restarts its life here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_thinkv.snapkv.config import SnapKVConfig

_PREFILLING = "prefilling"
_FULL = "full"  # prompt too short to compact


@dataclass
class Compaction:
    row: int
    key: int  # first block id
    prompt_len: int  # C: positions [0, C) are the "prompt" being compacted
    kept_len: int  # positions [0, kept_len) remain; [kept_len, C) is the gap


@dataclass
class SnapKVStep:
    """What the layers do this step (shared by all layers of the KV-cache group)."""

    keys: list[int]  # per row: its request's first block id
    window_rows: list[int] = field(default_factory=list)  # prefill rows: keep their trailing queries
    restart_rows: list[int] = field(default_factory=list)  # rows starting at position 0
    compactions: list[Compaction] = field(default_factory=list)
    released: list[int] = field(default_factory=list)  # keys whose prompt turned out too short: drop their window
    gaps: list[tuple[int, int]] = field(default_factory=list)  # per row [start, end); (0, 0) = none

    @property
    def has_gaps(self) -> bool:
        return any(end > start for start, end in self.gaps)


class SnapKVTracker:
    def __init__(self, config: SnapKVConfig):
        self.config = config
        # first block id -> _PREFILLING, _FULL, or the Compaction that happened
        self._state: dict[int, str | Compaction] = {}

    def step(self, first_blocks: list[int], query_start: list[int], seq_lens: list[int],
             is_prefilling: list[bool]) -> SnapKVStep:
        plan = SnapKVStep(keys=list(first_blocks))
        for row, key in enumerate(first_blocks):
            q_len = query_start[row + 1] - query_start[row]
            start = seq_lens[row] - q_len
            state = self._state.get(key)
            if q_len > 0 and is_prefilling[row]:
                if start == 0 or state is None:
                    self._state[key] = state = _PREFILLING
                    plan.restart_rows.append(row)
                plan.window_rows.append(row)
            elif q_len > 0 and state == _PREFILLING:
                kept = self.config.kept_len(start)
                state = _FULL if kept is None else Compaction(row, key, start, kept)
                self._state[key] = state
                if kept is None:
                    plan.released.append(key)
                else:
                    plan.compactions.append(state)
            compacted = isinstance(state, Compaction)
            plan.gaps.append((state.kept_len, state.prompt_len) if compacted else (0, 0))
        return plan
