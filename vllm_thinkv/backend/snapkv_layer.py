"""SnapKV inside one attention layer: keep the window queries, score, compact.

The step plan (which rows prefill, which request is compacted now, the gaps)
comes from the metadata builder (`snapkv.tracker`); this object holds the one
thing that differs per layer: the last `window` prompt queries of each request
being prefilled, needed once the whole prompt is cached.

Compaction gathers the request's prompt K/V through its block table, selects
per KV head, and writes the kept tokens (selected ones in position order, then
the window) back to positions [0, kept) with the same `write_kv` op the layer
uses for new tokens. Keys keep the RoPE of their original positions.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import replace

import torch
from vllm.logger import init_logger

from vllm_thinkv.kernels.torch_ops import gather_tokens
from vllm_thinkv.snapkv.config import SnapKVConfig
from vllm_thinkv.snapkv.selection import select_tokens
from vllm_thinkv.snapkv.tracker import Compaction, SnapKVStep

logger = init_logger(f"vllm.{__name__}")


class SnapKVLayer:
    def __init__(self, config: SnapKVConfig, scale: float, write_kv: Callable[..., None], max_num_seqs: int):
        self.config = config
        self.scale = scale
        self.write_kv = write_kv
        # request key -> its last `window` queries [<= window, H, r], oldest update first. Entries leave
        # on compaction, on a restart, when the prompt is too short, or (requests aborted during
        # prefill) by age once there are more than twice as many as requests can run at once.
        self.window_queries: dict[int, torch.Tensor] = {}
        self.max_entries = 2 * max_num_seqs
        # The latest selections (prompt_len, [Hkv, budget] on the device), for inspection (LLM.apply_model).
        self.recent_selections: deque[tuple[int, torch.Tensor]] = deque(maxlen=64)

    def before_attention(self, step: SnapKVStep, query: torch.Tensor, query_start: list[int],
                         key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor) -> None:
        w = self.config.window
        for key in [step.keys[row] for row in step.restart_rows] + step.released:
            self.window_queries.pop(key, None)
        for row in step.window_rows:
            key = step.keys[row]
            tail = query[query_start[row]: query_start[row + 1]][-w:]
            prev = self.window_queries.pop(key, None)  # re-inserted last: the dict stays in update order
            self.window_queries[key] = (tail if prev is None else torch.cat([prev, tail])[-w:]).clone()
        while len(self.window_queries) > self.max_entries:
            self.window_queries.pop(next(iter(self.window_queries)))
        for compaction in step.compactions:
            self._compact(compaction, key_cache, value_cache, block_table[compaction.row])

    def _compact(self, c: Compaction, key_cache: torch.Tensor, value_cache: torch.Tensor, blocks: torch.Tensor) -> None:
        w = self.config.window
        keys = gather_tokens(key_cache, blocks, 0, c.prompt_len)  # [P, Hkv, r] (a copy)
        values = gather_tokens(value_cache, blocks, 0, c.prompt_len)  # [P, Hkv, d]
        window_q = self.window_queries.pop(c.key, None)
        config = self.config
        if window_q is None:  # evicted by age: should not happen; keep serving rather than fail the request
            logger.warning("thinkv SnapKV: no saved window queries for a %d-token prompt; keeping its most "
                           "recent tokens instead", c.prompt_len)
            config = replace(config, policy="recent")
        selected = select_tokens(window_q, keys, self.scale, config, c.kept_len - w)  # [Hkv, budget]
        window = torch.arange(c.prompt_len - w, c.prompt_len, device=keys.device).expand(keys.shape[1], w)
        keep = torch.cat([selected, window], dim=1).T  # [kept, Hkv]
        new_keys = keys.gather(0, keep[..., None].expand(-1, -1, keys.shape[-1]))
        new_values = values.gather(0, keep[..., None].expand(-1, -1, values.shape[-1]))
        block_size = key_cache.shape[1]
        positions = torch.arange(c.kept_len, device=keys.device)
        slots = blocks.long()[positions // block_size] * block_size + positions % block_size
        self.write_kv(new_keys, new_values, key_cache, value_cache, slots)
        self.recent_selections.append((c.prompt_len, selected))
