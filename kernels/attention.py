"""`paged_attention`: the public Triton op for prefill, chunked prefill, decode and mixed batches.

Launch plan (no device sync when the caller passes max_seqlen_q and max_seqlen_k):
- Sequences with 1 <= q_len <= DECODE_MAX_Q (= decode BLOCK_M // group: the query
  tokens that fit the rows a decode program computes anyway) belong to the decode
  launch, the others to the prefill launch. Each launch's programs skip the other
  kind's sequences, so a mixed batch is two launches over the same metadata with no
  host-side split of the batch.
- Decode-only batches (max_seqlen_q <= DECODE_MAX_Q) use split-KV when the batch is
  too small to fill the device (`launch.decode_splits`), plus a merge launch. In a
  mixed batch the prefill programs fill the device, so decode runs unsplit unless
  `num_splits` forces more.
- Tiles are sized by the query/key width qk = key_share * r (`launch.tile_config`);
  key_share is the kernel's KEY_SHARE constexpr, so each share-group size compiles once.
- Padding: q/out rows from cu_seqlens_q[-1] on, and requests with no query tokens (vLLM
  pads a batch to a captured CUDA-graph size that way), are neither read nor written.
- The plan depends only on shapes, on max_seqlen_q > DECODE_MAX_Q and on
  `launch.context_bucket(max_seqlen_k)` (CUDA graphs: see `launch`).
"""

from __future__ import annotations

import torch
import triton

from vllm_thinkv.errors import ThinKVError

from . import launch
from .attention_kernel import paged_attention_kernel
from .calls import AttentionCall, attention_op
from .checks import AttentionShape, attention_metadata_limits, check_attention_call
from .merge_kernel import merge_splits_kernel

LOG2E = 1.4426950408889634


@attention_op
def paged_attention(call: AttentionCall, out: torch.Tensor | None, num_splits: int | None) -> torch.Tensor:
    """Causal attention of this step's query tokens over a paged thin-key cache.

    Called as paged_attention(q, key_cache, value_cache, block_table, cu_seqlens_q, seq_lens, scale,
    out=None, *, gaps=None, key_share=1, sliding_window=None, max_seqlen_q=None, max_seqlen_k=None,
    num_splits=None, log_counts=None)
    (`calls.attention_op`).

    q [T, H, key_share * r]; key_cache [num_blocks, block_size, Hkv, r] and value_cache
    [num_blocks, block_size, Hkv, d] (any strides, e.g. views of one packed buffer);
    block_table [num_seqs, max_blocks] int32; cu_seqlens_q [num_seqs + 1] int32;
    seq_lens [num_seqs] int32, the context length including this step's tokens. The
    query tokens of sequence i are its last q_len_i positions. Rows of q from cu_seqlens_q[-1]
    on are padding: never read, and those rows of out are never written.
    gaps: optional [num_seqs, 2] int32 token ranges [start, end) to skip (start == end:
    none); they must lie in the cached context (end <= seq_len - q_len), and their
    cache slots are never read.
    sliding_window: None (causal) or W >= 1: key p is visible to the query at t iff t - W < p <= t
    (vLLM's convention); KV tiles wholly left of a program's window are never visited and
    positions left of it never read (vLLM frees those blocks).
    key_share: S KV heads share one key (S divides Hkv, S * r <= 256; 1: per-head keys).
    A compression method that learns one key latent per group of S KV heads stores it
    split across their S key cache slots (r dims each, ascending head order; write_kv is
    unchanged). Query head h, with KV head g = h // (H / Hkv) in share group s = g // S,
    dots its S * r query dims with key_cache[block, offset, s*S:(s+1)*S].flatten(), and
    reads its values from value head g as usual. The cache holds the same bytes as
    per-head r-dim keys, but each query head dots an S * r-dim key: S times the QK FLOPs
    (and q bytes) per query head, for a richer key at no extra cache memory.
    max_seqlen_q / max_seqlen_k: host-side upper bounds; when either is None they are
    computed and all metadata values are validated (one device sync).
    num_splits: force the decode split-KV factor (testing, tuning).
    log_counts: optional [num_blocks, block_size, Hkv] float32 (any strides): slot p of KV head g stands
    for count = exp(log_counts[slot, g]) merged tokens and gets softmax weight count·exp(s_p) / Σ count·exp(s)
    in every query head of g (SnapKV `merge`); ln(count) is read only where the key is read.
    Returns `out` (or a new tensor) [T, H, d] in q's dtype.
    """
    shape = check_attention_call(call, out, triton_path=True, interpreting=launch.interpreting())
    if num_splits is not None and not (isinstance(num_splits, int) and num_splits >= 1):
        raise ThinKVError(f"num_splits must be a positive int or None, got {num_splits!r}")
    max_seqlen_q, max_seqlen_k = call.max_seqlen_q, call.max_seqlen_k
    if max_seqlen_q is None or max_seqlen_k is None:
        max_seqlen_q, max_seqlen_k = attention_metadata_limits(call, shape)
    if out is None:
        out = call.q.new_empty(shape.num_tokens, shape.num_heads, shape.d)
    launches = plan_attention(call, shape, out, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                              num_splits=num_splits, facts=launch.device_facts(call.q.device))
    for kernel_launch in launches:
        kernel_launch()
    return out


def plan_attention(
    call: AttentionCall,
    shape: AttentionShape,
    out: torch.Tensor,
    *,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_splits: int | None,
    facts: launch.DeviceFacts,
) -> list[launch.KernelCall]:
    """The launches of one validated call, in order (allocates the split-KV workspace)."""
    if shape.num_tokens == 0 or shape.num_seqs == 0:
        return []
    q, key_cache, value_cache, block_table, gaps = call.q, call.key_cache, call.value_cache, call.block_table, call.gaps
    decode_cfg = launch.tile_config("decode", shape.qk, shape.d, shape.group, q.dtype, facts)
    decode_max_q = decode_cfg.block_m // shape.group
    has_prefill = max_seqlen_q > decode_max_q
    if num_splits is None:
        # A decode program reads at most sliding_window + DECODE_MAX_Q - 1 keys: split by that, not the context.
        longest = max_seqlen_k if call.sliding_window is None else min(max_seqlen_k,
                                                                       call.sliding_window + decode_max_q - 1)
        num_splits = 1 if has_prefill else launch.decode_splits(shape.num_seqs, shape.num_kv_heads, longest, facts)
    qk_pad, d_pad = launch.head_pads(shape.qk, shape.d)
    if num_splits > 1:
        partial = (shape.num_tokens, shape.num_heads, num_splits)
        part_out = torch.empty(*partial, d_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(*partial, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # a single-split launch never touches them

    has_gap = gaps is not None
    counts = call.log_counts
    args = (
        out, part_out, part_lse, q, key_cache, value_cache, block_table, call.cu_seqlens_q, call.seq_lens,
        gaps if has_gap else call.seq_lens,  # any int32 pointer when unused
        counts if counts is not None else out,  # any pointer when unused
        call.scale * LOG2E, shape.num_seqs, shape.num_heads, call.sliding_window or 0,
        *q.stride(), *out.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
        *(gaps.stride() if has_gap else (0, 0)),
        *(counts.stride() if counts is not None else (0, 0, 0)),
    )
    kv_aligned = all(s % 8 == 0 for s in key_cache.stride()[:3] + value_cache.stride()[:3])
    common = dict(
        GROUP=shape.group, R=shape.r, KEY_SHARE=shape.key_share, QK_PAD=qk_pad, D=shape.d, D_PAD=d_pad,
        BLOCK_SIZE=shape.block_size, DECODE_MAX_Q=decode_max_q, HAS_GAP=has_gap,
        HAS_WINDOW=call.sliding_window is not None, HAS_COUNTS=counts is not None, KV_ALIGNED=kv_aligned,
        UPCAST=launch.interpreting(),
    )

    def attention_launch(cfg: launch.TileConfig, decode: bool, splits: int, grid: tuple[int, ...]) -> launch.KernelCall:
        constexprs = dict(common, BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_m // shape.group, TILE_N=cfg.tile_n,
                          DECODE=decode, NUM_SPLITS=splits)
        options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return launch.KernelCall(paged_attention_kernel, grid, args, constexprs, options)

    launches = [attention_launch(decode_cfg, True, num_splits, (shape.num_seqs, shape.num_kv_heads, num_splits))]
    if num_splits > 1:
        launches.append(launch.KernelCall(
            merge_splits_kernel,
            (shape.num_tokens, shape.num_heads),
            (out, part_out, part_lse, call.cu_seqlens_q, shape.num_seqs, shape.num_heads, *out.stride()),
            dict(D=shape.d, D_PAD=d_pad, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
                 DECODE_MAX_Q=decode_max_q),
            dict(num_warps=4),
        ))
    if has_prefill:
        cfg = launch.tile_config("prefill", shape.qk, shape.d, shape.group, q.dtype, facts)
        q_blocks = shape.num_tokens // (cfg.block_m // shape.group) + shape.num_seqs  # >= the blocks needed
        launches.append(attention_launch(cfg, False, 1, (q_blocks, shape.num_kv_heads, 1)))
    return launches
