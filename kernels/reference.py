"""Float64 oracles for the kernels: naive, per sequence and head, independent of any tiling.

Written for obviousness, not speed: every key position is looked up through the
block table one by one, and only positions a query may see are ever read, so the
NaN-filled slots that the tests plant in unused cache memory cannot leak in.
"""

from __future__ import annotations

import torch


def _slot(block_table: torch.Tensor, seq: int, pos: int, block_size: int) -> tuple[int, int]:
    return int(block_table[seq, pos // block_size]), pos % block_size


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    gaps: torch.Tensor | None = None,
) -> torch.Tensor:
    """[T, H, d] float64: softmax(scale · q·k) · v over positions p <= the query's, outside the gap.

    A query with no visible key gets 0.
    """
    num_tokens, num_heads, _ = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_heads, value_cache.shape[-1], dtype=torch.float64)
    cu = cu_seqlens_q.tolist()
    for seq, seq_len in enumerate(seq_lens.tolist()):
        first, last = cu[seq], cu[seq + 1]
        q_len = last - first
        gap_lo, gap_hi = gaps[seq].tolist() if gaps is not None else (0, 0)
        kept = [p for p in range(seq_len) if not gap_lo <= p < gap_hi]
        if q_len == 0 or not kept:
            continue
        slots = [_slot(block_table, seq, p, block_size) for p in kept]
        keys = torch.stack([key_cache[b, o].double().cpu() for b, o in slots])  # [P, Hkv, r]
        values = torch.stack([value_cache[b, o].double().cpu() for b, o in slots])  # [P, Hkv, d]
        positions = torch.tensor(kept)
        for j in range(q_len):
            visible = positions <= seq_len - q_len + j
            if not visible.any():
                continue
            for h in range(num_heads):
                k = keys[visible, h // group]
                v = values[visible, h // group]
                weights = torch.softmax(k @ q[first + j, h].double().cpu() * scale, dim=0)
                out[first + j, h] = weights @ v
    return out


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """In place: cache[slot // block_size, slot % block_size] = token, one token at a time; slot -1 skips."""
    block_size = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        key_cache[slot // block_size, slot % block_size] = key[t]
        value_cache[slot // block_size, slot % block_size] = value[t]
