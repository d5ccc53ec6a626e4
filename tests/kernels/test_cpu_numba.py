"""paged_attention_numba (the default CPU path) against the float64 reference and the torch path.

Same batches as the Triton tests: ragged mixes of decodes, chunked prefills and full
prefills over NaN-poisoned views of a packed [.., r + d] buffer (shuffled blocks, NaN null
block, random block-table tails), `out` NaN-poisoned; gaps, GQA, shared keys, every dtype,
r < d, r = d and r > d, both cache layouts, forced and automatic KV splits, 1 and 2 threads.
The kernel runs on CPU tensors whatever device the other kernel tests use.
"""

from __future__ import annotations

import os

import pytest
import torch

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels import paged_attention_torch
from vllm_thinkv.kernels.cpu_numba import Q_TOKENS, _kernel, decode_splits, paged_attention_numba
from vllm_thinkv.kernels.testing import random_paged_batch

from . import test_gaps as gap_cases
from . import test_shared_keys as shared_cases
from .helpers import MATRIX_DTYPES, TOLERANCE, assert_close_to_reference, poisoned_out, reference_output, relative_error
from .test_paged_attention import HEAD_CASES, MIXED_Q_LENS, MIXED_SEQ_LENS, _case_id


def _batch(r, d, group, num_kv_heads, block_size, layout, dtype, q_lens=MIXED_Q_LENS, seq_lens=MIXED_SEQ_LENS,
           gaps=None, key_share=1, seed=0):
    return random_paged_batch(
        q_lens, seq_lens, num_heads=group * num_kv_heads, num_kv_heads=num_kv_heads, r=r, d=d,
        block_size=block_size, dtype=dtype, device="cpu", layout=layout, gaps=gaps, key_share=key_share, seed=seed,
    )


def _check(batch, dtype, what, num_splits=None, ref=None):
    """numba close to the float64 reference and to the torch path (both poisoned-out, same call)."""
    ref = reference_output(batch) if ref is None else ref
    d = batch.value_cache.shape[-1]
    opts = dict(gaps=batch.gaps, key_share=batch.key_share)
    out = poisoned_out(batch, d)
    assert paged_attention_numba(*batch.args(), out=out, num_splits=num_splits, **opts) is out
    assert_close_to_reference(out, ref, dtype, f"numba, {what}, splits={num_splits}")
    torch_out = paged_attention_torch(*batch.args(), out=poisoned_out(batch, d), **opts)
    assert_close_to_reference(torch_out, ref, dtype, f"torch path, {what}")
    diff = relative_error(out, torch_out.double())
    assert diff <= 2 * TOLERANCE[dtype], f"numba vs torch path, {what}: {diff:.3e}"
    return ref


@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
@pytest.mark.parametrize("case", HEAD_CASES, ids=_case_id)
def test_mixed_batch(case, dtype):
    batch = _batch(*case, dtype)
    ref = _check(batch, dtype, "mixed batch")
    _check(batch, dtype, "mixed batch", num_splits=3, ref=ref)  # chunked prefills split too; some splits empty


@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [None, 4])
def test_gaps(dtype, num_splits):
    batch = random_paged_batch(gap_cases.Q_LENS, gap_cases.SEQ_LENS, num_heads=4, num_kv_heads=1, r=32, d=128,
                               block_size=16, dtype=dtype, gaps=gap_cases.GAPS)
    _check(batch, dtype, "gaps", num_splits=num_splits)


def test_gaps_change_the_result():
    """Guard against a vacuous pass: with the gap slots refilled with finite data, ignoring the gap
    gives a different answer, honouring it the reference's."""
    batch = random_paged_batch(gap_cases.Q_LENS, gap_cases.SEQ_LENS, num_heads=3, num_kv_heads=1, r=24, d=64,
                               block_size=16, gaps=gap_cases.GAPS, layout="HND", seed=2)
    ref = reference_output(batch)
    batch.packed.nan_to_num_(0.5)
    out = paged_attention_numba(*batch.args(), gaps=torch.zeros_like(batch.gaps))
    assert relative_error(out, ref) > 1e-2
    assert_close_to_reference(paged_attention_numba(*batch.args(), gaps=batch.gaps), ref, torch.float32,
                              "numba with gaps after refill")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", shared_cases.CASES, ids=shared_cases._case_id)
def test_shared_keys(case, dtype):
    hkv, share, r, d, group, block_size, layout = case
    batch = _batch(r, d, group, hkv, block_size, layout, dtype, q_lens=shared_cases.Q_LENS,
                   seq_lens=shared_cases.SEQ_LENS, key_share=share)
    ref = _check(batch, dtype, "shared keys")
    _check(batch, dtype, "shared keys", num_splits=2, ref=ref)


def test_shared_keys_with_gaps():
    batch = _batch(16, 64, 2, 4, 16, "NHD", torch.float32, q_lens=[1, 3, 17], seq_lens=[80, 60, 50],
                   gaps=[(10, 50), (0, 33), (16, 32)], key_share=2)
    ref = _check(batch, torch.float32, "shared keys with gaps")
    _check(batch, torch.float32, "shared keys with gaps", num_splits=2, ref=ref)


def test_two_threads_and_automatic_splits():
    """With two threads a single decode sequence is split automatically; chunked prefills (more than
    Q_TOKENS query tokens) run as several jobs in parallel. Same answers as one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert decode_splits(1, 1, 1, 600, threads=2) == 2
        # 3 KV heads on 2 threads: split in two, 6 jobs take 3 rounds of half a job instead of 2 whole ones
        assert decode_splits(1, 3, 1, 4096, threads=2) == 2
        assert decode_splits(8, 3, 1, 4096, threads=2) == 1  # 24 jobs fill both threads alike
        assert decode_splits(1, 3, 1, 300, threads=2) == 1  # splits would be shorter than MIN_SPLIT_TOKENS
        assert decode_splits(1, 3, 2 * Q_TOKENS, 4096, threads=2) == 1  # prefill chunks are never split
        decode = _batch(16, 64, 8, 1, 32, "NHD", torch.bfloat16, q_lens=[1], seq_lens=[600], seed=3)
        _check(decode, torch.bfloat16, "split decode, 2 threads")
        gqa = _batch(16, 64, 3, 3, 16, "HND", torch.bfloat16, q_lens=[1], seq_lens=[700], seed=4)
        _check(gqa, torch.bfloat16, "3 KV heads split in two, 2 threads")
        prefill = _batch(32, 64, 4, 2, 16, "HND", torch.float32, q_lens=[3 * Q_TOKENS + 5, 1],
                         seq_lens=[3 * Q_TOKENS + 40, 90])
        _check(prefill, torch.float32, "chunked prefill, 2 threads")
    finally:
        torch.set_num_threads(before)


def test_prefill_only_empty_sequences_and_empty_batch():
    batch = _batch(32, 64, 4, 1, 16, "NHD", torch.float32, q_lens=[70, 0, 45, 0], seq_lens=[70, 0, 100, 9])
    _check(batch, torch.float32, "prefill-only with q_len 0 sequences")
    empty = _batch(32, 64, 2, 1, 16, "NHD", torch.float32, q_lens=[0], seq_lens=[5])
    assert paged_attention_numba(*empty.args()).shape == (0, 2, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_q_and_out(dtype):
    """q and out as vLLM hands them over: views into wider buffers; nothing is written past `out`."""
    batch = _batch(24, 64, 3, 2, 16, "NHD", dtype)
    ref = reference_output(batch)
    num_tokens, num_heads, r = batch.q.shape
    qkv = torch.randn(num_tokens, num_heads * r + 40).to(dtype)
    qkv[:, 8 : 8 + num_heads * r] = batch.q.reshape(num_tokens, -1)
    q = qkv[:, 8 : 8 + num_heads * r].view(num_tokens, num_heads, r)
    wide_out = torch.full((num_tokens, num_heads, 80), float("nan"), dtype=dtype)
    out = wide_out[..., :64]
    assert not q.is_contiguous() and not out.is_contiguous()
    assert paged_attention_numba(q, *batch.args()[1:], out=out) is out
    assert_close_to_reference(out, ref, dtype, "numba, strided q/out")
    assert wide_out[..., 64:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_decoding_is_exact_for_every_pattern(dtype):
    """The kernel's bit decoding of all 65536 fp16 / bf16 patterns (subnormals, inf, NaN) equals torch's."""
    import numpy as np

    kernel = _kernel()
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    dst = np.zeros(bits.numel(), np.uint32)
    kernel.decode(bits.numpy(), 0, bits.numel(), kernel.FP16 if dtype == torch.float16 else kernel.BF16, dst, 0)
    ours = torch.from_numpy(dst.view(np.float32))
    theirs = bits.view(dtype).float()
    assert torch.equal(ours.isnan(), theirs.isnan())
    finite = ~theirs.isnan()
    assert torch.equal(ours[finite].view(torch.int32), theirs[finite].view(torch.int32))


def test_bad_block_id_is_an_error_not_a_read():
    batch = _batch(16, 64, 2, 1, 16, "NHD", torch.float32)
    table = batch.block_table.clone()
    table[0, 1] = batch.key_cache.shape[0] + 1000
    with pytest.raises(ThinKVError, match="block id outside"):
        paged_attention_numba(batch.q, batch.key_cache, batch.value_cache, table, batch.cu_seqlens_q,
                              batch.seq_lens, batch.scale)


def test_non_unit_head_stride_is_rejected():
    batch = _batch(16, 64, 2, 1, 16, "NHD", torch.float32)
    strided = torch.empty(*batch.value_cache.shape[:3], 64 * 2)[..., ::2]
    strided.copy_(batch.value_cache)
    with pytest.raises(ThinKVError, match="unit stride"):
        paged_attention_numba(batch.q, batch.key_cache, strided, *batch.args()[3:])


POOL_PROBE = """
import glob, os, threading, time, torch
def masks():
    out = {}
    for status in glob.glob("/proc/self/task/*/status"):
        fields = dict(line.split(":", 1) for line in open(status) if ":" in line)
        out[status.split("/")[4]] = fields["Cpus_allowed_list"].strip()
    return out
torch.set_num_threads(2)
os.sched_setaffinity(0, {0})  # as vLLM's CPU worker leaves the main thread: pinned to the first bound core
pinned = threading.Thread(target=lambda: (os.sched_setaffinity(0, {1}), time.sleep(60)), daemon=True)
pinned.start()  # ... and another of torch's threads to the second
time.sleep(0.2)
before = masks()
from vllm_thinkv.kernels.cpu_numba import warm_up
warm_up(torch.float32, 8, 16)
new = {tid: m for tid, m in masks().items() if tid not in before}
import numba
assert numba.config.NUMBA_NUM_THREADS == 2, numba.config.NUMBA_NUM_THREADS  # sized by torch's cores, not the pinned one
print(sorted(new.values()), os.sched_getaffinity(0))
"""


def test_thread_pool_runs_on_the_cores_torch_was_given():
    """numba's threads inherit the mask of the thread that starts its pool; started from a main thread pinned
    to one core (vLLM's binding), they must still spread over torch's cores, and the main thread stays pinned."""
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 usable cores to pin two threads apart")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}  # numba sizes its pool itself
    proc = subprocess.run([sys.executable, "-c", POOL_PROBE], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new_masks, main_mask = proc.stdout.strip().splitlines()[-1].split("] ")
    assert "'0-1'" in new_masks and "'0'" not in new_masks.replace("'0-1'", ""), proc.stdout
    assert main_mask == "{0}"
