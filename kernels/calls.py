"""One record per op call, and each op's public signature, written once.

`paged_attention` (Triton), `paged_attention_torch` and `reference.paged_attention` are
one op with three implementations, and so are the three `write_kv`s: callers (vLLM's hot
path, the tests, the benchmark) swap them freely. `attention_op` / `write_kv_op` give an
implementation of the record the op's explicit keyword signature, so the argument list
exists once; the implementations validate the record (`checks`) and read it. Binding the
record costs one or two microseconds and reads no tensor values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True, eq=False)
class AttentionCall:
    """The inputs of one paged-attention call (layouts: `attention.paged_attention`)."""

    q: torch.Tensor  # [T, H, key_share * r]
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, r], any strides
    value_cache: torch.Tensor  # [num_blocks, block_size, Hkv, d], any strides
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, including this step's query tokens
    scale: float
    gaps: torch.Tensor | None = None  # [num_seqs, 2] int32 ranges [start, end) never read
    key_share: int = 1  # KV heads per shared key latent: a query's key is its share group's S slots, concatenated
    sliding_window: int | None = None  # key p is visible to query t iff t - sliding_window < p <= t; None: p <= t
    max_seqlen_q: int | None = None  # host-side upper bounds; None: read from the metadata
    max_seqlen_k: int | None = None
    # [num_blocks, block_size, Hkv] float32, any strides: ln(count) of each cache slot, added to the logit of
    # every query head of that KV head (a slot standing for `count` merged tokens); None: every count is 1
    log_counts: torch.Tensor | None = None


@dataclass(frozen=True, slots=True, eq=False)
class KVWrite:
    """The inputs of one `write_kv` call: key[t] / value[t] go to cache slot slot_mapping[t]."""

    key: torch.Tensor  # [T, Hkv, r]
    value: torch.Tensor  # [T, Hkv, d]
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, r], any strides
    value_cache: torch.Tensor  # [num_blocks, block_size, Hkv, d], any strides
    slot_mapping: torch.Tensor  # [T'] int32/int64, T' <= T; -1: do not store

    def destinations(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, blocks, offsets) of the tokens to store: slot s is offset s % block_size of block
        s // block_size; tokens with slot -1 are left out. Reads the slots (a device sync)."""
        slots = self.slot_mapping.long()
        tokens = torch.nonzero(slots >= 0).flatten()
        slots = slots[tokens]
        block_size = self.key_cache.shape[1]
        return tokens, slots // block_size, slots % block_size


AttentionImpl = Callable[[AttentionCall, torch.Tensor | None, int | None], torch.Tensor]
WriteKVImpl = Callable[[KVWrite], None]


def _named_like(op: Callable, impl: Callable) -> Callable:
    """`op` under `impl`'s name and docstring, keeping op's own signature (no __wrapped__)."""
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(op, attr, getattr(impl, attr))
    return op


def attention_op(impl: AttentionImpl) -> Callable[..., torch.Tensor]:
    """`impl(call, out, num_splits)` as a `paged_attention` op; `op.impl` is `impl`, for ops that hand
    parts of a call to another implementation."""

    def op(
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_table: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        out: torch.Tensor | None = None,
        *,
        gaps: torch.Tensor | None = None,
        key_share: int = 1,
        sliding_window: int | None = None,
        max_seqlen_q: int | None = None,
        max_seqlen_k: int | None = None,
        num_splits: int | None = None,
        log_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        call = AttentionCall(q, key_cache, value_cache, block_table, cu_seqlens_q, seq_lens, scale, gaps,
                             key_share, sliding_window, max_seqlen_q, max_seqlen_k, log_counts)
        return impl(call, out, num_splits)

    op.impl = impl
    return _named_like(op, impl)


def write_kv_op(impl: WriteKVImpl) -> Callable[..., None]:
    """`impl(write)` as a `write_kv` op."""

    def op(
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        impl(KVWrite(key, value, key_cache, value_cache, slot_mapping))

    return _named_like(op, impl)
