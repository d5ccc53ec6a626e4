"""paged_attention (Triton) and paged_attention_torch against the float64 reference.

Every batch is ragged and mixed: two decodes (one crossing many blocks), a chunked
prefill over cached context and a full prefill. Caches are NaN-poisoned views of a
packed [.., r + d] buffer with shuffled physical blocks and random block-table
entries past each sequence's last block; `out` is NaN-poisoned before each call.
"""

from __future__ import annotations

import pytest
import torch

from vllm_thinkv.kernels import launch, paged_attention, paged_attention_torch
from vllm_thinkv.kernels.testing import random_paged_batch

from .helpers import DEVICE, MATRIX_DTYPES, assert_close_to_reference, poisoned_out, reference_output

MIXED_Q_LENS = [1, 7, 1, 19]
MIXED_SEQ_LENS = [37, 50, 90, 19]  # decode, chunked prefill (43 cached), long decode, full prefill

# (r, d, group, num_kv_heads, block_size, layout): every r in {8..256}, every d, every group in
# {1, 3, 4, 8}; r < 16 (8), non-power-of-two r (24, 40, 48), r < d, r == d (64, 128, 256),
# r > d (256 vs 128), a d that is a multiple of 16 but not a power of two (96); block sizes
# 16/32/48 and both packed-cache layouts, spread over the cases.
HEAD_CASES = [
    (8, 64, 4, 1, 16, "NHD"),
    (16, 128, 1, 2, 32, "HND"),
    (24, 64, 3, 2, 48, "NHD"),
    (32, 128, 4, 2, 16, "HND"),
    (40, 96, 1, 2, 16, "NHD"),
    (48, 256, 8, 1, 32, "NHD"),
    (64, 64, 4, 1, 48, "HND"),
    (128, 128, 3, 1, 16, "NHD"),
    (256, 128, 1, 1, 32, "HND"),
    (256, 256, 8, 1, 16, "NHD"),
]


def _batch(r, d, group, num_kv_heads, block_size, layout, dtype, q_lens=MIXED_Q_LENS, seq_lens=MIXED_SEQ_LENS,
           gaps=None, seed=0):
    return random_paged_batch(
        q_lens, seq_lens, num_heads=group * num_kv_heads, num_kv_heads=num_kv_heads, r=r, d=d,
        block_size=block_size, dtype=dtype, device=DEVICE, layout=layout, gaps=gaps, seed=seed,
    )


def _case_id(case):
    r, d, g, hkv, bs, layout = case
    return f"r{r}-d{d}-g{g}-hkv{hkv}-bs{bs}-{layout}"


@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
@pytest.mark.parametrize("case", HEAD_CASES, ids=_case_id)
def test_mixed_batch_matches_reference(case, dtype):
    d = case[1]
    batch = _batch(*case, dtype)
    ref = reference_output(batch)

    out = poisoned_out(batch, d)
    returned = paged_attention(*batch.args(), out=out)
    assert returned is out
    assert_close_to_reference(out, ref, dtype, "triton, mixed batch")

    # Split-KV forced on the decode sequences (3 splits: not a power of two, some splits empty).
    out = paged_attention(*batch.args(), out=poisoned_out(batch, d), num_splits=3)
    assert_close_to_reference(out, ref, dtype, "triton, mixed batch, 3 decode splits")

    out = paged_attention_torch(*batch.args(), out=poisoned_out(batch, d))
    assert_close_to_reference(out, ref, dtype, "torch path, mixed batch")


@pytest.mark.parametrize("num_splits", [None, 4])
def test_decode_only_batch(num_splits):
    """Decode-only plan (no prefill launch): single tokens and a 3-token speculative step
    (group 3: a decode program holds 5 tokens x 3 heads), contexts from 1 to 200 tokens."""
    batch = _batch(24, 128, 3, 2, 16, "HND", torch.float32, q_lens=[1, 3, 1, 1], seq_lens=[200, 41, 1, 16])
    ref = reference_output(batch)
    out = paged_attention(*batch.args(), out=poisoned_out(batch, 128), num_splits=num_splits,
                          max_seqlen_q=3, max_seqlen_k=200)
    assert_close_to_reference(out, ref, torch.float32, f"triton decode-only, splits={num_splits}")
    assert_close_to_reference(paged_attention_torch(*batch.args()), ref, torch.float32, "torch path decode-only")


def test_prefill_only_and_empty_sequences():
    """Long prompts spanning several query blocks, next to sequences with q_len = 0 (CUDA-graph padding)."""
    batch = _batch(32, 64, 4, 1, 16, "NHD", torch.float32, q_lens=[70, 0, 45, 0], seq_lens=[70, 0, 100, 9])
    ref = reference_output(batch)
    out = paged_attention(*batch.args(), out=poisoned_out(batch, 64))
    assert_close_to_reference(out, ref, torch.float32, "triton prefill-only")
    assert_close_to_reference(paged_attention_torch(*batch.args()), ref, torch.float32, "torch path prefill-only")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_tile_shapes_in_the_interpreter(gpu_tiles, dtype):
    """The H100 launch table (prefill BLOCK_M 128 / 64, TILE_N 64, the split-KV heuristic) on any device."""
    batch = _batch(48, 128, 4, 1, 16, "HND", dtype, q_lens=[1, 150, 1], seq_lens=[300, 160, 70])
    ref = reference_output(batch)
    out = paged_attention(*batch.args(), out=poisoned_out(batch, 128))
    assert_close_to_reference(out, ref, dtype, "GPU tiles, mixed")
    decode = _batch(16, 64, 8, 1, 32, "NHD", dtype, q_lens=[1, 1], seq_lens=[600, 77], seed=3)
    assert launch.decode_splits(2, 1, 600, launch.device_facts(None)) == 2  # so the merge runs
    out = paged_attention(*decode.args(), out=poisoned_out(decode, 64))
    assert_close_to_reference(out, reference_output(decode), dtype, "GPU tiles, split decode")


def test_host_hints_skip_the_sync_and_match():
    """With max_seqlen_q/k given, the result is the same as with them computed."""
    batch = _batch(32, 128, 4, 1, 16, "NHD", torch.float32)
    computed = paged_attention(*batch.args())
    hinted = paged_attention(*batch.args(), max_seqlen_q=batch.max_seqlen_q, max_seqlen_k=batch.max_seqlen_k)
    assert torch.equal(computed, hinted)


def test_empty_batch():
    batch = _batch(32, 64, 2, 1, 16, "NHD", torch.float32, q_lens=[0], seq_lens=[5])
    assert paged_attention(*batch.args()).shape == (0, 2, 64)
    assert paged_attention_torch(*batch.args()).shape == (0, 2, 64)


def test_strided_q_and_out():
    """q and out as vLLM hands them over: head-major views into wider buffers (a fused qkv
    projection, a padded output), not contiguous tensors."""
    batch = _batch(24, 64, 3, 2, 16, "NHD", torch.float32)
    ref = reference_output(batch)
    num_tokens, num_heads, r = batch.q.shape
    qkv = torch.randn(num_tokens, num_heads * r + 40, device=DEVICE)
    qkv[:, 8 : 8 + num_heads * r] = batch.q.reshape(num_tokens, -1)
    q = qkv[:, 8 : 8 + num_heads * r].view(num_tokens, num_heads, r)
    wide_out = torch.full((num_tokens, num_heads, 80), float("nan"), device=DEVICE)
    out = wide_out[..., :64]
    args = (q, *batch.args()[1:])
    assert not q.is_contiguous() and not out.is_contiguous()
    assert paged_attention(*args, out=out) is out
    assert_close_to_reference(out, ref, torch.float32, "triton, strided q/out")
    assert wide_out[..., 64:].isnan().all()  # nothing written past the view
    assert_close_to_reference(paged_attention_torch(*args, out=out.fill_(float("nan"))), ref, torch.float32,
                              "torch path, strided q/out")
