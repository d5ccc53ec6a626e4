"""SnapKV inside one attention layer: keep the window queries, score, compact.

The step plan (which rows prefill, which request is compacted now, the gaps,
whose saved window to drop) comes from the metadata builder (`snapkv.tracker`);
this object holds the one thing that differs per layer: the last `window`
prompt queries of each request being prefilled, needed once the whole prompt
is cached.

Compaction gathers the request's prompt K/V through its block table, selects
per KV head with the deployment's policy (`snapkv.policies`), and writes the
kept tokens (selected ones in position order, then the window) back to
positions [0, kept) with the layer's own `write_kv` op. Keys keep the RoPE of their original positions.
A merging policy's kept slots get its merged keys and values instead, and their ln(count)s
(the window's slots count 1) go to the cache's count column (`snapkv.kv_cache.split_packed`).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import torch
from vllm.logger import init_logger

from vllm_thinkv.backend.ops import AttentionOps
from vllm_thinkv.snapkv.config import SnapKVConfig
from vllm_thinkv.snapkv.policies import RecentPolicy, make_policy
from vllm_thinkv.snapkv.selection import select
from vllm_thinkv.snapkv.tracker import Compaction

if TYPE_CHECKING:
    from vllm_thinkv.backend.metadata import ThinKVMetadata

logger = init_logger(f"vllm.{__name__}")


class SnapKVLayer:
    def __init__(self, snapkv_config: SnapKVConfig, scale: float, ops: AttentionOps):
        self.snapkv_config = snapkv_config
        self.policy = make_policy(snapkv_config)
        self.scale = scale
        self.ops = ops
        # first block -> its request's last `window` queries [<= window, H, r]. Entries leave on
        # compaction, on a restart, and when the step plan releases them.
        self.window_queries: dict[int, torch.Tensor] = {}
        # The latest selections (prompt_len, [Hkv, budget] on the device), for inspection (LLM.apply_model).
        self.recent_selections: deque[tuple[int, torch.Tensor]] = deque(maxlen=64)

    def before_attention(self, metadata: ThinKVMetadata, query: torch.Tensor,
                         caches: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> None:
        """This step's SnapKV work, before the layer attends: save window queries, compact."""
        step = metadata.snapkv_step
        query_start = metadata.query_start_loc_cpu
        w = self.snapkv_config.window
        for first_block in [step.first_blocks[row] for row in step.restart_rows] + step.released:
            self.window_queries.pop(first_block, None)
        for row in step.window_rows:
            first_block = step.first_blocks[row]
            tail = query[query_start[row]: query_start[row + 1]][-w:]
            prev = self.window_queries.pop(first_block, None)
            self.window_queries[first_block] = (tail if prev is None else torch.cat([prev, tail])[-w:]).clone()
        for compaction in step.compactions:
            self._compact(compaction, caches, metadata.block_table[compaction.row])

    def _compact(self, c: Compaction, caches: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                 blocks: torch.Tensor) -> None:
        key_cache, value_cache, log_counts = caches
        w = self.snapkv_config.window
        keys = self.ops.gather_tokens(key_cache, blocks, 0, c.prompt_len)  # [P, Hkv, r] (a copy)
        values = self.ops.gather_tokens(value_cache, blocks, 0, c.prompt_len)  # [P, Hkv, d]
        window_q = self.window_queries.pop(c.first_block, None)
        policy = self.policy
        if window_q is None and policy.uses_queries:  # released by age: should not happen; keep serving
            logger.warning("thinkv SnapKV: no saved window queries for a %d-token prompt; keeping its most "
                           "recent tokens instead", c.prompt_len)
            policy = RecentPolicy(window=w, sinks=policy.sinks)
        selection = select(policy, window_q, keys, values, self.scale, c.kept_len - w)
        selected = selection.indices  # [Hkv, budget]
        budget = selected.shape[1]
        window = torch.arange(c.prompt_len - w, c.prompt_len, device=keys.device).expand(keys.shape[1], w)
        keep = torch.cat([selected, window], dim=1).T  # [kept, Hkv]
        new_keys = keys.gather(0, keep[..., None].expand(-1, -1, keys.shape[-1]))
        new_values = values.gather(0, keep[..., None].expand(-1, -1, values.shape[-1]))
        if selection.log_counts is not None:  # merged slots: the policy's keys and values
            new_keys[:budget] = selection.keys.transpose(0, 1).to(new_keys.dtype)
            new_values[:budget] = selection.values.transpose(0, 1).to(new_values.dtype)
        block_size = key_cache.shape[1]
        positions = torch.arange(c.kept_len, device=keys.device)
        in_blocks, offsets = blocks.long()[positions // block_size], positions % block_size
        self.ops.write_kv(new_keys, new_values, key_cache, value_cache, in_blocks * block_size + offsets)
        if log_counts is not None:
            counts = torch.zeros(c.kept_len, keys.shape[1], dtype=torch.float32, device=keys.device)
            if selection.log_counts is not None:
                counts[:budget] = selection.log_counts.T.float()
            log_counts[in_blocks, offsets] = counts
        self.recent_selections.append((c.prompt_len, selected))
