"""Per-batch metadata for the thinkv backend.

The kernels need only what vLLM's `CommonAttentionMetadata` already holds
(query start offsets, context lengths, block table, and the host
maxima that let the op choose decode vs prefill tiles without a device sync).
With SnapKV, the builder also plans the step (`snapkv.tracker`) from the
settings its KV-cache spec carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels.checks import check_block_size
from vllm_thinkv.snapkv.kv_cache import SnapKVSpec
from vllm_thinkv.snapkv.requests import deployment_settings, processor_for
from vllm_thinkv.snapkv.tracker import SnapKVStep, SnapKVTracker


@dataclass
class ThinKVMetadata:
    num_actual_tokens: int  # tokens in the batch, excluding padding
    max_query_len: int  # host copy: picks the decode or prefill kernel
    max_seq_len: int  # host upper bound: picks the split-KV count
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context incl. this step's tokens
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32
    # SnapKV (None when off): this step's plan, its host copy of query starts,
    # and the per-row [start, end) gaps of compacted requests (None if no row has one).
    snapkv_step: SnapKVStep | None = None
    query_start_loc_cpu: list[int] | None = None
    gaps: torch.Tensor | None = None


class ThinKVMetadataBuilder(AttentionMetadataBuilder[ThinKVMetadata]):
    # Uniform batches (pure decode, or 1 + k speculative tokens per request) replay as whole CUDA
    # graphs (vLLM's default FULL_AND_PIECEWISE). A captured launch is the plan of the capture's
    # metadata, and that plan depends only on the batch's shape (rows, requests, whether the uniform
    # query length takes the decode or the prefill launch) and on `max_seq_len`'s split bucket
    # (`kernels.launch.context_bucket`), which both model runners set to max_model_len at capture:
    # a replay runs the capture's split count, valid for any context up to max_model_len. Every
    # tensor the launches read is vLLM's persistent buffer (query starts, seq_lens, block table),
    # so a replay sees the step's values; requests vLLM pads in have no query tokens and rows past
    # the last query start are neither read nor written (tests/kernels/test_padding.py). Mixed
    # batches pick their launches from max_query_len, so they stay piecewise (attention eager).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """NEVER with SnapKV: a request is compacted in its first decode step, inside the layer's
        forward (host-planned), and the gap masking switches on per step (`gaps`, the kernels'
        HAS_GAP): a replayed graph would do neither, so attention stays eager between piecewise graphs."""
        if isinstance(kv_cache_spec, SnapKVSpec) or deployment_settings(vllm_config) is not None:
            return AttentionCGSupport.NEVER
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # The block size vLLM really allocates (the selector sees only a user-given one).
        check_block_size(kv_cache_spec.block_size)
        snapkv_config = kv_cache_spec.snapkv_config if isinstance(kv_cache_spec, SnapKVSpec) else None
        wanted = deployment_settings(vllm_config)
        if snapkv_config != wanted:
            # vLLM caches its selector's answer per process (keyed by head size, dtypes, ...), so a
            # second engine in the same process reuses the first one's backend class unchecked.
            raise ThinKVError(f"thinkv SnapKV: this engine asks for {wanted} but its KV cache was built for "
                              f"{snapkv_config}; run engines with different SnapKV settings in separate processes")
        self.snapkv_tracker = None if snapkv_config is None else SnapKVTracker(
            snapkv_config, max_windows=2 * vllm_config.scheduler_config.max_num_seqs)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> ThinKVMetadata:
        m = common_attn_metadata
        metadata = ThinKVMetadata(
            num_actual_tokens=m.num_actual_tokens,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
        )
        if self.snapkv_tracker is not None:
            self._plan_snapkv(metadata, m)
        return metadata

    def _plan_snapkv(self, metadata: ThinKVMetadata, m: CommonAttentionMetadata) -> None:
        """Host-side SnapKV bookkeeping (one small device-to-host copy on GPU)."""
        if m.is_prefilling is None:
            raise ThinKVError("thinkv SnapKV needs vLLM's per-request `is_prefilling` metadata, "
                              "which this model runner does not provide")
        n = m.num_reqs
        seq_lens = m.seq_lens_cpu_upper_bound if m.seq_lens_cpu_upper_bound is not None else m.seq_lens.cpu()
        query_start = m.query_start_loc_cpu[: n + 1].tolist()
        step = self.snapkv_tracker.step(
            first_blocks=m.block_table_tensor[:n, 0].tolist(),
            query_start=query_start,
            seq_lens=seq_lens[:n].tolist(),
            is_prefilling=m.is_prefilling[:n].tolist(),
            # each request's own budget, by row (`snapkv.requests`; None when the deployment does not take them)
            requests=requests.rows if (requests := processor_for(self.vllm_config)) is not None else None,
        )
        metadata.snapkv_step = step
        metadata.query_start_loc_cpu = query_start
        if step.has_gaps:
            metadata.gaps = torch.tensor(step.gaps, dtype=torch.int32).to(m.seq_lens.device, non_blocking=True)
