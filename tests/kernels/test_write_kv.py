"""write_kv (Triton) and write_kv_torch against the reference scatter, on NaN-poisoned packed caches."""

from __future__ import annotations

import pytest
import torch

from vllm_thinkv.kernels import paged_attention, paged_attention_torch, reference, write_kv, write_kv_torch
from vllm_thinkv.kernels.testing import packed_kv_cache

from .helpers import DEVICE, assert_close_to_reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CASES = [  # (r, d, num_kv_heads, block_size, layout)
    (8, 64, 3, 16, "NHD"),
    (24, 128, 2, 48, "HND"),
    (32, 256, 1, 32, "NHD"),
    (256, 128, 2, 16, "HND"),
]


def _inputs(r, d, num_kv_heads, block_size, layout, dtype, slot_dtype, seed=0):
    """Projections as vLLM hands them over: strided views of one fused qkv output, with 2 padding
    rows past the slot mapping; slots in shuffled blocks, some -1."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks, num_tokens = 6, 23
    qkv = torch.randn(num_tokens + 2, 5 + num_kv_heads * (r + d), generator=gen).to(DEVICE, dtype)
    key = qkv[:, 5 : 5 + num_kv_heads * r].view(-1, num_kv_heads, r)
    value = qkv[:, 5 + num_kv_heads * r :].view(-1, num_kv_heads, d)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::4] = -1
    packed, key_cache, value_cache = packed_kv_cache(num_blocks, block_size, num_kv_heads, r, d, dtype, DEVICE, layout)
    return key, value, packed, key_cache, value_cache, slots.to(DEVICE, slot_dtype)


def _layout_views(packed, r, layout):
    logical = packed if layout == "NHD" else packed.transpose(1, 2)
    return logical[..., :r], logical[..., r:]


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"r{c[0]}-d{c[1]}-hkv{c[2]}-bs{c[3]}-{c[4]}")
def test_write_kv_matches_reference(case, dtype, slot_dtype):
    r, _, _, _, layout = case
    key, value, packed, key_cache, value_cache, slots = _inputs(*case, dtype, slot_dtype)
    expected = packed.clone()
    reference.write_kv(key, value, *_layout_views(expected, r, layout), slots)
    assert expected.isnan().any() and not torch.equal(expected.nan_to_num(), packed.nan_to_num())  # non-vacuous

    for op in (write_kv, write_kv_torch):
        got = packed.clone()
        op(key, value, *_layout_views(got, r, layout), slots)
        # Bit-exact, NaN where nothing was written: a copy must not round, and must not touch other slots.
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=f"{op.__name__}")


def test_write_then_attend_round_trip():
    """write_kv fills a cache that both attention paths then read correctly."""

    r, d, hkv, bs = 16, 64, 2, 16
    key, value, packed, key_cache, value_cache, _ = _inputs(r, d, hkv, bs, "NHD", torch.float32, torch.int64)
    slots = torch.tensor([3 * bs + i for i in range(16)] + [1 * bs + i for i in range(2)], device=DEVICE)
    write_kv(key, value, key_cache, value_cache, slots)
    block_table = torch.tensor([[3, 1]], dtype=torch.int32, device=DEVICE)
    q = torch.randn(18, 4, r, device=DEVICE)
    args = (q, key_cache, value_cache, block_table, torch.tensor([0, 18], dtype=torch.int32, device=DEVICE),
            torch.tensor([18], dtype=torch.int32, device=DEVICE), 0.25)
    ref = reference.paged_attention(*args)
    assert_close_to_reference(paged_attention(*args), ref, torch.float32, "triton after write_kv")
    assert_close_to_reference(paged_attention_torch(*args), ref, torch.float32, "torch after write_kv")


def test_no_tokens_is_a_no_op():
    key, value, packed, key_cache, value_cache, slots = _inputs(8, 64, 1, 16, "NHD", torch.float32, torch.int32)
    before = packed.clone()
    write_kv(key, value, key_cache, value_cache, slots[:0])
    write_kv_torch(key, value, key_cache, value_cache, slots[:0])
    torch.testing.assert_close(packed, before, rtol=0, atol=0, equal_nan=True)

