"""The engine core's SnapKVManager and the worker's SnapKVTracker, driven through the
same schedules, must agree: a block is freed only after the worker compacted the
request (in an earlier step), and exactly the whole blocks of the worker's gap."""

import pytest
import torch
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_thinkv.snapkv import SnapKVConfig
from vllm_thinkv.snapkv.kv_cache import SnapKVManager, SnapKVSpec
from vllm_thinkv.snapkv.tracker import SnapKVTracker

BS = 16


def simulate(config: SnapKVConfig, prompt_len: int, lives: list[list[int]], in_flight: bool):
    """One request; each life is a list of scheduled step sizes (a new life = preempted and
    recomputed from position 0, as vLLM's V1 runner does: `is_prefilling` = start < prompt).
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
            blocks = manager.req_to_blocks["r"]
            freed = {j for j, b in enumerate(blocks) if b.is_null}
            if freed:
                assert compacted_at is not None and compacted_at < i, "freed before the worker compacted"
            plan = tracker.step([blocks[0].block_id], [0, q], [start + q], [start < prompt_len])
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
