"""Merge the split-KV partials of the decode launch into the final output.

Each split wrote its normalised output o_s and lse_s = log2 Σ exp2(scores) over its
slice of keys (-inf when the slice held no visible key). The exact result is
Σ_s w_s o_s / Σ_s w_s with w_s = exp2(lse_s - max lse).
The grid covers every row of `out`; rows past cu_seqlens_q[num_seqs] are padding (vLLM pads a
batch to a captured CUDA-graph size) and are left untouched.
"""

import triton
import triton.language as tl

from .attention_kernel import find_sequence


@triton.jit
def merge_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, D]
    part_out_ptr,  # [num_tokens, num_heads, NUM_SPLITS, D_PAD] fp32
    part_lse_ptr,  # [num_tokens, num_heads, NUM_SPLITS] fp32
    cu_seqlens_q_ptr,
    num_seqs,
    num_heads,
    stride_o_t, stride_o_h, stride_o_c,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # next_pow2(NUM_SPLITS)
    DECODE_MAX_Q: tl.constexpr,  # only tokens of sequences with q_len <= this were split
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(cu_seqlens_q_ptr + num_seqs):  # a padding row: no sequence owns it
        return
    seq = find_sequence(cu_seqlens_q_ptr, token, num_seqs, 1, False)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - tl.load(cu_seqlens_q_ptr + seq)
    if q_len > DECODE_MAX_Q:
        return

    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < D
    part_row = (token.to(tl.int64) * num_heads + head) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + part_row, mask=s_ok, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty: all weights 0
    w = tl.where(lse > float("-inf"), tl.exp2(lse - lse_ref), 0.0)
    o = tl.load(part_out_ptr + part_row[:, None] * D_PAD + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                other=0.0)
    total = tl.sum(w, axis=0)
    merged = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + token.to(tl.int64) * stride_o_t + head * stride_o_h + offs_d * stride_o_c,
        merged.to(out_ptr.dtype.element_ty),
        mask=d_ok,
    )
