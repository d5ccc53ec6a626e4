"""Per-batch metadata for the thinkv backend.

The kernels need only what vLLM's `CommonAttentionMetadata` already holds
(query start offsets, context lengths, block table, slot mapping, and the host
maxima that let the op choose decode vs prefill tiles without a device sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata


@dataclass
class ThinKVMetadata:
    num_actual_tokens: int  # tokens in the batch, excluding padding
    max_query_len: int  # host copy: picks the decode or prefill kernel
    max_seq_len: int  # host upper bound: picks the split-KV count
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context incl. this step's tokens
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padding


class ThinKVMetadataBuilder(AttentionMetadataBuilder[ThinKVMetadata]):
    # The kernels choose their grid from host-side maxima each step, so a
    # captured CUDA graph would freeze one choice: attention runs eagerly
    # between piecewise graphs instead.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> ThinKVMetadata:
        m = common_attn_metadata
        return ThinKVMetadata(
            num_actual_tokens=m.num_actual_tokens,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
        )
