"""The paged-attention kernel for thin keys: Q·Kᵀ over r dims, P·V over d dims.

One program computes BLOCK_M query rows of one sequence against one KV head, over
one split of the sequence's KV tiles. A row is a (query token, query head) pair:
the GROUP query heads that share a KV head are packed into the M dimension
(row m = token m // GROUP, head m % GROUP), so every K/V tile is read once for the
whole group. Two launch shapes use it (see `attention.py`):

- decode (DECODE=True): grid (num_seqs, num_kv_heads, NUM_SPLITS); takes the
  sequences with 1 <= q_len <= BLOCK_Q; with NUM_SPLITS > 1 each program covers a
  slice of the KV tiles and writes a normalised partial output plus its
  log2-sum-exp, merged by `merge_kernel.py` (split-KV / flash-decoding).
- prefill/extend (DECODE=False): grid (num_tokens // BLOCK_Q + num_seqs,
  num_kv_heads, 1); one program per BLOCK_Q-token query block of the sequences with
  q_len > DECODE_MAX_Q; KV tiles past the block's last query are never visited
  (causal tile skipping).

Sliding window (HAS_WINDOW): key position p is visible to a query at t iff
t - sliding_window < p <= t (vLLM's convention). A program starts at the tile that
holds the window start of its first query row, so the tiles wholly left of every
row's window are never visited (work per query token O(window), not O(context)),
and positions left of the first row's window are never loaded (vLLM frees the blocks
that slid out of the window; their block-table entries point at the null block).
Split-KV divides only the tiles in the window. HAS_WINDOW=False removes all window code.

Masking is by position: key position p is visible to a row whose query sits at
absolute position t iff p <= t (and t - sliding_window < p with a window) and p is
outside the sequence's gap [lo, hi).
Positions that no row of the tile can see are never loaded (masked loads read
nothing, so unwritten cache slots and garbage block-table entries are never
dereferenced), masked V rows load as 0 (0 * NaN would poison P·V), and KV tiles
entirely inside the gap are skipped outright. HAS_GAP=False removes all gap code.

Shared keys (KEY_SHARE = S > 1): one key latent per token is shared by a group of
S KV heads and stored split across their S cache slots (R dims each). The programs of
KV head g dot their queries (QK = S·R dims) with the concatenation of the slots of
heads (g // S)·S ... (g // S)·S + S - 1, in that order: key column c of the
[QK_PAD, TILE_N] key tile comes from head (g // S)·S + c // R, channel c % R. Values
stay per KV head, so the grid is still per KV head (the S programs of a share group
load the same key bytes, mostly from L2). KEY_SHARE == 1 is resolved
at trace time to exactly the per-head code, with no per-column index arithmetic.

Counts (HAS_COUNTS): a slot may stand for several merged tokens (SnapKV's `merge` policy); the
softmax weighs it by its count, count·exp(s), i.e. ln(count) (stored per slot and KV head in
`counts_ptr`, float32) is added to the logit of every row. Loaded with the same mask as the keys;
HAS_COUNTS=False removes the load and the add.

Softmax uses exp2 with log2(e) folded into `qk_scale`. UPCAST (set when running in
the Triton interpreter, whose bf16 arithmetic is wrong) casts loads to fp32; on a
GPU the dots take the native 16-bit inputs for tensor cores.
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b):
    """a @ b accumulated in fp32; exact fp32 products (no TF32) when the inputs are fp32."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def find_sequence(cu_seqlens_q_ptr, target, num_seqs, BLOCK_Q: tl.constexpr, Q_BLOCKS: tl.constexpr):
    """Binary search for the sequence that owns `target`.

    Q_BLOCKS=False: `target` is a token index (sequence i owns [cu[i], cu[i+1])).
    Q_BLOCKS=True: `target` is a query-block id of the prefill grid, where sequence i
    owns the ids from cu[i] // BLOCK_Q + i (each sequence gets one spare block id, so
    the grid size num_tokens // BLOCK_Q + num_seqs never depends on device values).
    """
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(cu_seqlens_q_ptr + mid)
        if Q_BLOCKS:
            first = first // BLOCK_Q + mid
        if first <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, D] (final output)
    part_out_ptr,  # [num_tokens, num_heads, NUM_SPLITS, D_PAD] fp32 (split partials)
    part_lse_ptr,  # [num_tokens, num_heads, NUM_SPLITS] fp32 (log2-sum-exp per split)
    q_ptr,  # [num_tokens, num_heads, KEY_SHARE * R]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, R], any strides
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, D], any strides
    block_table_ptr,  # [>= num_seqs, max_blocks] int32
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    gaps_ptr,  # [num_seqs, 2] int32 (unused unless HAS_GAP)
    counts_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads] float32 ln(count), any strides (unused unless HAS_COUNTS)
    qk_scale,  # softmax scale * log2(e)
    num_seqs,
    num_heads,
    sliding_window,  # tokens a query sees, itself included (unused unless HAS_WINDOW)
    stride_q_t, stride_q_h, stride_q_c,
    stride_o_t, stride_o_h, stride_o_c,
    stride_k_b, stride_k_s, stride_k_h, stride_k_c,
    stride_v_b, stride_v_s, stride_v_h, stride_v_c,
    stride_bt_s, stride_bt_b,
    stride_gap_s, stride_gap_e,
    stride_c_b, stride_c_s, stride_c_h,
    GROUP: tl.constexpr,  # query heads per KV head
    R: tl.constexpr,  # key cache slot width
    KEY_SHARE: tl.constexpr,  # KV heads whose R-wide key slots form one key of KEY_SHARE * R dims
    QK_PAD: tl.constexpr,  # max(16, next_pow2(KEY_SHARE * R)): tl.dot needs K >= 16 and power-of-two aranges
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # KV cache block size
    BLOCK_M: tl.constexpr,  # query rows per program (power of two >= GROUP)
    BLOCK_Q: tl.constexpr,  # query tokens per program = BLOCK_M // GROUP
    TILE_N: tl.constexpr,  # KV positions per loop iteration
    DECODE: tl.constexpr,
    DECODE_MAX_Q: tl.constexpr,  # sequences with q_len <= this belong to the decode launch
    NUM_SPLITS: tl.constexpr,
    HAS_GAP: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_COUNTS: tl.constexpr,
    KV_ALIGNED: tl.constexpr,  # cache block/slot/head strides are multiples of 8 elements
    UPCAST: tl.constexpr,
):
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        seq = tl.program_id(0)
        q_block = 0
    else:
        seq = find_sequence(cu_seqlens_q_ptr, tl.program_id(0), num_seqs, BLOCK_Q, True)
        q_block = tl.program_id(0) - (tl.load(cu_seqlens_q_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    if DECODE:
        if (q_len == 0) | (q_len > DECODE_MAX_Q):
            return
    else:
        if (q_len <= DECODE_MAX_Q) | (q_block * BLOCK_Q >= q_len):
            return

    # ---- query rows: (token, head) pairs of this block ------------------------------
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, QK_PAD)  # query/key channels
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, TILE_N)
    r_ok = offs_r < KEY_SHARE * R
    d_ok = offs_d < D
    if KV_ALIGNED:
        # The host checked these strides are multiples of 8 elements; saying so lets the compiler use
        # 16-byte vector loads (and async-copy pipelining) when r + d is not a multiple of 16 (r = 24, 40...).
        stride_k_b = stride_k_b // 8 * 8
        stride_k_s = stride_k_s // 8 * 8
        stride_k_h = stride_k_h // 8 * 8
        stride_v_b = stride_v_b // 8 * 8
        stride_v_s = stride_v_s // 8 * 8
        stride_v_h = stride_v_h // 8 * 8
    tok_in_seq = q_block * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (tok_in_seq < q_len)
    context_len = seq_len - q_len
    q_pos = context_len + tok_in_seq  # absolute position of each row's query token
    token = (q_start + tok_in_seq).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_r[None, :] * stride_q_c,
        mask=row_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    # ---- KV tiles to visit: [kv_start, kv_end) minus whole tiles inside the gap, split evenly ----
    kv_end = tl.minimum(seq_len, context_len + (q_block + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, TILE_N)
    if HAS_WINDOW:
        # The window start of the block's first query: no row of this program sees a key left of it.
        kv_start = tl.maximum(context_len + q_block * BLOCK_Q - sliding_window + 1, 0)
        first_tile = tl.minimum(kv_start // TILE_N, num_tiles)
    else:
        first_tile = 0
    if HAS_GAP:
        gap_lo = tl.load(gaps_ptr + seq * stride_gap_s)
        gap_hi = tl.load(gaps_ptr + seq * stride_gap_s + stride_gap_e)
        # first tile fully inside the gap (and at or after the first tile visited)
        skip_lo = tl.minimum(tl.maximum(tl.cdiv(gap_lo, TILE_N), first_tile), num_tiles)
        skip_hi = tl.maximum(tl.minimum(gap_hi // TILE_N, num_tiles), skip_lo)
        num_skip = skip_hi - skip_lo
    else:
        num_skip = 0
    live_tiles = num_tiles - first_tile - num_skip
    tiles_per_split = tl.cdiv(live_tiles, NUM_SPLITS)
    it_lo = split * tiles_per_split
    it_hi = tl.minimum(it_lo + tiles_per_split, live_tiles)

    if KEY_SHARE == 1:
        k_head = kv_head
    else:
        # The share group's first KV head; key channel c is channel c % R of its slot c // R.
        k_head = kv_head // KEY_SHARE * KEY_SHARE
        k_chan = (offs_r // R) * stride_k_h + (offs_r % R) * stride_k_c

    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt_s
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for it in range(it_lo, it_hi):
        tile = first_tile + it
        if HAS_GAP:
            tile = tl.where(tile >= skip_lo, tile + num_skip, tile)  # jump over the tiles inside the gap
        pos = tile * TILE_N + offs_n
        col_ok = pos < kv_end
        if HAS_WINDOW:
            col_ok = col_ok & (pos >= kv_start)
        if HAS_GAP:
            col_ok = col_ok & ((pos < gap_lo) | (pos >= gap_hi))
        block = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_bt_b, mask=col_ok, other=0).to(tl.int64)
        in_block = pos % BLOCK_SIZE
        k_slot = block * stride_k_b + in_block * stride_k_s + k_head * stride_k_h
        v_slot = block * stride_v_b + in_block * stride_v_s + kv_head * stride_v_h
        if KEY_SHARE == 1:
            k = tl.load(  # [QK_PAD, TILE_N]
                k_cache_ptr + k_slot[None, :] + offs_r[:, None] * stride_k_c,
                mask=r_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
        else:
            k = tl.load(  # [QK_PAD, TILE_N]: the share group's KEY_SHARE slots, concatenated
                k_cache_ptr + k_slot[None, :] + k_chan[:, None],
                mask=r_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
        v = tl.load(  # [TILE_N, D_PAD]
            v_cache_ptr + v_slot[:, None] + offs_d[None, :] * stride_v_c,
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = _dot(q, k) * qk_scale
        if HAS_COUNTS:
            log_count = tl.load(counts_ptr + block * stride_c_b + in_block * stride_c_s + kv_head * stride_c_h,
                                mask=col_ok, other=0.0)
            s = s + log_count[None, :] * 1.4426950408889634  # ln -> log2 units
        visible = col_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
        m_i = m_new

    # ---- epilogue: rows with no visible key produce 0 ----------------------------------
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    store_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + token[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :] * stride_o_c,
            o.to(out_ptr.dtype.element_ty),
            mask=store_mask,
        )
    else:
        part_row = (token * num_heads + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part_row[:, None] * D_PAD + offs_d[None, :], o, mask=store_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part_row, lse, mask=row_ok)
