"""What full CUDA graphs need from the attention ops (the backend's UNIFORM_BATCH support).

vLLM pads a batch to a captured size: q/out rows past cu_seqlens_q[-1], and requests with no query
tokens and seq_len 0. A captured graph replays the capture's launches (grids, constexprs, scalar
arguments) over vLLM's persistent metadata buffers refilled with each step's values. So:
- padded rows are neither read as queries nor written, by every implementation of the op;
- the launch plan is a pure function of the batch's shape and the context bucket;
- one plan, launched again after its buffers are refilled with another batch, gives that batch's output.
The float64 reference is computed on each batch alone; unused cache slots and padded q rows hold NaN.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_thinkv.kernels import launch, paged_attention, paged_attention_torch
from vllm_thinkv.kernels.attention import plan_attention
from vllm_thinkv.kernels.checks import attention_shape
from vllm_thinkv.kernels.cpu_numba import available as numba_available
from vllm_thinkv.kernels.cpu_numba import paged_attention_numba
from vllm_thinkv.kernels.testing import StepBuffers, random_paged_batch

from .helpers import DEVICE, assert_close_to_reference, reference_output

H100 = launch.DeviceFacts("sm90", 132, 232448)
SENTINEL = 1234.5  # what the padded output rows hold before and must hold after
HEADS, KV_HEADS, R, D, BLOCK = 4, 2, 16, 32, 16


def padded_batch(q_lens, seq_lens, pad_requests: int, pad_rows: int, seed: int, dtype=torch.float32):
    """A batch as vLLM pads it: `pad_requests` trailing requests with q_len = seq_len = 0, and
    `pad_rows` NaN q rows past the last query token."""
    b = random_paged_batch(list(q_lens) + [0] * pad_requests, list(seq_lens) + [0] * pad_requests,
                           num_heads=HEADS, num_kv_heads=KV_HEADS, r=R, d=D, block_size=BLOCK, dtype=dtype,
                           device=DEVICE, seed=seed)
    nan_rows = torch.full((pad_rows, *b.q.shape[1:]), float("nan"), dtype=dtype, device=DEVICE)
    return dataclasses.replace(b, q=torch.cat([b.q, nan_rows]))


def step_buffers(num_seqs: int, num_rows: int) -> StepBuffers:
    return StepBuffers(num_seqs, num_rows, num_blocks=100, width=16, num_heads=HEADS, num_kv_heads=KV_HEADS, r=R,
                       d=D, block_size=BLOCK, device=DEVICE)


def padded_out(batch, num_real: int) -> torch.Tensor:
    out = torch.full((batch.q.shape[0], HEADS, D), float("nan"), dtype=batch.q.dtype, device=DEVICE)
    out[num_real:] = SENTINEL
    return out


def check(out, batch, num_real: int, what: str) -> None:
    ref = reference_output(batch)
    assert_close_to_reference(out[:num_real], ref[:num_real], batch.q.dtype, what)
    assert (out[num_real:] == SENTINEL).all(), f"{what}: a padding row of out was written"


OPS = [pytest.param(paged_attention, None, id="triton"), pytest.param(paged_attention, 3, id="triton-split3"),
       pytest.param(paged_attention_torch, None, id="torch"),
       pytest.param(paged_attention_numba, 2, id="numba-split2",
                    marks=pytest.mark.skipif(not numba_available(), reason="numba is a CPU-serving extra"))]


@pytest.mark.parametrize("op,splits", OPS)
@pytest.mark.parametrize("maxima", [True, False], ids=["host-maxima", "validated"])
@pytest.mark.parametrize("q_lens,seq_lens", [([1, 1, 1], [40, 75, 3]), ([1, 20, 1], [90, 20, 33])],
                         ids=["decode", "mixed"])
def test_padded_rows_are_not_read_or_written(op, splits, maxima, q_lens, seq_lens):
    if op is paged_attention_torch and splits:
        pytest.skip("the torch op has no split-KV")
    batch = padded_batch(q_lens, seq_lens, pad_requests=2, pad_rows=5, seed=1)
    num_real = sum(q_lens)
    out = padded_out(batch, num_real)
    hints = dict(max_seqlen_q=batch.max_seqlen_q, max_seqlen_k=batch.max_seqlen_k) if maxima else {}
    kwargs = dict(num_splits=splits) if splits else {}
    op(*batch.args(), out=out, **hints, **kwargs)
    check(out, batch, num_real, op.__name__)


def signature(calls: list[launch.KernelCall]) -> list[tuple]:
    """Everything a captured launch freezes: kernel, grid, constexprs, options, scalar arguments and
    tensor shapes/strides (the tensors themselves are vLLM's buffers, refilled at each replay)."""
    def arg(a):
        return ("tensor", tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
    return [(c.kernel.fn.__name__, c.grid, sorted(c.constexprs.items()), sorted(c.options.items()),
             tuple(arg(a) for a in c.args)) for c in calls]


def plan_of(batch, max_seqlen_q: int, max_seqlen_k: int, facts=H100) -> list[launch.KernelCall]:
    shape = attention_shape(batch)
    out = torch.empty(shape.num_tokens, shape.num_heads, shape.d, dtype=batch.q.dtype, device=DEVICE)
    return plan_attention(batch, shape, out, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                          num_splits=None, facts=facts)


@pytest.mark.parametrize("q_len", [1, 3, 10], ids=lambda q: f"q{q}")  # decode, spec-decode, prefill launch
def test_launch_plan_is_a_function_of_batch_shape_and_context_bucket(q_len):
    """Uniform batches of 6 requests (some padding) and 6 * q_len rows, random contents: one plan per
    context bucket, whatever the lengths, tables, number of padded requests and max_seqlen_k in it."""
    gen = torch.Generator().manual_seed(0)
    buffers = step_buffers(num_seqs=6, num_rows=6 * q_len)
    for bucket_lo, bucket_hi in [(256, 512), (1024, 2048), (4096, 8192)]:
        plans = set()
        for trial in range(4):
            real = int(torch.randint(1, 5, (1,), generator=gen))
            lens = torch.randint(q_len, 200, (real,), generator=gen).tolist()
            max_k = int(torch.randint(bucket_lo, bucket_hi, (1,), generator=gen))
            batch = padded_batch([q_len] * real, lens, pad_requests=6 - real, pad_rows=q_len * (6 - real),
                                 seed=trial)
            assert launch.context_bucket(max_k) == bucket_lo // launch.MIN_SPLIT_TOKENS
            plans.add(repr(signature(plan_of(buffers.load(batch), q_len, max_k))))
        assert len(plans) == 1, f"q_len {q_len}, bucket [{bucket_lo}, {bucket_hi}): {len(plans)} different plans"
    # The bucket is what changes a decode plan (the split count): captured at max_model_len, it is that bucket's.
    small = padded_batch([1], [50], pad_requests=1, pad_rows=0, seed=0)
    assert signature(plan_of(small, 1, 300)) != signature(plan_of(small, 1, 5000))


@pytest.mark.parametrize("q_len,splits", [(1, 4), (3, 2), (10, 1)], ids=["decode-split4", "spec3-split2", "prefill"])
def test_one_plan_replays_batches_of_different_contents(q_len, splits):
    """Plan once over persistent buffers (as a capture does), then refill the buffers with a second
    batch of the same shape and launch the same plan again (as a replay does)."""
    num_seqs, num_rows = 5, 4 * q_len + 3
    batches = [padded_batch([q_len] * 4, [40, 75, q_len, 120], pad_requests=1, pad_rows=num_rows - 4 * q_len,
                            seed=2),
               padded_batch([q_len] * 2, [130, 17], pad_requests=3, pad_rows=num_rows - 2 * q_len, seed=3)]
    buffers = step_buffers(num_seqs, num_rows)
    out = torch.empty(num_rows, HEADS, D, device=DEVICE)
    capture = buffers.load(batches[0])
    plan = plan_attention(capture, attention_shape(capture), out, max_seqlen_q=q_len,
                          max_seqlen_k=buffers.block_table.shape[1] * BLOCK, num_splits=splits,
                          facts=launch.device_facts(out.device))
    takes_prefill = any(c.constexprs.get("DECODE") is False for c in plan)
    assert takes_prefill == (q_len > plan[0].constexprs["DECODE_MAX_Q"])
    for b in batches:
        buffers.load(b)  # the step's values, in place
        num_real = int(b.cu_seqlens_q[-1])
        out.fill_(float("nan"))
        out[num_real:] = SENTINEL
        for kernel_launch in plan:
            kernel_launch()
        check(out, b, num_real, f"replay of q_len {q_len}")
