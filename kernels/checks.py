"""Input validation shared by the Triton and torch paths of `paged_attention` and `write_kv`.

Two levels, because a serving hot path must not synchronise with the device:
- `check_attention_call` / `check_write_kv` look only at shapes, dtypes, devices,
  strides and the scale of a call's record (`calls.AttentionCall` / `calls.KVWrite`:
  host metadata, free) and run on every call; messages are only formatted on
  failure, so the checks cost microseconds;
- `attention_metadata_limits` reads the metadata *values* (one device sync) to
  find `max_seqlen_q` / `max_seqlen_k` and to check lengths, block tables and gaps.
  `paged_attention` runs it only when the caller did not pass both maxima.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_thinkv.errors import ThinKVError

from .calls import AttentionCall, KVWrite

# What the kernels support: the one definition the backend, the config
# validation and the capacity model import.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The kernels read K and V in the model dtype: no quantised or converted KV cache.
SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")
MAX_HEAD_DIM = 256
QK_MULTIPLE = 8  # query/key head dims: multiples of 8 (tl.dot pads r < 16 to 16)
V_MULTIPLE = 16  # value head dims: multiples of 16
BLOCK_SIZE_MULTIPLE = 16  # KV-cache block sizes: whole 16-token tiles
MIN_COMPUTE_CAPABILITY = (8, 0)  # CUDA: bf16 tensor-core dots
MAX_SLIDING_WINDOW = 2**31 - 1  # the kernels take the window as an int32 argument


@dataclass(frozen=True)
class AttentionShape:
    """Static sizes of one `paged_attention` call."""

    num_tokens: int
    num_heads: int
    num_kv_heads: int
    r: int  # key cache slot width (the query/key head dim when key_share == 1)
    d: int  # value head dim
    block_size: int
    num_seqs: int
    key_share: int = 1  # KV heads whose key slots form one shared key

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def qk(self) -> int:
        """Query/key width per head: key_share * r (the dot-product length; what the tiles are sized by)."""
        return self.key_share * self.r


def _check_rank(t: torch.Tensor, name: str, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ThinKVError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ThinKVError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


def _check_int32(t: torch.Tensor, name: str, rank: int, layout: str) -> None:
    _check_rank(t, name, rank, layout)
    if t.dtype != torch.int32:
        raise ThinKVError(f"{name} must be int32, got {t.dtype}")


def check_qk_head_dim(r: int) -> None:
    if r % QK_MULTIPLE or not QK_MULTIPLE <= r <= MAX_HEAD_DIM:
        raise ThinKVError(
            f"query/key head dim r={r} is unsupported: r must be a multiple of {QK_MULTIPLE} in [{QK_MULTIPLE}, {MAX_HEAD_DIM}]"
        )


def check_block_size(block_size: int) -> None:
    if block_size % BLOCK_SIZE_MULTIPLE or block_size <= 0:
        raise ThinKVError(f"block_size={block_size} is unsupported: it must be a multiple of {BLOCK_SIZE_MULTIPLE}")


def check_head_dims(r: int, d: int) -> None:
    """Thin keys: r any multiple of 8 in [8, 256]; values: d a multiple of 16 in [16, 256]."""
    check_qk_head_dim(r)
    if d % V_MULTIPLE or not V_MULTIPLE <= d <= MAX_HEAD_DIM:
        raise ThinKVError(
            f"value head dim d={d} is unsupported: d must be a multiple of {V_MULTIPLE} in [{V_MULTIPLE}, {MAX_HEAD_DIM}] "
            "(64, 128 and 256 are the tested sizes)"
        )


def check_key_share(key_share: int, num_kv_heads: int, r: int) -> None:
    """key_share: a positive int dividing num_kv_heads, whose shared width key_share * r the kernels support."""
    if isinstance(key_share, bool) or not isinstance(key_share, int) or key_share < 1:
        raise ThinKVError(f"key_share must be a positive int, got {key_share!r}")
    if num_kv_heads % key_share:
        raise ThinKVError(f"key_share={key_share} must divide num_kv_heads={num_kv_heads}")
    if key_share * r > MAX_HEAD_DIM:
        raise ThinKVError(
            f"shared query/key width key_share * r = {key_share} * {r} = {key_share * r} exceeds the kernels' limit "
            f"{MAX_HEAD_DIM}: use a smaller share group"
        )


def check_sliding_window(sliding_window: int | None) -> None:
    """None (full causal attention) or a window of 1 to 2^31 - 1 tokens: key p is visible to the
    query at t iff t - sliding_window < p <= t (vLLM's convention; a window of 1 sees only itself)."""
    if sliding_window is None:
        return
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) \
            or not 1 <= sliding_window <= MAX_SLIDING_WINDOW:
        raise ThinKVError(
            f"sliding window {sliding_window!r} is unsupported: it must be None (no window) or an int from 1 to "
            f"{MAX_SLIDING_WINDOW} (tokens a query sees, itself included)"
        )


def _check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int, int, int, int]:
    _check_rank(key_cache, "key_cache", 4, "[num_blocks, block_size, num_kv_heads, r]")
    _check_rank(value_cache, "value_cache", 4, "[num_blocks, block_size, num_kv_heads, d]")
    if key_cache.shape[:3] != value_cache.shape[:3]:
        raise ThinKVError(
            f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} must agree on "
            "[num_blocks, block_size, num_kv_heads]"
        )
    if key_cache.dtype != value_cache.dtype:
        raise ThinKVError(
            f"key_cache ({key_cache.dtype}) and value_cache ({value_cache.dtype}) must have the same dtype"
        )
    if key_cache.dtype not in SUPPORTED_DTYPES:
        raise ThinKVError(
            f"cache dtype {key_cache.dtype} is unsupported: use float16, bfloat16 or float32 (no fp8 KV cache yet)"
        )
    num_blocks, block_size, num_kv_heads, r = key_cache.shape
    d = value_cache.shape[3]
    check_block_size(block_size)
    if num_kv_heads <= 0:
        raise ThinKVError("num_kv_heads must be positive")
    check_head_dims(r, d)
    return num_blocks, block_size, num_kv_heads, r, d


def check_device(tensors: dict[str, torch.Tensor | None], triton_path: bool, interpreting: bool) -> None:
    """All tensors on one device; the Triton path also needs CUDA unless the interpreter runs."""
    devices = [(name, t.device) for name, t in tensors.items() if t is not None]
    first = devices[0][1]
    if any(dev != first for _, dev in devices):
        others = {name: str(dev) for name, dev in devices if dev != first}
        raise ThinKVError(f"all tensors must be on one device ({first}); these differ: {others}")
    if triton_path and first.type != "cuda" and not interpreting:
        raise ThinKVError(
            f"the Triton kernels need CUDA tensors, got {first}: use paged_attention_torch / write_kv_torch "
            "on CPU (or set TRITON_INTERPRET=1 before importing triton, for testing)"
        )


def check_attention_call(
    call: AttentionCall, out: torch.Tensor | None, *, triton_path: bool, interpreting: bool = False
) -> AttentionShape:
    """Everything about a `paged_attention(_torch)` call that needs no device sync."""
    shape = attention_shape(call, out)
    check_device(
        {"q": call.q, "key_cache": call.key_cache, "value_cache": call.value_cache, "block_table": call.block_table,
         "cu_seqlens_q": call.cu_seqlens_q, "seq_lens": call.seq_lens, "out": out, "gaps": call.gaps,
         "log_counts": call.log_counts},
        triton_path=triton_path,
        interpreting=interpreting,
    )
    scale = call.scale
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ThinKVError(f"scale must be a positive finite number, got {scale!r}")
    return shape


def attention_shape(call: AttentionCall, out: torch.Tensor | None = None) -> AttentionShape:
    """Shapes and dtypes of a `paged_attention` call; returns its static sizes."""
    q, key_cache, block_table, cu_seqlens_q, seq_lens, gaps = (
        call.q, call.key_cache, call.block_table, call.cu_seqlens_q, call.seq_lens, call.gaps)
    key_share = call.key_share
    _check_rank(q, "q", 3, "[num_tokens, num_heads, r]" if key_share == 1 else "[num_tokens, num_heads, key_share * r]")
    _, block_size, num_kv_heads, r, d = _check_caches(key_cache, call.value_cache)
    check_key_share(key_share, num_kv_heads, r)
    check_sliding_window(call.sliding_window)
    num_tokens, num_heads, q_r = q.shape
    if q.dtype != key_cache.dtype:
        raise ThinKVError(f"q ({q.dtype}) and the caches ({key_cache.dtype}) must have the same dtype")
    if key_share == 1 and q_r != r:
        raise ThinKVError(f"q head dim {q_r} != key_cache head dim r={r}")
    if q_r != key_share * r:
        raise ThinKVError(
            f"q head dim {q_r} != key_share * r = {key_share} * {r} = {key_share * r} (the shared key width)"
        )
    if num_heads <= 0 or num_heads % num_kv_heads:
        raise ThinKVError(f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}")
    _check_int32(seq_lens, "seq_lens", 1, "[num_seqs]")
    num_seqs = seq_lens.shape[0]
    _check_int32(cu_seqlens_q, "cu_seqlens_q", 1, "[num_seqs + 1]")
    if cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ThinKVError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries, expected num_seqs + 1 = {num_seqs + 1}")
    if not (seq_lens.is_contiguous() and cu_seqlens_q.is_contiguous()):
        raise ThinKVError("seq_lens and cu_seqlens_q must be contiguous")
    _check_int32(block_table, "block_table", 2, "[num_seqs, max_blocks_per_seq]")
    if block_table.shape[0] < num_seqs:
        raise ThinKVError(f"block_table has {block_table.shape[0]} rows, fewer than num_seqs={num_seqs}")
    if gaps is not None:
        _check_int32(gaps, "gaps", 2, "[num_seqs, 2]")
        if tuple(gaps.shape) != (num_seqs, 2):
            raise ThinKVError(f"gaps must have shape [num_seqs, 2] = {(num_seqs, 2)}, got {tuple(gaps.shape)}")
    if call.log_counts is not None:
        counts = call.log_counts
        _check_rank(counts, "log_counts", 3, "[num_blocks, block_size, num_kv_heads]")
        if tuple(counts.shape) != (key_cache.shape[0], block_size, num_kv_heads):
            raise ThinKVError(f"log_counts must have shape [num_blocks, block_size, num_kv_heads] = "
                              f"{(key_cache.shape[0], block_size, num_kv_heads)}, got {tuple(counts.shape)}")
        if counts.dtype != torch.float32:
            raise ThinKVError(f"log_counts must be float32 (ln of each slot's count), got {counts.dtype}")
    if out is not None:
        _check_rank(out, "out", 3, "[num_tokens, num_heads, d]")
        if tuple(out.shape) != (num_tokens, num_heads, d):
            raise ThinKVError(f"out must have shape {(num_tokens, num_heads, d)}, got {tuple(out.shape)}")
        if out.dtype != q.dtype:
            raise ThinKVError(f"out dtype {out.dtype} must equal q dtype {q.dtype}")
    return AttentionShape(num_tokens, num_heads, num_kv_heads, r, d, block_size, num_seqs, key_share)


def attention_metadata_limits(call: AttentionCall, shape: AttentionShape) -> tuple[int, int]:
    """Check the metadata values (one device sync) and return (max_seqlen_q, max_seqlen_k)."""
    cu = call.cu_seqlens_q.tolist()
    lens = call.seq_lens.tolist()
    q_lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if cu[0] != 0:
        raise ThinKVError(f"cu_seqlens_q must start at 0, got {cu[0]}")
    if min(q_lens, default=0) < 0:
        raise ThinKVError("cu_seqlens_q must be non-decreasing")
    if cu[-1] > shape.num_tokens:
        raise ThinKVError(f"cu_seqlens_q ends at {cu[-1]} but q has only num_tokens={shape.num_tokens}")
    bad = [i for i, (ql, sl) in enumerate(zip(q_lens, lens)) if sl < ql]
    if bad:
        raise ThinKVError(
            f"seq_lens must include this step's query tokens (seq_len >= q_len); violated by sequences {bad[:8]}"
        )
    longest = max(lens, default=0)
    if longest > call.block_table.shape[1] * shape.block_size:
        raise ThinKVError(
            f"a sequence of {longest} tokens does not fit a block table of {call.block_table.shape[1]} blocks "
            f"x {shape.block_size}"
        )
    if call.gaps is not None:
        for i, ((lo, hi), ql, sl) in enumerate(zip(call.gaps.tolist(), q_lens, lens)):
            if not 0 <= lo <= hi <= sl - ql:
                raise ThinKVError(
                    f"gap [{lo}, {hi}) of sequence {i} must lie in its cached context [0, {sl - ql}) "
                    "(0 <= start <= end <= seq_len - q_len)"
                )
    return max(q_lens, default=0), longest


def check_write_kv(write: KVWrite, *, triton_path: bool, interpreting: bool = False) -> None:
    """Shapes, dtypes and devices of a `write_kv` call (no device sync).

    key/value may have more rows than slot_mapping (vLLM pads them for CUDA graphs);
    only the first len(slot_mapping) tokens are written.
    """
    key, value, key_cache, value_cache, slot_mapping = (
        write.key, write.value, write.key_cache, write.value_cache, write.slot_mapping)
    _check_rank(key, "key", 3, "[num_tokens, num_kv_heads, r]")
    _check_rank(value, "value", 3, "[num_tokens, num_kv_heads, d]")
    _, _, num_kv_heads, r, d = _check_caches(key_cache, value_cache)
    if key.shape[1:] != (num_kv_heads, r):
        raise ThinKVError(
            f"key must have shape {(key.shape[0], num_kv_heads, r)} to match key_cache, got {tuple(key.shape)}"
        )
    if value.shape[1:] != (num_kv_heads, d):
        raise ThinKVError(
            f"value must have shape {(value.shape[0], num_kv_heads, d)} to match value_cache, got {tuple(value.shape)}"
        )
    if not key.dtype == value.dtype == key_cache.dtype:
        raise ThinKVError(
            f"key ({key.dtype}), value ({value.dtype}) and the caches ({key_cache.dtype}) must share one dtype"
        )
    _check_rank(slot_mapping, "slot_mapping", 1, "[num_tokens]")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ThinKVError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if slot_mapping.shape[0] > min(key.shape[0], value.shape[0]):
        raise ThinKVError(
            f"slot_mapping has {slot_mapping.shape[0]} entries but key/value hold only "
            f"{min(key.shape[0], value.shape[0])} tokens"
        )
    check_device(
        {"key": key, "value": value, "key_cache": key_cache, "value_cache": value_cache, "slot_mapping": slot_mapping},
        triton_path=triton_path,
        interpreting=interpreting,
    )
