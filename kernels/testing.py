"""Random paged batches shaped like vLLM's, for the tests and the benchmark.

Everything a kernel must not touch is made poisonous: unused cache slots hold NaN,
block 0 is a NaN "null block" (where vLLM points freed blocks, e.g. blocks SnapKV
dropped inside a gap), physical blocks are shuffled, and block-table entries past a
sequence's last block hold random block ids. With a sliding window, the positions
left of each sequence's first query's window are treated like a gap: never written,
and their whole blocks are the null block (vLLM frees blocks that slid out of the window).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .calls import AttentionCall

LAYOUTS = ("NHD", "HND")  # packed buffer [blocks, block_size, Hkv, r+d] or [blocks, Hkv, block_size, r+d]


@dataclass(frozen=True, eq=False)
class PagedBatch(AttentionCall):
    """A paged-attention call (positional order of `args()`) and the packed buffer behind its caches."""

    packed: torch.Tensor = field(kw_only=True)

    def args(self) -> tuple:
        return (self.q, self.key_cache, self.value_cache, self.block_table, self.cu_seqlens_q, self.seq_lens,
                self.scale)


def random_log_counts(batch: PagedBatch, seed: int = 0, high: float = 3.0) -> torch.Tensor:
    """[num_blocks, block_size, Hkv] float32 ln(count) in [0, high) for every written slot of the batch's cache,
    NaN in every slot the batch left unwritten (so a count read where no key may be read poisons the output).
    Returned as a strided view (every other float of a bigger buffer), as counts packed into a cache are."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks, block_size, num_kv_heads, _ = batch.key_cache.shape
    written = ~batch.key_cache[..., 0].isnan().cpu()
    buffer = torch.full((num_blocks, block_size, num_kv_heads, 2), float("nan"), dtype=torch.float32)
    counts = buffer[..., 1]
    counts[written] = torch.rand(int(written.sum()), generator=gen) * high
    return counts.to(batch.q.device) if batch.q.device.type == "cpu" else buffer.to(batch.q.device)[..., 1]


def packed_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    r: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device | str,
    layout: str = "NHD",
    fill: float = float("nan"),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, key_cache, value_cache): one buffer with r + d channels per token and head, as vLLM's
    DiffKV cache, and the two [num_blocks, block_size, Hkv, r] / [..., d] strided views into it."""
    if layout == "NHD":
        packed = torch.full((num_blocks, block_size, num_kv_heads, r + d), fill, dtype=dtype, device=device)
        logical = packed
    elif layout == "HND":
        packed = torch.full((num_blocks, num_kv_heads, block_size, r + d), fill, dtype=dtype, device=device)
        logical = packed.transpose(1, 2)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return packed, logical[..., :r], logical[..., r:]


def random_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    r: int,
    d: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    layout: str = "NHD",
    gaps: list[tuple[int, int]] | None = None,
    key_share: int = 1,
    sliding_window: int | None = None,
    spare_blocks: int = 3,
    seed: int = 0,
) -> PagedBatch:
    """A ragged batch: sequence i has seq_lens[i] cached positions, the last q_lens[i] of them queried.

    Blocks lying entirely inside a sequence's gap map to the NaN null block 0; gap
    positions sharing a block with kept tokens stay unwritten (NaN). Values are drawn
    on the CPU from `seed`, so a batch is the same on every device; meant for small sizes.
    The default float32 CPU batch is enough to plan launches (`plan_attention`).
    key_share: q gets key_share * r dims per head (shared keys, `attention.paged_attention`).
    sliding_window: the call's window; positions no query sees are left NaN / on the null block.
    """
    assert len(q_lens) == len(seq_lens) and all(0 <= ql <= sl for ql, sl in zip(q_lens, seq_lens))
    gen = torch.Generator().manual_seed(seed)
    gaps_list = gaps if gaps is not None else [(0, 0)] * len(seq_lens)
    # Positions before seen_from[i] lie left of every query's window: never read.
    seen_from = [0 if sliding_window is None else max(0, sl - ql - sliding_window + 1)
                 for ql, sl in zip(q_lens, seq_lens)]

    def unread(i: int, p: int) -> bool:
        lo, hi = gaps_list[i]
        return p < seen_from[i] or lo <= p < hi

    tables: list[list[int]] = []
    needed = 0
    for i, sl in enumerate(seq_lens):
        n_blocks = -(-sl // block_size)
        dropped = [all(unread(i, p) for p in range(b * block_size, min((b + 1) * block_size, sl)))
                   for b in range(n_blocks)]
        tables.append([-1 if drop else 0 for drop in dropped])
        needed += n_blocks - sum(dropped)
    num_blocks = 1 + needed + spare_blocks
    physical = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    for table in tables:
        for b, entry in enumerate(table):
            table[b] = 0 if entry == -1 else physical.pop()

    width = max((len(t) for t in tables), default=0) + 2
    block_table = torch.randint(0, num_blocks, (len(seq_lens), width), generator=gen, dtype=torch.int32)
    for i, table in enumerate(tables):
        block_table[i, : len(table)] = torch.tensor(table, dtype=torch.int32)

    packed, key_cache, value_cache = packed_kv_cache(num_blocks, block_size, num_kv_heads, r, d, dtype, device, layout)
    for i, sl in enumerate(seq_lens):
        pos = torch.tensor([p for p in range(sl) if not unread(i, p)], dtype=torch.long)
        if len(pos) == 0:
            continue
        blocks = block_table[i, pos // block_size].long().to(device)
        offsets = (pos % block_size).to(device)
        key_cache[blocks, offsets] = torch.randn(len(pos), num_kv_heads, r, generator=gen).to(device, dtype)
        value_cache[blocks, offsets] = torch.randn(len(pos), num_kv_heads, d, generator=gen).to(device, dtype)

    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    q = torch.randn(int(cu[-1]), num_heads, key_share * r, generator=gen).to(device, dtype)
    return PagedBatch(
        q=q,
        key_cache=key_cache,
        value_cache=value_cache,
        block_table=block_table.to(device),
        cu_seqlens_q=cu.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale=(key_share * r) ** -0.5,
        gaps=torch.tensor(gaps_list, dtype=torch.int32, device=device) if gaps is not None else None,
        key_share=key_share,
        sliding_window=sliding_window,
        max_seqlen_q=max(q_lens, default=0),
        max_seqlen_k=max(seq_lens, default=0),
        packed=packed,
    )


class StepBuffers:
    """vLLM's persistent inputs for one captured batch shape (what a CUDA graph's launches point at):
    q rows, a packed KV cache, block table, query starts and seq_lens of fixed sizes, refilled in place
    with each step's batch by `load`. Rows and cache blocks the batch does not use hold NaN, unused
    block-table entries random block ids, so a replay that reads them fails its comparison."""

    def __init__(self, num_seqs: int, num_rows: int, num_blocks: int, width: int, *, num_heads: int,
                 num_kv_heads: int, r: int, d: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", key_share: int = 1):
        self.r = r
        self.q = torch.empty(num_rows, num_heads, key_share * r, dtype=dtype, device=device)
        self.packed = torch.empty(num_blocks, block_size, num_kv_heads, r + d, dtype=dtype, device=device)
        self.block_table = torch.empty(num_seqs, width, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.empty(num_seqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.empty(num_seqs, dtype=torch.int32, device=device)

    def load(self, batch: PagedBatch) -> PagedBatch:
        """Copy `batch` (same number of sequences, NHD layout; requests vLLM pads in have q_len =
        seq_len = 0) into the buffers; returns it as a call over them."""
        n, blocks, width = batch.q.shape[0], batch.packed.shape[0], batch.block_table.shape[1]
        self.q.fill_(float("nan"))
        self.q[:n] = batch.q
        self.packed.fill_(float("nan"))
        self.packed[:blocks] = batch.packed
        self.block_table.random_(0, self.packed.shape[0])
        self.block_table[:, :width] = batch.block_table
        self.cu_seqlens_q.copy_(batch.cu_seqlens_q)
        self.seq_lens.copy_(batch.seq_lens)
        return replace(batch, q=self.q, key_cache=self.packed[..., : self.r], value_cache=self.packed[..., self.r :],
                       block_table=self.block_table, cu_seqlens_q=self.cu_seqlens_q, seq_lens=self.seq_lens,
                       packed=self.packed)
