"""Float64 oracles for the kernels: naive, per sequence and head, independent of any tiling.

Written for obviousness, not speed: every key position is looked up through the
block table one by one, and only positions a query may see are ever read, so the
NaN-filled slots that the tests plant in unused cache memory cannot leak in.

Shared keys (key_share = S): query head h (KV head g = h // group) uses the key
key_cache[block, offset, (g // S) * S : (g // S + 1) * S].flatten(), the S * r-dim
concatenation of its share group's slots, and the value of head g.

Counts (log_counts given): slot (block, offset) of KV head g stands for count = exp(log_counts[block,
offset, g]) tokens, and the softmax weighs it by that count: weight_p = count_p exp(s_p) / Σ count exp(s),
i.e. ln(count) is added to the logit of every query head of g.
"""

from __future__ import annotations

import torch

from .calls import AttentionCall, KVWrite, attention_op, write_kv_op


def _slot(block_table: torch.Tensor, seq: int, pos: int, block_size: int) -> tuple[int, int]:
    return int(block_table[seq, pos // block_size]), pos % block_size


@attention_op
def paged_attention(call: AttentionCall, out: torch.Tensor | None, num_splits: int | None) -> torch.Tensor:
    """[T, H, d] float64: softmax(scale · q·k + ln count) · v over positions p <= the query's (and,
    with a sliding window W, p > the query's - W), outside the gap.

    A query with no visible key gets 0. Same arguments as the ops; returns a new CPU tensor
    (`out` must be None) and ignores the launch hints (max_seqlen_*, num_splits).
    """
    assert out is None, "the reference returns a new float64 tensor"
    del num_splits
    num_tokens, num_heads, _ = call.q.shape
    _, block_size, num_kv_heads, _ = call.key_cache.shape
    group = num_heads // num_kv_heads
    share = call.key_share
    result = torch.zeros(num_tokens, num_heads, call.value_cache.shape[-1], dtype=torch.float64)
    cu = call.cu_seqlens_q.tolist()
    for seq, seq_len in enumerate(call.seq_lens.tolist()):
        first, last = cu[seq], cu[seq + 1]
        q_len = last - first
        gap_lo, gap_hi = call.gaps[seq].tolist() if call.gaps is not None else (0, 0)
        window = call.sliding_window
        first_seen = 0 if window is None else max(0, seq_len - q_len - window + 1)  # the first query's window
        kept = [p for p in range(first_seen, seq_len) if not gap_lo <= p < gap_hi]
        if q_len == 0 or not kept:
            continue
        slots = [_slot(call.block_table, seq, p, block_size) for p in kept]
        keys = torch.stack([call.key_cache[b, o].double().cpu() for b, o in slots])  # [P, Hkv, r]
        values = torch.stack([call.value_cache[b, o].double().cpu() for b, o in slots])  # [P, Hkv, d]
        bias = (torch.zeros(len(slots), num_kv_heads, dtype=torch.float64) if call.log_counts is None else
                torch.stack([call.log_counts[b, o].double().cpu() for b, o in slots]))  # [P, Hkv]
        positions = torch.tensor(kept)
        for j in range(q_len):
            t = seq_len - q_len + j
            visible = positions <= t
            if window is not None:
                visible &= positions > t - window
            if not visible.any():
                continue
            for h in range(num_heads):
                kv_head = h // group
                first_slot = kv_head // share * share  # the share group's key slots, concatenated
                k = keys[visible, first_slot : first_slot + share].flatten(1)  # [P, share * r]
                v = values[visible, kv_head]
                logits = k @ call.q[first + j, h].double().cpu() * call.scale + bias[visible, kv_head]
                weights = torch.softmax(logits, dim=0)
                result[first + j, h] = weights @ v
    return result


@write_kv_op
def write_kv(write: KVWrite) -> None:
    """In place: cache[slot // block_size, slot % block_size] = token, one token at a time; slot -1 skips."""
    for t, block, offset in zip(*(index.tolist() for index in write.destinations())):
        write.key_cache[block, offset] = write.key[t]
        write.value_cache[block, offset] = write.value[t]
