"""Shared keys (key_share = S): one key latent per token shared by S KV heads, stored across their S slots.

paged_attention (Triton; the interpreter on CPU) and paged_attention_torch against the
float64 reference, on the same NaN-poisoned random paged batches as test_paged_attention
(shuffled blocks, garbage block-table tails, NaN null block, poisoned `out`). Every batch
mixes a decode over many tiles, a chunked prefill over cached context and a full prefill.
The reference's shared mode is itself checked against the per-head mode on a cache where
every KV head holds its group's concatenated key.
"""

from __future__ import annotations

import pytest
import torch

from vllm_thinkv.kernels import launch, paged_attention, paged_attention_torch, reference
from vllm_thinkv.kernels.attention import plan_attention
from vllm_thinkv.kernels.checks import attention_shape
from vllm_thinkv.kernels.testing import PagedBatch, random_paged_batch

from .helpers import DEVICE, assert_close_to_reference, poisoned_out, reference_output

Q_LENS = [1, 17, 18]  # q_len 17 and 18 exceed every decode launch's DECODE_MAX_Q (<= 16): prefill launch
SEQ_LENS = [75, 50, 18]  # decode over 3 interpreter tiles, chunked prefill (33 cached), full prefill

# (num_kv_heads, key_share, r, d, group, block_size, layout): Hkv 1, 2, 3, 8; r 8..64; S = Hkv and
# partial shares (2 and 4 of 8); groups 1 and > 1; shared widths S * r from 16 to the 256 limit.
CASES = [
    (1, 1, 64, 64, 4, 16, "NHD"),  # one KV head: S = Hkv = 1
    (2, 2, 16, 128, 3, 32, "HND"),  # S = Hkv, r < d, odd group
    (3, 3, 24, 64, 2, 16, "NHD"),  # S = Hkv = 3: qk = 72, padded to 128
    (8, 8, 32, 64, 1, 16, "HND"),  # S = Hkv = 8, MHA: qk = 256 (the limit) > d
    (8, 2, 8, 64, 2, 16, "NHD"),  # partial share, r < 16 (qk = 16)
    (8, 4, 16, 64, 1, 16, "HND"),  # partial share, MHA (qk = 64 = d)
]


def _batch(num_kv_heads, key_share, r, d, group, block_size, layout, dtype, q_lens=Q_LENS, seq_lens=SEQ_LENS,
           gaps=None, seed=0) -> PagedBatch:
    return random_paged_batch(
        q_lens, seq_lens, num_heads=group * num_kv_heads, num_kv_heads=num_kv_heads, r=r, d=d,
        block_size=block_size, dtype=dtype, device=DEVICE, layout=layout, gaps=gaps, key_share=key_share, seed=seed,
    )


def _case_id(case):
    hkv, s, r, d, g, bs, layout = case
    return f"hkv{hkv}-S{s}-r{r}-d{d}-g{g}-bs{bs}-{layout}"


def _check_both_paths(batch: PagedBatch, dtype: torch.dtype, what: str, num_splits: int | None = None) -> None:
    ref = reference_output(batch)
    d = batch.value_cache.shape[-1]
    opts = dict(gaps=batch.gaps, key_share=batch.key_share)
    out = poisoned_out(batch, d)
    assert paged_attention(*batch.args(), out=out, num_splits=num_splits, **opts) is out
    assert_close_to_reference(out, ref, dtype, f"triton, {what}, splits={num_splits}")
    out = paged_attention_torch(*batch.args(), out=poisoned_out(batch, d), **opts)
    assert_close_to_reference(out, ref, dtype, f"torch path, {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_shared_keys_mixed_batch(case, dtype):
    _check_both_paths(_batch(*case, dtype), dtype, "shared keys, mixed batch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shared_keys_split_decode(dtype):
    """Decode-only plan with split-KV forced to 2 (plus the merge): single tokens and a 3-token step."""
    batch = _batch(2, 2, 32, 64, 4, 16, "HND", dtype, q_lens=[1, 3, 1], seq_lens=[120, 41, 1], seed=1)
    _check_both_paths(batch, dtype, "shared keys, decode-only", num_splits=2)


def test_shared_keys_with_gaps():
    """Gaps (whole null blocks, mid-block edges, from position 0) with a partial share: 2 of 4 KV heads."""
    batch = _batch(4, 2, 16, 64, 2, 16, "NHD", torch.float32, q_lens=[1, 3, 17], seq_lens=[80, 60, 50],
                   gaps=[(16, 64), (5, 41), (0, 30)], seed=2)
    _check_both_paths(batch, torch.float32, "shared keys with gaps")
    _check_both_paths(batch, torch.float32, "shared keys with gaps", num_splits=2)


def _widened(batch: PagedBatch) -> PagedBatch:
    """The same call with key_share 1 on a cache whose every KV head holds its share group's concatenated key."""
    s = batch.key_share
    num_blocks, block_size, num_kv_heads, r = batch.key_cache.shape
    wide = batch.key_cache.reshape(num_blocks, block_size, num_kv_heads // s, s * r).repeat_interleave(s, dim=2)
    return PagedBatch(q=batch.q, key_cache=wide, value_cache=batch.value_cache, block_table=batch.block_table,
                      cu_seqlens_q=batch.cu_seqlens_q, seq_lens=batch.seq_lens, scale=batch.scale, gaps=batch.gaps,
                      packed=batch.packed)


def test_shared_keys_equal_per_head_keys_on_a_widened_cache():
    """The definition, checked independently of the reference's shared-key loop: S slots of r dims read as one
    S * r-dim key equal per-head S * r-dim keys holding that concatenation (the well-tested key_share=1 mode)."""
    batch = _batch(8, 4, 8, 64, 2, 16, "HND", torch.float32, seed=3)
    wide = _widened(batch)
    ref = reference_output(batch)
    torch.testing.assert_close(ref, reference_output(wide), rtol=1e-12, atol=1e-12)
    per_head = paged_attention(*wide.args())
    torch.testing.assert_close(paged_attention(*batch.args(), key_share=4), per_head, rtol=1e-6, atol=1e-6)
    # Guard against a vacuous pass: ignoring the share (each head's own r-dim slot, zero-padded q) differs.
    own_slot = reference.paged_attention(batch.q[..., :8], *batch.args()[1:])
    assert float((own_slot - ref).norm() / ref.norm()) > 1e-1


def test_key_share_1_is_the_existing_behaviour():
    """key_share=1 passed explicitly is the default call, bit for bit, in all three implementations, and plans
    the per-head kernel (KEY_SHARE=1, padded to r as before)."""
    batch = _batch(2, 1, 24, 64, 3, 16, "NHD", torch.float32, seed=4)
    for op in (paged_attention, paged_attention_torch, reference.paged_attention):
        assert torch.equal(op(*batch.args()), op(*batch.args(), key_share=1)), op.__module__
    shape = attention_shape(batch)
    assert (shape.key_share, shape.qk) == (1, 24)
    out = batch.q.new_empty(shape.num_tokens, shape.num_heads, shape.d)
    for call in plan_attention(batch, shape, out, max_seqlen_q=18, max_seqlen_k=75, num_splits=None,
                               facts=launch.device_facts(batch.q.device)):
        if "KEY_SHARE" in call.constexprs:
            assert call.constexprs["KEY_SHARE"] == 1 and call.constexprs["QK_PAD"] == launch.head_pads(24, 64)[0]


def test_shared_key_plan_sizes_tiles_by_the_shared_width():
    """Tiles and padding follow qk = key_share * r; the grid stays per KV head (values are per head)."""
    facts = launch.DeviceFacts("sm90", 132, 232448)
    batch = random_paged_batch([1, 40], [300, 60], num_heads=16, num_kv_heads=8, r=32, d=128, block_size=16,
                               dtype=torch.bfloat16, key_share=4)
    shape = attention_shape(batch)
    assert (shape.key_share, shape.qk) == (4, 128)
    out = batch.q.new_empty(shape.num_tokens, shape.num_heads, shape.d)
    decode, prefill = plan_attention(batch, shape, out, max_seqlen_q=40, max_seqlen_k=300, num_splits=None,
                                     facts=facts)
    for call, phase in ((decode, "decode"), (prefill, "prefill")):
        cfg = launch.tile_config(phase, 128, 128, 2, torch.bfloat16, facts)
        assert call.constexprs["KEY_SHARE"] == 4 and call.constexprs["R"] == 32
        assert call.constexprs["QK_PAD"] == 128 and call.constexprs["TILE_N"] == cfg.tile_n
        assert call.constexprs["BLOCK_M"] == cfg.block_m and call.grid[1] == 8
