"""The per-sequence gap mask (SnapKV's dropped prompt range) against the float64 reference.

Block-table entries of blocks wholly inside a gap point at the NaN null block 0 and
gap slots that share a block with kept tokens are never written (NaN), so any read of
a gap position poisons the output.
"""

from __future__ import annotations

import pytest
import torch

from vllm_thinkv.kernels import paged_attention, paged_attention_torch
from vllm_thinkv.kernels.testing import random_paged_batch

from .helpers import DEVICE, MATRIX_DTYPES, assert_close_to_reference, poisoned_out, reference_output

# seq 0: gap of whole blocks (16..64 at block size 16 -> blocks 1-3 are the null block) then a decode;
# seq 1: gap edges mid-block (5..41) then a 3-token step; seq 2: gap from position 0, then a chunk of
# 12 tokens; seq 3: no gap (start == end); seq 4: gap ending right before the query.
Q_LENS = [1, 3, 12, 1, 1]
SEQ_LENS = [100, 90, 80, 40, 70]
GAPS = [(16, 64), (5, 41), (0, 40), (7, 7), (20, 69)]


def _batch(dtype, r=32, d=128, group=4, layout="NHD", seed=0):
    return random_paged_batch(
        Q_LENS, SEQ_LENS, num_heads=group, num_kv_heads=1, r=r, d=d, block_size=16, dtype=dtype,
        device=DEVICE, layout=layout, gaps=GAPS, seed=seed,
    )


@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [None, 4])
def test_gaps_match_reference(dtype, num_splits):
    batch = _batch(dtype)
    ref = reference_output(batch)
    out = paged_attention(*batch.args(), out=poisoned_out(batch, 128), gaps=batch.gaps, num_splits=num_splits)
    assert_close_to_reference(out, ref, dtype, f"triton with gaps, splits={num_splits}")
    out = paged_attention_torch(*batch.args(), out=poisoned_out(batch, 128), gaps=batch.gaps)
    assert_close_to_reference(out, ref, dtype, "torch path with gaps")


def test_gaps_change_the_result():
    """Guard against a vacuous pass: ignoring the gap must give a different answer."""
    batch = _batch(torch.float32, r=24, d=64, group=3, layout="HND", seed=2)
    ref = reference_output(batch)
    gapless = torch.zeros_like(batch.gaps)
    # Refill the gap slots with finite data, so reading them gives wrong numbers rather than NaN.
    batch.packed.nan_to_num_(0.5)
    out = paged_attention(*batch.args(), gaps=gapless)
    assert float((out.double().cpu() - ref).norm() / ref.norm()) > 1e-2
    out = paged_attention(*batch.args(), gaps=batch.gaps)
    assert_close_to_reference(out, ref, torch.float32, "triton with gaps after refill")


def test_empty_gaps_equal_no_gaps():
    """start == end everywhere is exactly the HAS_GAP=False result."""
    batch = random_paged_batch(Q_LENS, SEQ_LENS, num_heads=4, num_kv_heads=2, r=16, d=64, block_size=32,
                               dtype=torch.float32, device=DEVICE, seed=5)
    empty = torch.tensor([[3, 3]] * len(SEQ_LENS), dtype=torch.int32, device=DEVICE)
    assert torch.equal(paged_attention(*batch.args()), paged_attention(*batch.args(), gaps=empty))


def test_gaps_with_gpu_tiles(gpu_tiles):
    """TILE_N 64 on the GPU table: whole-tile skipping for seq 0 and 4, splits over live tiles."""
    long_gaps = [(64, 192), (5, 141), (0, 128), (7, 7), (20, 200)]
    batch = random_paged_batch(Q_LENS, [260, 200, 180, 40, 230], num_heads=8, num_kv_heads=1, r=16, d=128,
                               block_size=16, dtype=torch.float32, device=DEVICE, gaps=long_gaps, seed=7)
    ref = reference_output(batch)
    for num_splits in (None, 3):
        out = paged_attention(*batch.args(), out=poisoned_out(batch, 128), gaps=batch.gaps, num_splits=num_splits)
        assert_close_to_reference(out, ref, torch.float32, f"GPU tiles with gaps, splits={num_splits}")
