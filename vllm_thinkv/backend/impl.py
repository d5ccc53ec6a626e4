"""`ThinKVImpl`: writes new K/V into the packed DiffKV cache and runs paged attention.

The per-layer cache vLLM hands us is the logical view
`[num_blocks, num_kv_heads, block_size, r + d]` of one packed buffer (any
physical layout); K is `[..., :r]`, V is `[..., r:]`. The ops take these as
strided views, so nothing is copied. With a merging SnapKV policy each row also
carries the slot's float32 ln(count) (`snapkv.kv_cache.split_packed`): new tokens
get count 1, compaction writes the merged slots' counts, the kernels add them.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionImpl, AttentionLayer, AttentionType

from vllm_thinkv.backend.metadata import ThinKVMetadata
from vllm_thinkv.backend.ops import select_ops
from vllm_thinkv.backend.snapkv_layer import SnapKVLayer
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels.calls import KVWrite
from vllm_thinkv.kernels.checks import (
    SUPPORTED_KV_CACHE_DTYPES,
    check_key_share,
    check_qk_head_dim,
    check_sliding_window,
)
from vllm_thinkv.snapkv.kv_cache import split_packed

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so vLLM's log handlers print it


def _unsupported(feature: str) -> ThinKVError:
    return ThinKVError(
        f"thinkv backend does not support {feature}. Supported: decoder-only causal "
        "self-attention (full or sliding-window) without ALiBi, sinks or logit soft-capping, "
        f"with an fp16/bf16/fp32 KV cache (kv-cache-dtype {'/'.join(SUPPORTED_KV_CACHE_DTYPES)})"
    )


class ThinKVImpl(AttentionImpl[ThinKVMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra_impl_args,
    ) -> None:
        # Reject what the kernels do not implement in this layer, at model
        # construction (start-up), never mid-request. The deployment as a whole
        # was checked once before the first layer (`backend.deployment`); these are
        # the per-layer facts vLLM hands only to the impl.
        if attn_type != AttentionType.DECODER:
            raise _unsupported(f"attention type {attn_type!r}")
        try:
            check_sliding_window(sliding_window)
        except ThinKVError as e:
            raise ThinKVError(f"thinkv backend: this layer's {e}") from None
        if alibi_slopes is not None:
            raise _unsupported("ALiBi")
        if logits_soft_cap:
            raise _unsupported(f"logit soft-capping ({logits_soft_cap})")
        if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
            raise _unsupported(f"kv-cache-dtype {kv_cache_dtype!r}")
        if kv_sharing_target_layer_name is not None:
            raise _unsupported("cross-layer KV-cache sharing")
        if extra_impl_args.get("sinks") is not None:
            raise _unsupported("attention sinks")
        if extra_impl_args.get("chunk_lookback", -1) > -1:
            raise _unsupported("chunked attention with lookback")
        # key_share: the thin models' shared key latent (`models.attention`), S KV-head slots per key
        key_share = extra_impl_args.pop("key_share", 1)
        # d, which vLLM does not pass to the impl: thinkv's models pass it; other models have d = r
        value_head_size = extra_impl_args.pop("value_head_size", head_size)
        unknown = {k: v for k, v in extra_impl_args.items() if k not in ("sinks", "chunk_lookback") and v}
        if unknown:
            raise _unsupported(f"the attention options {sorted(unknown)}")
        # d is checked against the cache spec in ThinKVBackend.customize_spec.
        check_qk_head_dim(head_size)
        num_kv_heads = num_kv_heads or num_heads
        check_key_share(key_share, num_kv_heads, head_size)

        self.num_heads = num_heads
        self.head_size = head_size  # r, the query/key size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.key_share = key_share
        self.sliding_window = sliding_window  # None: full causal attention
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.ops = select_ops("cpu" if current_platform.is_cpu() else "cuda")
        logger.info_once("thinkv attention backend: %s ops", self.ops.name)
        # The model dtype is the cache's (the kernels read K/V in q's dtype); vLLM builds layers under it.
        self.ops.prepare(torch.get_default_dtype() if kv_cache_dtype == "auto" else getattr(torch, kv_cache_dtype),
                         head_size, value_head_size)
        # Made on the first step that carries a SnapKV plan, from the settings the
        # plan carries (the KV-cache spec's, through the metadata builder).
        self.snapkv_layer: SnapKVLayer | None = None

    def _split_cache(self, kv_cache: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """[B, Hkv, N, r + d (+ counts)] -> K [B, N, Hkv, r], V [B, N, Hkv, d], ln counts [B, N, Hkv] or None."""
        return split_packed(kv_cache, self.head_size, d)

    def do_kv_cache_update(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        n = slot_mapping.shape[0]
        key_cache, value_cache, log_counts = self._split_cache(kv_cache, value.shape[-1])
        self.ops.write_kv(key[:n], value[:n], key_cache, value_cache, slot_mapping)
        if log_counts is not None:  # a new token is itself: count 1 (the slot may hold a finished request's count)
            _, blocks, offsets = KVWrite(key, value, key_cache, value_cache, slot_mapping).destinations()
            log_counts[blocks, offsets] = 0.0

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: ThinKVMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [T, H, r] (shared keys: [T·S, H, r], vLLM's view of [T, H, S·r]) -> output [T, H, d] (in place)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("thinkv backend: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        if self.key_share > 1:  # vLLM viewed the S·r-wide query as S rows of r per token: view it back
            query = query.reshape(output.shape[0], self.num_heads, self.key_share * self.head_size)
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache, log_counts = self._split_cache(kv_cache, output.shape[-1])
        if attn_metadata.snapkv_step is not None:
            if self.snapkv_layer is None:
                self.snapkv_layer = SnapKVLayer(attn_metadata.snapkv_step.config, self.scale, self.ops)
            self.snapkv_layer.before_attention(attn_metadata, query, (key_cache, value_cache, log_counts))
        self.ops.paged_attention(
            query[:n],
            key_cache,
            value_cache,
            attn_metadata.block_table,
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            self.scale,
            out=output[:n],
            gaps=attn_metadata.gaps,
            max_seqlen_q=attn_metadata.max_query_len,
            max_seqlen_k=attn_metadata.max_seq_len,
            key_share=self.key_share,
            sliding_window=self.sliding_window,
            log_counts=log_counts,
        )
        return output

