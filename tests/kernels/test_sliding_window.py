"""Sliding-window attention (key p visible to the query at t iff t - W < p <= t, vLLM's convention)
against the float64 reference, in the Triton kernels (interpreter on CPU), the torch path and the
numba CPU kernel.

Positions left of every query's window are never written (NaN) and their whole blocks
map to the NaN null block 0 (`testing.random_paged_batch`, as vLLM frees blocks that slid
out of the window), so a kernel that reads one poisons the output. Each batch mixes a
single-token decode, a 3-token decode step, a chunked prefill over cached context, a full
prefill (several query blocks) and a short decode. Windows: 1, smaller than a tile, a
whole number of tiles, equal to the longest context, larger than every context.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vllm_thinkv.kernels import launch, paged_attention, paged_attention_torch
from vllm_thinkv.kernels.cpu_numba import paged_attention_numba
from vllm_thinkv.kernels.attention import plan_attention
from vllm_thinkv.kernels.checks import attention_shape
from vllm_thinkv.kernels.testing import PagedBatch, random_paged_batch

from .helpers import DEVICE, assert_close_to_reference, poisoned_out, reference_output

Q_LENS = [1, 3, 40, 50, 1]
SEQ_LENS = [150, 90, 140, 50, 20]  # decode, 3-token step, chunked prefill (100 cached), full prefill, short decode
WINDOWS = [1, 23, 64, 150, 10**6]  # 150 == the longest context; 10**6 > every context
# SnapKV gaps in the cached context: partly left of the window, inside it, from position 0, none.
GAPS = [(16, 100), (5, 41), (0, 64), (0, 0), (3, 10)]
LAYOUT_D = 64


def _batch(window, dtype=torch.float32, *, gaps=None, key_share=1, num_kv_heads=2, r=32, layout="HND", seed=0,
           q_lens=Q_LENS, seq_lens=SEQ_LENS, group=4, block_size=16) -> PagedBatch:
    return random_paged_batch(
        q_lens, seq_lens, num_heads=group * num_kv_heads, num_kv_heads=num_kv_heads, r=r, d=LAYOUT_D,
        block_size=block_size, dtype=dtype, device=DEVICE, layout=layout, gaps=gaps, key_share=key_share,
        sliding_window=window, seed=seed,
    )


def _check_both_paths(batch: PagedBatch, dtype: torch.dtype, what: str, num_splits: int | None = None) -> None:
    ref = reference_output(batch)
    opts = dict(gaps=batch.gaps, key_share=batch.key_share, sliding_window=batch.sliding_window)
    out = poisoned_out(batch, LAYOUT_D)
    assert paged_attention(*batch.args(), out=out, num_splits=num_splits, **opts) is out
    assert_close_to_reference(out, ref, dtype, f"triton, {what}, splits={num_splits}")
    out = paged_attention_torch(*batch.args(), out=poisoned_out(batch, LAYOUT_D), **opts)
    assert_close_to_reference(out, ref, dtype, f"torch path, {what}")
    if batch.block_table.device.type == "cpu":
        out = paged_attention_numba(*batch.args(), out=poisoned_out(batch, LAYOUT_D), num_splits=num_splits, **opts)
        assert_close_to_reference(out, ref, dtype, f"numba, {what}, splits={num_splits}")


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("window", WINDOWS)
def test_window_matches_reference(window, num_splits):
    _check_both_paths(_batch(window, seed=window % 97), torch.float32, f"window {window}", num_splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_window_16_bit(dtype):
    _check_both_paths(_batch(23, dtype, layout="NHD", seed=1), dtype, "window 23")


@pytest.mark.parametrize("window", [23, 64, 130])
def test_window_with_gaps(window):
    """SnapKV gaps and a window together: the gap may start left of the window and end inside it."""
    _check_both_paths(_batch(window, gaps=GAPS, seed=2), torch.float32, f"window {window} with gaps", 2)


def test_window_with_shared_keys():
    """KEY_SHARE = 2 (two KV heads' slots form one key) under a window, with gaps."""
    batch = _batch(37, key_share=2, r=16, gaps=GAPS, seed=4)
    _check_both_paths(batch, torch.float32, "window 37, key_share 2", None)
    _check_both_paths(batch, torch.float32, "window 37, key_share 2", 4)


def test_window_with_gpu_tiles(gpu_tiles):
    """The H100 table: 64-wide tiles, 128-row prefill blocks and the split heuristic (it splits by the
    window, not the context), with a window that starts mid-tile."""
    batch = _batch(100, q_lens=[1, 1, 200], seq_lens=[700, 90, 460], gaps=[(40, 300), (0, 0), (0, 100)], seed=5,
                   group=8, num_kv_heads=1, r=16)
    for num_splits in (None, 3):
        _check_both_paths(batch, torch.float32, "window 100, GPU tiles", num_splits)


def test_window_larger_than_the_context_is_no_window():
    """W > every context changes no bit of the Triton output (the window code only adds true conditions)."""
    batch = _batch(None, seed=6)
    plain = paged_attention(*batch.args())
    windowed = paged_attention(*batch.args(), sliding_window=max(SEQ_LENS))
    assert torch.equal(plain, windowed)


def test_window_changes_the_result():
    """Guard against a vacuous pass: with finite data left of the window, ignoring the window is wrong."""
    batch = _batch(23, seed=7)
    ref = reference_output(batch)
    batch.packed.nan_to_num_(0.5)  # the slots left of the window now hold finite numbers
    ignored = paged_attention(*batch.args())
    assert float((ignored.double().cpu() - ref).norm() / ref.norm()) > 1e-2
    assert_close_to_reference(paged_attention(*batch.args(), sliding_window=23), ref, torch.float32,
                              "window after refill")
    assert_close_to_reference(paged_attention_torch(*batch.args(), sliding_window=23), ref, torch.float32,
                              "torch path after refill")
    assert_close_to_reference(paged_attention_numba(*batch.args(), sliding_window=23), ref, torch.float32,
                              "numba after refill")


def test_decode_splits_cover_only_the_window():
    """Work per token is O(window): a decode over 1000 cached tokens with a 70-token window, split
    into as many splits as the window has tiles. Split s must have scored exactly the keys of tile
    first_tile + s (its log2-sum-exp equals the float64 one over those keys); a kernel that walked the
    tiles from position 0 would give the early splits only keys left of the window (-inf or wrong)."""
    window, seq_len, r, d, group = 70, 1001, 16, 64, 4
    batch = random_paged_batch([1], [seq_len], num_heads=group, num_kv_heads=1, r=r, d=d, block_size=16,
                               device=DEVICE, sliding_window=window, seed=8)
    shape = attention_shape(batch)
    facts = launch.device_facts(batch.q.device)
    tile_n = launch.tile_config("decode", r, d, group, torch.float32, facts).tile_n
    kv_start = seq_len - window  # the query sits at seq_len - 1 and sees (seq_len - 1 - window, seq_len - 1]
    first_tile, num_tiles = kv_start // tile_n, -(-seq_len // tile_n)
    splits = num_tiles - first_tile
    assert splits < num_tiles // 4  # the window is a small part of the context
    out = poisoned_out(batch, d)
    launches = plan_attention(batch, shape, out, max_seqlen_q=1, max_seqlen_k=seq_len, num_splits=splits, facts=facts)
    for kernel_launch in launches:
        kernel_launch()
    assert_close_to_reference(out, reference_output(batch), torch.float32, "split decode")
    part_lse = launches[0].args[2].double().cpu()  # [tokens, heads, splits], log2-sum-exp of each split's scores
    q = batch.q[0].double().cpu()
    for s in range(splits):
        positions = range(max(kv_start, (first_tile + s) * tile_n), min(seq_len, (first_tile + s + 1) * tile_n))
        keys = torch.stack([batch.key_cache[int(batch.block_table[0, p // 16]), p % 16, 0].double().cpu()
                            for p in positions])
        expected = torch.logsumexp(q @ keys.T * batch.scale, dim=1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
        assert torch.allclose(part_lse[0, :, s], expected, atol=1e-4), (s, part_lse[0, :, s], expected)


def test_split_heuristic_uses_the_window(gpu_tiles):
    """A small decode batch on a big GPU splits a 32k context by its length, but a 512-token
    window only as much as its 512 + DECODE_MAX_Q - 1 keys allow."""
    batch = random_paged_batch([1], [40], num_heads=8, num_kv_heads=1, r=16, d=64, block_size=16, device=DEVICE)
    shape = attention_shape(batch)
    facts = launch.device_facts(batch.q.device)
    decode_max_q = launch.tile_config("decode", shape.qk, shape.d, shape.group, torch.float32, facts).block_m // 8

    def splits(window):
        out = batch.q.new_empty(shape.num_tokens, shape.num_heads, 64)
        plan = plan_attention(replace(batch, sliding_window=window), shape, out, max_seqlen_q=1, max_seqlen_k=32768,
                              num_splits=None, facts=facts)
        return plan[0].constexprs["NUM_SPLITS"]

    assert splits(None) == launch.decode_splits(1, 1, 32768, facts)
    assert splits(512) == launch.decode_splits(1, 1, 512 + decode_max_q - 1, facts) < splits(None)
