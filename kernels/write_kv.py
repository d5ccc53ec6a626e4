"""Scatter this step's keys and values into the paged KV cache (Triton).

Slot s of the cache is (block s // block_size, offset s % block_size); slot -1 means
"do not store this token" (vLLM's padding convention). The caches may be strided
views of one packed buffer, so every stride is passed explicitly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .calls import KVWrite, write_kv_op
from .checks import check_write_kv
from .launch import KernelCall, interpreting


@triton.jit
def write_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    stride_slot,
    stride_kt, stride_kh, stride_kc,
    stride_vt, stride_vh, stride_vc,
    stride_kb, stride_ks, stride_kch, stride_kcc,
    stride_vb, stride_vs, stride_vch, stride_vcc,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per token: copy its [num_kv_heads, R] key and [num_kv_heads, D] value rows."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token * stride_slot).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    h_ok = heads < NUM_KV_HEADS

    offs_r = tl.arange(0, R_PAD)
    k_mask = h_ok[:, None] & (offs_r < R)[None, :]
    k_src = key_ptr + token * stride_kt + heads[:, None] * stride_kh + offs_r[None, :] * stride_kc
    k_dst = key_cache_ptr + block * stride_kb + in_block * stride_ks + heads[:, None] * stride_kch
    tl.store(k_dst + offs_r[None, :] * stride_kcc, tl.load(k_src, mask=k_mask), mask=k_mask)

    offs_d = tl.arange(0, D_PAD)
    v_mask = h_ok[:, None] & (offs_d < D)[None, :]
    v_src = value_ptr + token * stride_vt + heads[:, None] * stride_vh + offs_d[None, :] * stride_vc
    v_dst = value_cache_ptr + block * stride_vb + in_block * stride_vs + heads[:, None] * stride_vch
    tl.store(v_dst + offs_d[None, :] * stride_vcc, tl.load(v_src, mask=v_mask), mask=v_mask)


@write_kv_op
def write_kv(write: KVWrite) -> None:
    """Store key[t] / value[t] at cache slot slot_mapping[t] for t < len(slot_mapping); slot -1 skips.

    Called as write_kv(key, value, key_cache, value_cache, slot_mapping) (`calls.write_kv_op`):
    key [T, Hkv, r], value [T, Hkv, d], key_cache [num_blocks, block_size, Hkv, r],
    value_cache [num_blocks, block_size, Hkv, d] (any strides), slot_mapping [T'] int32/int64
    with T' <= T. Slots must be -1 or < num_blocks * block_size (not checked: no device sync).
    """
    check_write_kv(write, triton_path=True, interpreting=interpreting())
    for kernel_launch in plan_write_kv(write):
        kernel_launch()


def plan_write_kv(write: KVWrite) -> list[KernelCall]:
    """The launch of one validated `write_kv` call (none for zero tokens)."""
    num_tokens = write.slot_mapping.shape[0]
    if num_tokens == 0:
        return []
    _, block_size, num_kv_heads, r = write.key_cache.shape
    d = write.value_cache.shape[3]
    args = (
        write.key, write.value, write.key_cache, write.value_cache, write.slot_mapping, write.slot_mapping.stride(0),
        *write.key.stride(), *write.value.stride(), *write.key_cache.stride(), *write.value_cache.stride(),
    )
    constexprs = dict(
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        R=r, R_PAD=triton.next_power_of_2(r), D=d, D_PAD=triton.next_power_of_2(d), BLOCK_SIZE=block_size,
    )
    return [KernelCall(write_kv_kernel, (num_tokens,), args, constexprs, dict(num_warps=4))]
