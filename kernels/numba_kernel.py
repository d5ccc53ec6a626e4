"""The numba CPU kernel behind `cpu_numba.paged_attention_numba` (imports numba: load it lazily).

One job = (sequence, share group of KV heads, chunk of up to Q_TOKENS query tokens, KV split).
A job walks its key range one cache block at a time: it decodes each kept token's key slots
and values from the cache into a small float32 tile (the only read of those bytes in the
job), scores the tile against all of its query rows (the group's query heads x its query
tokens, so GQA reads K/V once per KV head) and folds it into an online softmax. Nothing is
gathered or copied per sequence; unused slots, gap slots and block-table entries past a
sequence's end are never read.

The caches arrive as 1-D views of their raw storage: int32 bits for fp32, int16 bits for
bf16 / fp16 (numba has no bf16 type and no fp16 arithmetic), decoded to float32 bits
in registers-sized tiles (`decode`). All arithmetic is float32 with float32 accumulation.

Key range of a job: keys [win_lo, kv_end) with kv_end = the position of the chunk's last
query + 1 and win_lo = 0, or under a sliding window W the first query's position - W + 1,
cut into block-aligned splits, minus the gap [gap_lo, gap_hi); per query row, keys past
its own position (`n_visible`) and, under a window, keys at or before its position - W
(`first_visible`) are masked. Blocks wholly left of the window are never read.

Counts (has_counts): each kept slot's ln(count) per KV head (float32, `c_src`) is added to its
score, read once per token and head like its key (SnapKV's `merge` policy).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, prange

FP32, BF16, FP16 = 0, 1, 2  # how `decode` reads the cache's raw bits
LOG2E = 1.4426950408889634  # scores are kept in log2 units: softmax weights are powers of two (`exp2_tile`)
LN2 = 0.6931471805599453
# No 'nnan'/'ninf': the online softmax starts from -inf.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@njit(cache=True)
def half_to_float_bits(h):
    """IEEE fp16 bits (low 16 bits of h) -> fp32 bits, exactly (subnormals, inf and NaN included)."""
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    man = h & 0x3FF
    if exp == 0x1F:
        return sign | 0x7F800000 | (man << 13)
    if exp == 0:
        if man == 0:
            return sign
        e = 113  # a subnormal man * 2^-24: shift the leading one up to bit 10, one exponent step per shift
        while (man & 0x400) == 0:
            man <<= 1
            e -= 1
        return sign | (e << 23) | ((man & 0x3FF) << 13)
    return sign | ((exp + 112) << 23) | (man << 13)


@njit(cache=True)
def decode(src, start, n, mode, dst, at):
    """dst[at : at + n] (fp32 bits) <- the n cache values at src[start : start + n] (their raw bits).
    Loops run over slices with range() indices: numba then knows they are non-negative and emits no
    wraparound checks, so LLVM vectorises them (the same holds for the loops in `attend`)."""
    values = src[start : start + n]
    bits = dst[at : at + n]
    if mode == FP32:
        for i in range(n):
            bits[i] = np.uint32(values[i])
    elif mode == BF16:
        for i in range(n):
            bits[i] = np.uint32(np.uint16(values[i])) << 16
    else:
        for i in range(n):
            bits[i] = half_to_float_bits(np.uint32(np.uint16(values[i])))


@njit(parallel=True, cache=True)
def start_threads(n):
    """A parallel loop over n iterations: makes the threading layer create its threads (`cpu_numba._start_pool`)."""
    total = 0
    for i in prange(n):
        total += i
    return total


@njit(cache=True, fastmath=FASTMATH)
def exp2_tile(x, m, n, out, bits):
    """out[:n] = 2 ** (x[:n] - m) for x <= m, in two loops that LLVM vectorises (numba's exp is a scalar
    libm call per element, which dominated the kernel): 2^y = 2^k * 2^f with k = round(y) written as float
    bits and 2^f = e^(f ln 2), f in [-1/2, 1/2], by its degree-7 Taylor polynomial (relative error < 1e-8,
    below float32 rounding). Underflow: y is clamped at -126 (2^-126: a weight no sum can see)."""
    for t in range(n):
        y = max(x[t] - m, np.float32(-126.0))
        k = np.floor(y + np.float32(0.5))
        z = (y - k) * np.float32(LN2)
        poly = np.float32(1.0 / 5040.0)
        poly = poly * z + np.float32(1.0 / 720.0)
        poly = poly * z + np.float32(1.0 / 120.0)
        poly = poly * z + np.float32(1.0 / 24.0)
        poly = poly * z + np.float32(1.0 / 6.0)
        poly = poly * z + np.float32(0.5)
        poly = poly * z + np.float32(1.0)
        out[t] = poly * z + np.float32(1.0)
        bits[t] = (np.int32(k) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    for t in range(n):
        out[t] *= scale[t]


@njit(cache=True)
def plan_jobs(cu_seqlens_q, q_tokens, num_splits):
    """(sequence, first query token, split) of every job but the head-group axis, sequence by sequence."""
    num_seqs = cu_seqlens_q.shape[0] - 1
    count = 0
    for seq in range(num_seqs):
        count += (cu_seqlens_q[seq + 1] - cu_seqlens_q[seq] + q_tokens - 1) // q_tokens * num_splits
    job_seq = np.empty(count, np.int32)
    job_q0 = np.empty(count, np.int32)
    job_split = np.empty(count, np.int32)
    j = 0
    for seq in range(num_seqs):
        q_len = cu_seqlens_q[seq + 1] - cu_seqlens_q[seq]
        for q0 in range(0, q_len, q_tokens):
            for split in range(num_splits):
                job_seq[j] = seq
                job_q0[j] = q0
                job_split[j] = split
                j += 1
    return job_seq, job_q0, job_split


@functools.cache
def attend_kernel(d: int):
    """`attend` for one value head size d: d is a compile-time constant of the closure (numba caches each d
    on disk apart), so LLVM unrolls and vectorises the loops over it whole. Measured on one thread (bf16,
    r = d = 64, one sequence of 4096 keys): 1.8x faster than with d a runtime argument; r a constant as
    well gained nothing measurable, and every (r, d) pair would be one more compilation."""

    @njit(parallel=True, cache=True, fastmath=FASTMATH)
    def attend(q, k_src, k_strides, v_src, v_strides, mode, block_table, num_blocks, block_size, cu_seqlens_q,
               seq_lens, gaps, job_seq, job_q0, job_split, num_splits, num_kv_heads, r, key_share, q_tokens, scale,
               window, out, part_acc, part_m, part_l, bad_block, has_counts, c_src, c_strides):
        """Attention of every job; num_splits == 1 writes normalised rows to `out` [T, H, d] float32, otherwise
        each split writes its unnormalised accumulator, running max (log2 units) and sum to part_* for `merge_splits`.

        q [T, H, key_share * r] float32; k_src / v_src: 1-D raw cache storage (int32 or int16 bits);
        k_strides / v_strides: (storage offset, block, token, head) strides in elements (unit stride along
        the head dim). A block id outside [0, num_blocks) sets bad_block[0] and ends that job (no read).
        window: the sliding window W (key p visible to the query at t iff t - W < p <= t), 0 for none.
        has_counts: add c_src's ln(count) (1-D float32 storage; (offset, block, token, head) strides c_strides)
        of each slot and KV head to its scores.
        """
        num_heads = q.shape[1]
        group = num_heads // num_kv_heads
        heads = key_share * group  # query heads of one share group: one job's heads
        num_groups = num_kv_heads // key_share
        qk = key_share * r
        for job in prange(job_seq.shape[0] * num_groups):
            j = job // num_groups
            share_group = job % num_groups
            seq = job_seq[j]
            q0 = job_q0[j]
            split = job_split[j]
            first = cu_seqlens_q[seq]
            q_len = cu_seqlens_q[seq + 1] - first
            n_q = min(q_tokens, q_len - q0)
            rows = n_q * heads
            pos0 = seq_lens[seq] - q_len + q0  # position of the chunk's first query token
            kv_end = pos0 + n_q
            win_lo = max(0, pos0 - window + 1) if window > 0 else 0  # the first query's window start
            first_block = win_lo // block_size
            blocks_per_split = ((kv_end + block_size - 1) // block_size - first_block + num_splits - 1) // num_splits
            lo = max(win_lo, (first_block + split * blocks_per_split) * block_size)
            hi = min(kv_end, (first_block + (split + 1) * blocks_per_split) * block_size)
            gap_lo = gaps[seq, 0]
            gap_hi = gaps[seq, 1]

            q_rows = np.empty((rows, qk), np.float32)
            for i in range(n_q):
                for hh in range(heads):
                    for c in range(qk):
                        q_rows[i * heads + hh, c] = q[first + q0 + i, share_group * heads + hh, c] * scale * LOG2E
            m = np.full(rows, -np.inf, np.float32)
            l = np.zeros(rows, np.float32)
            acc = np.zeros((rows, d), np.float32)
            k_bits = np.empty(block_size * qk, np.uint32)
            v_bits = np.empty(block_size * key_share * d, np.uint32)
            k_tile = k_bits.view(np.float32).reshape(block_size, qk)
            v_tile = v_bits.view(np.float32).reshape(block_size * key_share, d)
            scores = np.empty(block_size, np.float32)
            bias = np.zeros(block_size * key_share, np.float32)  # ln(count) of each slot and head, log2 units
            weights = np.empty(block_size, np.float32)
            pow2 = np.empty(block_size, np.int32)

            for part in range(2):  # the kept keys before the gap, then after it
                start = lo if part == 0 else max(lo, gap_hi)
                end = min(hi, gap_lo) if part == 0 else hi
                pos = start
                while pos < end:
                    block_index = pos // block_size
                    tile_end = min(end, (block_index + 1) * block_size)
                    block = block_table[seq, block_index]
                    if block < 0 or block >= num_blocks:
                        bad_block[0] = 1
                        break
                    offset = pos - block_index * block_size
                    for t in range(tile_end - pos):
                        k_at = k_strides[0] + block * k_strides[1] + (offset + t) * k_strides[2]
                        v_at = v_strides[0] + block * v_strides[1] + (offset + t) * v_strides[2]
                        for s in range(key_share):
                            head = share_group * key_share + s
                            decode(k_src, k_at + head * k_strides[3], r, mode, k_bits, t * qk + s * r)
                            decode(v_src, v_at + head * v_strides[3], d, mode, v_bits, (t * key_share + s) * d)
                            if has_counts:
                                c_at = c_strides[0] + block * c_strides[1] + (offset + t) * c_strides[2]
                                bias[t * key_share + s] = c_src[c_at + head * c_strides[3]] * np.float32(LOG2E)
                    for i in range(n_q):
                        n_visible = min(tile_end, pos0 + i + 1) - pos  # causal: keys up to the query's position
                        # window: keys after t - W
                        first_visible = max(0, pos0 + i - window + 1 - pos) if window > 0 else 0
                        if n_visible <= first_visible:
                            continue
                        n_seen = n_visible - first_visible
                        for hh in range(heads):
                            row = i * heads + hh
                            q_row = q_rows[row]
                            acc_row = acc[row]
                            v_head = hh // group
                            tile_max = np.float32(-np.inf)
                            for t in range(n_seen):
                                k_row = k_tile[first_visible + t]
                                dot = np.float32(0.0)
                                for c in range(qk):
                                    dot += q_row[c] * k_row[c]
                                if has_counts:
                                    dot += bias[(first_visible + t) * key_share + v_head]
                                scores[t] = dot
                                tile_max = max(tile_max, dot)
                            m_new = max(m[row], tile_max)
                            alpha = np.float32(math.exp((m[row] - m_new) * LN2))
                            if alpha != 1.0:
                                l[row] *= alpha
                                for c in range(d):
                                    acc_row[c] *= alpha
                            exp2_tile(scores, m_new, n_seen, weights, pow2)
                            for t in range(n_seen):
                                p = weights[t]
                                l[row] += p
                                v_row = v_tile[(first_visible + t) * key_share + v_head]
                                for c in range(d):
                                    acc_row[c] += p * v_row[c]
                            m[row] = m_new
                    pos = tile_end

            for i in range(n_q):
                token = first + q0 + i
                for hh in range(heads):
                    row = i * heads + hh
                    head = share_group * heads + hh
                    if num_splits == 1:
                        inv = np.float32(1.0) / l[row] if l[row] > 0 else np.float32(0.0)
                        for c in range(d):
                            out[token, head, c] = acc[row, c] * inv
                    else:
                        part_m[split, token, head] = m[row]
                        part_l[split, token, head] = l[row]
                        for c in range(d):
                            part_acc[split, token, head, c] = acc[row, c]

    return attend


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def merge_splits(part_acc, part_m, part_l, out):
    """out[t, h] = the softmax-weighted combination of the splits' partial results (log-sum-exp merge)."""
    num_splits, num_tokens, num_heads, d = part_acc.shape
    for x in prange(num_tokens * num_heads):
        token = x // num_heads
        head = x % num_heads
        m = np.float32(-np.inf)
        for s in range(num_splits):
            if part_l[s, token, head] > 0:
                m = max(m, part_m[s, token, head])
        for c in range(d):
            out[token, head, c] = 0.0
        total = np.float32(0.0)
        for s in range(num_splits):
            if part_l[s, token, head] > 0:
                w = np.float32(math.exp((part_m[s, token, head] - m) * LN2))  # maxima in log2 units
                total += part_l[s, token, head] * w
                for c in range(d):
                    out[token, head, c] += part_acc[s, token, head, c] * w
        inv = np.float32(1.0) / total if total > 0 else np.float32(0.0)
        for c in range(d):
            out[token, head, c] *= inv
