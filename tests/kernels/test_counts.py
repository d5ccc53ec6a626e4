"""Per-slot counts (ln count added to the logit; SnapKV's `merge` policy) against the float64 reference.

Random non-trivial counts (1 to e^3 per slot and KV head) in a strided view, NaN in every
slot the batch leaves unwritten (gap, null block, block-table tails), so a count read where
no key may be read poisons the output; GQA, gaps, a sliding window, shared keys, every dtype;
the Triton kernel (interpreter on CPU), the torch path and the numba kernel.
"""

from __future__ import annotations

import pytest
import torch

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels import paged_attention, paged_attention_torch, reference
from vllm_thinkv.kernels.cpu_numba import paged_attention_numba
from vllm_thinkv.kernels.testing import random_log_counts, random_paged_batch

from .helpers import DEVICE, MATRIX_DTYPES, assert_close_to_reference, poisoned_out, relative_error
from .test_gaps import GAPS, Q_LENS, SEQ_LENS


def _batch(dtype, device=DEVICE, **kw):
    opts = dict(num_heads=6, num_kv_heads=2, r=16, d=32, block_size=16, gaps=GAPS, seed=3) | kw
    return random_paged_batch(Q_LENS, SEQ_LENS, dtype=dtype, device=device, **opts)


def _opts(batch, counts):
    return dict(gaps=batch.gaps, key_share=batch.key_share, sliding_window=batch.sliding_window, log_counts=counts)


def _reference(batch, counts):
    return reference.paged_attention(*batch.args(), **_opts(batch, counts))


@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_counts_match_reference(dtype):
    batch = _batch(dtype)
    counts = random_log_counts(batch, seed=1)
    ref = _reference(batch, counts)
    d = batch.value_cache.shape[-1]
    for num_splits in (None, 3):
        out = paged_attention(*batch.args(), out=poisoned_out(batch, d), num_splits=num_splits, **_opts(batch, counts))
        assert_close_to_reference(out, ref, dtype, f"triton with counts, splits={num_splits}")
    out = paged_attention_torch(*batch.args(), out=poisoned_out(batch, d), **_opts(batch, counts))
    assert_close_to_reference(out, ref, dtype, "torch path with counts")


@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_numba_counts_match_reference(dtype):
    batch = _batch(dtype, device="cpu", layout="HND")
    counts = random_log_counts(batch, seed=2)
    ref = _reference(batch, counts)
    for num_splits in (None, 4):
        out = poisoned_out(batch, batch.value_cache.shape[-1])
        paged_attention_numba(*batch.args(), out=out, num_splits=num_splits, **_opts(batch, counts))
        assert_close_to_reference(out, ref, dtype, f"numba with counts, splits={num_splits}")


@pytest.mark.parametrize("case", [dict(sliding_window=9), dict(key_share=2, num_heads=4)], ids=["window", "shared"])
def test_counts_with_window_and_shared_keys(case):
    batch = _batch(torch.float32, **case)
    counts = random_log_counts(batch, seed=4)
    ref = _reference(batch, counts)
    d = batch.value_cache.shape[-1]
    impls = [("triton", paged_attention), ("torch", paged_attention_torch)]
    if DEVICE == "cpu":
        impls.append(("numba", paged_attention_numba))
    for name, op in impls:
        out = op(*batch.args(), out=poisoned_out(batch, d), **_opts(batch, counts))
        assert_close_to_reference(out, ref, torch.float32, f"{name} with counts, {case}")


def test_counts_change_the_result_and_zero_counts_change_nothing():
    """Guards against a vacuous pass: counts move the output; ln count = 0 everywhere is the count-free result."""
    batch = _batch(torch.float32)
    counts = random_log_counts(batch, seed=5)
    plain = paged_attention(*batch.args(), gaps=batch.gaps)
    assert relative_error(plain, _reference(batch, counts)) > 1e-2
    zeros = torch.zeros_like(counts)
    for name, op in (("triton", paged_attention), ("torch", paged_attention_torch)):
        base = op(*batch.args(), gaps=batch.gaps)
        assert relative_error(op(*batch.args(), gaps=batch.gaps, log_counts=zeros), base.double()) < 1e-6, name
    base = paged_attention_numba(*batch.args(), gaps=batch.gaps)
    assert torch.equal(paged_attention_numba(*batch.args(), gaps=batch.gaps, log_counts=zeros), base)


def test_a_count_is_that_many_copies():
    """A slot with count n weighs exactly like n identical slots (the reference's definition, checked on its own)."""
    batch = random_paged_batch([1], [3], num_heads=2, num_kv_heads=1, r=8, d=16, block_size=16, seed=6)
    counts = torch.zeros(batch.key_cache.shape[:3])
    counts[batch.block_table[0, 0], 1] = torch.tensor(3.0).log()
    out = _reference(batch, counts)
    k, v = batch.key_cache[batch.block_table[0, 0], :3, 0].double(), batch.value_cache[batch.block_table[0, 0], :3, 0]
    keys, values = k[[0, 1, 1, 1, 2]], v.double()[[0, 1, 1, 1, 2]]
    for h in range(2):
        w = torch.softmax(keys @ batch.q[0, h].double() * batch.scale, 0)
        torch.testing.assert_close(out[0, h], w @ values)


@pytest.mark.parametrize("bad, message", [
    (lambda c: c.double(), "float32"),
    (lambda c: c[:, :, :1], "shape"),
])
def test_bad_counts_are_refused(bad, message):
    batch = _batch(torch.float32, device="cpu")
    counts = random_log_counts(batch)
    for op in (paged_attention_torch, paged_attention_numba):
        with pytest.raises(ThinKVError, match=message):
            op(*batch.args(), gaps=batch.gaps, log_counts=bad(counts))


@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_sequences_without_merged_slots_next_to_merged_ones(dtype):
    """Counts 1 (ln 0) in some sequences' slots, as before compaction, random in the others': the
    torch path leaves the bias out per sequence where it is all zero (fast SDPA) and keeps it elsewhere."""
    batch = _batch(dtype)
    counts = random_log_counts(batch, seed=7)
    plain = [0, 2]
    for seq in plain:
        counts[batch.block_table[seq]] = counts[batch.block_table[seq]].nan_to_num(0.0).zero_()
    ref = _reference(batch, counts)
    out = paged_attention_torch(*batch.args(), out=poisoned_out(batch, batch.value_cache.shape[-1]), **_opts(batch, counts))
    assert_close_to_reference(out, ref, dtype, "torch path, some sequences without merged slots")
    assert relative_error(ref, _reference(batch, torch.zeros_like(counts))) > 1e-2  # the others' counts matter
