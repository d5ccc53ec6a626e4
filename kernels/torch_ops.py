"""Vectorised torch versions of the ops, for serving on CPU (and anywhere without Triton).

Same signatures and semantics as `paged_attention` / `write_kv`, computed in the input
dtype. Per sequence, the kept key positions (everything before the gap and after it)
are gathered block-wise through the block table, so gap slots are never read, and
`scaled_dot_product_attention` runs with a lower-right causal mask: dropping a gap
that lies entirely in the cached context keeps the query tokens at the end, so the
mask stays the standard "query i sees all but the last q_len - 1 - i keys".
With a sliding window W, the queries go in chunks of max(W, WINDOW_QUERY_CHUNK) tokens;
each chunk gathers keys from its first query's window start (blocks left of every
window are never read: vLLM frees them) and a boolean mask built from the kept keys'
positions applies t - W < p <= t; a single query token sees every key gathered.

Shared keys (key_share = S > 1, see `attention.paged_attention`): the gathered keys
[P, Hkv, r] are viewed as one [P, Hkv / S, S * r] key per share group and repeated S
times along the heads, so every KV head has its group's S * r-dim key next to its own
values and SDPA's grouped-query mode maps query heads to KV heads as usual. The copy
costs S times the key bytes of one sequence; the QK work is S times that of r-dim keys.

Counts (log_counts, see `attention.paged_attention`): the kept slots' ln(count) are gathered like
the keys and passed to SDPA as a float mask (the bias, -inf where causality or the window hides a
key), in float32 so the bias is not rounded to a 16-bit dtype. Where every gathered count is 1
(ln 0: no merged slot, as in every prefill before compaction) the bias adds nothing and is left
out: a float mask of [heads, queries, keys] takes SDPA's slow path (a 4k-token prefill chunk: ~0.6 GB
of mask per layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .calls import AttentionCall, KVWrite, attention_op, write_kv_op
from .checks import attention_metadata_limits, check_attention_call, check_write_kv


# Fewest query tokens per SDPA call under a sliding window (a smaller window still takes this many).
WINDOW_QUERY_CHUNK = 16


def gather_tokens(cache: torch.Tensor, blocks: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Tokens [start, end) of one sequence from a paged cache: [end - start, Hkv, dim], reading only
    their blocks. `blocks` is the sequence's block-table row."""
    block_size = cache.shape[1]
    first, last = start // block_size, -(-end // block_size)
    # index_select, not cache[ids]: on these strided views advanced indexing is ~100x slower.
    tokens = cache.index_select(0, blocks[first:last].long()).flatten(0, 1)
    return tokens[start - first * block_size : end - first * block_size]


def _kept_ranges(start: int, seq_len: int, gap: tuple[int, int]) -> list[tuple[int, int]]:
    """The non-empty position ranges of [start, seq_len) outside the gap [lo, hi)."""
    lo, hi = gap
    if lo >= hi:
        return [(start, seq_len)]
    ranges = [(start, min(lo, seq_len)), (max(start, hi), seq_len)]
    return [(a, b) for a, b in ranges if a < b]


def _kept(cache: torch.Tensor, blocks: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    parts = [gather_tokens(cache, blocks, a, b) for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _window_mask(ranges: list[tuple[int, int]], seq_len: int, q_len: int, window: int,
                 device: torch.device) -> torch.Tensor:
    """[q_len, P] bool: query t = seq_len - q_len + i sees kept key position p iff t - window < p <= t."""
    positions = torch.cat([torch.arange(a, b, device=device) for a, b in ranges])
    t = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    return (positions[None, :] <= t) & (positions[None, :] > t - window)


def _count_mask(bias: torch.Tensor, group: int, visible: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """bias [P, Hkv] (ln count per kept key) -> SDPA's float mask [1, H, n, P]: each query head gets its KV
    head's bias, and -inf where `visible` [n, P] is False (None: every key is visible to the one query)."""
    mask = bias.T.repeat_interleave(group, dim=0)[None, :, None, :].to(dtype)  # [1, H, 1, P]
    if visible is None:
        return mask
    return mask.masked_fill(~visible[None, None], float("-inf"))


def _shared(keys: torch.Tensor, key_share: int) -> torch.Tensor:
    """[P, Hkv, r] key slots -> [P, Hkv, key_share * r]: each head gets its share group's slots, concatenated."""
    if key_share == 1:
        return keys
    num_tokens, num_kv_heads, r = keys.shape
    grouped = keys.reshape(num_tokens, num_kv_heads // key_share, key_share * r)
    return grouped.repeat_interleave(key_share, dim=1)


def equal_widths(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero-pad q/k (r < d) or v (r > d) to one head width: torch's fused CPU attention needs
    equal widths and otherwise falls back to a math path that materialises the full score matrix
    (measured 10-25x slower on a 4k prompt, and O(prompt^2) memory). Zero lanes change no score."""
    r, d = k.shape[-1], v.shape[-1]
    if r < d:
        return F.pad(q, (0, d - r)), F.pad(k, (0, d - r)), v
    if d < r:
        return q, k, F.pad(v, (0, r - d))
    return q, k, v


@attention_op
def paged_attention_torch(call: AttentionCall, out: torch.Tensor | None, num_splits: int | None) -> torch.Tensor:
    """`paged_attention` in torch, with its signature (`calls.attention_op`). Reads the metadata
    on the host (it loops over sequences), so the values are always validated; the maxima and
    num_splits are accepted for signature compatibility and not needed."""
    del num_splits
    shape = check_attention_call(call, out, triton_path=False)
    attention_metadata_limits(call, shape)
    if out is None:
        out = call.q.new_empty(shape.num_tokens, shape.num_heads, shape.d)
    cu = call.cu_seqlens_q.tolist()
    gap_list = call.gaps.tolist() if call.gaps is not None else [(0, 0)] * shape.num_seqs
    gqa = shape.group > 1
    for seq, seq_len in enumerate(call.seq_lens.tolist()):
        first, last = cu[seq], cu[seq + 1]
        q_len = last - first
        if q_len == 0:
            continue
        blocks = call.block_table[seq]
        context = seq_len - q_len
        window = call.sliding_window
        # With a window, queries go in chunks of max(W, WINDOW_QUERY_CHUNK), each with only the keys its
        # rows can see: O(q_len * W) work instead of O(q_len * seq_len) for long prompts.
        chunk = q_len if window is None else max(window, WINDOW_QUERY_CHUNK)
        for i0 in range(0, q_len, chunk):
            i1 = min(q_len, i0 + chunk)
            end = context + i1  # keys [start, end): up to the chunk's last query
            start = 0 if window is None else max(0, context + i0 - window + 1)  # the chunk's first window start
            ranges = _kept_ranges(start, end, gap_list[seq])
            # 4-D [1, heads, tokens, dim] views: with 3-D inputs torch's CPU SDPA takes its slow math path (~10x).
            keys = _shared(_kept(call.key_cache, blocks, ranges), shape.key_share)
            keys = keys.transpose(0, 1)[None]  # [1, Hkv, P, key_share * r]
            values = _kept(call.value_cache, blocks, ranges).transpose(0, 1)[None]  # [1, Hkv, P, d]
            queries = call.q[first + i0 : first + i1].transpose(0, 1)[None]  # [1, H, n, key_share * r]
            n = i1 - i0
            if n == 1:
                mask = None  # the last position sees every kept key (with a window: every key gathered)
            elif window is not None:
                mask = _window_mask(ranges, end, n, window, queries.device)
            else:
                mask = causal_lower_right(n, keys.shape[2])
            bias = None if call.log_counts is None else _kept(call.log_counts, blocks, ranges)
            if bias is not None and bias.any():  # all zero (no merged slot, e.g. any prefill): nothing to add
                if mask is not None and window is None:  # lower-right causal: query i sees keys j <= P - n + i
                    mask = torch.ones(n, keys.shape[2], dtype=torch.bool, device=keys.device).tril(keys.shape[2] - n)
                mask = _count_mask(bias, shape.group, mask, torch.float32)
                queries, keys, values = queries.float(), keys.float(), values.float()
            o = F.scaled_dot_product_attention(*equal_widths(queries, keys, values), attn_mask=mask,
                                               scale=call.scale, enable_gqa=gqa)
            out[first + i0 : first + i1] = o[0, ..., : shape.d].transpose(0, 1)
    return out


@write_kv_op
def write_kv_torch(write: KVWrite) -> None:
    """`write_kv` in torch: one indexed copy per cache for all tokens with slot >= 0."""
    check_write_kv(write, triton_path=False)
    tokens, blocks, offsets = write.destinations()
    write.key_cache[blocks, offsets] = write.key[tokens]
    write.value_cache[blocks, offsets] = write.value[tokens]
