"""What an engine asks of the thinkv backend, checked once per engine, before the
first attention layer exists (vLLM selects a backend inside that layer's constructor).

Two checks, each in one place:

* `check_deployment(vllm_config)`: what the selector's capability methods
  cannot see (KV-cache dtype vs model dtype, KV connectors, a `thinkv` section
  the architecture would ignore, SnapKV settings and what they exclude);
  it returns the backend class for the deployment (`backend.backend_for`).
* `check_selection(backend, selection)`: the selector's own capability check,
  with vLLM's message. vLLM runs it on CUDA for `--attention-backend thinkv`;
  the CPU platform plugin and the thin models (which pass their backend to
  vLLM's `Attention` and so never reach the selector) run it here.

Stock models with `--attention-backend thinkv` reach both through
`vllm_thinkv.backend.selected` (the path vLLM resolves); thin models call
`thin_model_backend` from their constructor.
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

from vllm_thinkv.backend.backend import ThinKVBackend, backend_for
from vllm_thinkv.config import check_architecture
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels.checks import SUPPORTED_KV_CACHE_DTYPES, check_sliding_window
from vllm_thinkv.snapkv.config import SnapKVConfig
from vllm_thinkv.snapkv.config import check_tensor_parallel as check_snapkv_parallel
from vllm_thinkv.snapkv.requests import deployment_settings

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so vLLM's log handlers print it


def check_deployment(vllm_config) -> type[ThinKVBackend]:
    """Refuse what no capability method sees; the backend class for this deployment."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    model_config = vllm_config.model_config
    hf_config = model_config.hf_config
    kv_cache_dtype = vllm_config.cache_config.cache_dtype
    # (An unsupported dtype such as fp8 is refused by the capability check, `check_selection`.)
    if (kv_cache_dtype in SUPPORTED_KV_CACHE_DTYPES and kv_cache_dtype != "auto"
            and kv_cache_dtype_str_to_dtype(kv_cache_dtype, model_config) != model_config.dtype):
        raise ThinKVError(f"thinkv backend does not support a {kv_cache_dtype} KV cache for a {model_config.dtype} "
                          "model (the KV cache must be in the model dtype; use --kv-cache-dtype auto)")
    if vllm_config.kv_transfer_config is not None:
        raise ThinKVError("thinkv backend does not support KV-transfer connectors (--kv-transfer-config)")
    check_architecture(list(getattr(hf_config, "architectures", None) or []), getattr(hf_config, "thinkv", None) is not None)
    sliding_window = model_config.get_sliding_window()  # None unless some layer slides (0 was made None)
    try:
        check_sliding_window(sliding_window)
    except ThinKVError as e:
        raise ThinKVError(f"thinkv backend: the model's {e}") from None
    snapkv_config = deployment_settings(vllm_config)
    if snapkv_config is not None:
        if sliding_window is not None:
            # A sliding layer's blocks are freed by vLLM's window manager, not compacted; SnapKV would
            # need its selection and gap on the full-attention layers only (not built yet).
            raise ThinKVError(
                f"thinkv SnapKV does not support models with sliding-window attention layers yet (this model's "
                f"window: {sliding_window} tokens): serve it without `thinkv_snapkv`; sliding layers already "
                "hold only their window"
            )
        if vllm_config.speculative_config is not None:
            raise ThinKVError("thinkv SnapKV does not support speculative decoding")
        check_snapkv_parallel(model_config.get_total_num_kv_heads(), vllm_config.parallel_config.tensor_parallel_size)
        if vllm_config.use_v2_model_runner and snapkv_config.per_request:
            # vLLM's V2 runner loads only V2-interface logits processors; SnapKVRequestBudgets is a V1 one.
            raise ThinKVError("thinkv SnapKV per-request budgets (the SnapKVRequestBudgets logits processor) need "
                              "vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0, or serve without "
                              "--logits-processors for SnapKV")
        logger.info_once("thinkv SnapKV: %s%s; prefix caching is off for this KV cache "
                         "(compaction rewrites prompt blocks)", str(snapkv_config.to_dict()),
                         ", per-request budgets" if snapkv_config.per_request else "")
    return backend_for(snapkv_config)


def check_selection(backend: type[ThinKVBackend], selection: dict[str, Any]) -> None:
    """vLLM's selector check (`CudaPlatform.get_attn_backend_cls`), with its message."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    reasons = backend.validate_configuration(**selection)
    if reasons:
        raise ThinKVError(f"Selected backend {AttentionBackendEnum.CUSTOM} is not valid for this configuration. "
                          f"Reason: {reasons}")


def selection_for(vllm_config, head_size: int, has_sliding_window: bool = False) -> dict[str, Any]:
    """What vLLM's `get_attn_backend` would ask of a decoder layer of this deployment
    (a block size only when the user gave one: vLLM may pick its own otherwise)."""
    from vllm import envs
    from vllm.platforms import current_platform

    cache_config = vllm_config.cache_config
    parallel = vllm_config.parallel_config
    kv_transfer = vllm_config.kv_transfer_config
    return dict(
        head_size=head_size,
        dtype=vllm_config.model_config.dtype,
        kv_cache_dtype=cache_config.cache_dtype,
        block_size=cache_config.block_size if cache_config.user_specified_block_size else None,
        use_mla=False,
        has_sink=False,
        use_sparse=False,
        use_mm_prefix=False,
        use_per_head_quant_scales=False,
        device_capability=current_platform.get_device_capability(),
        attn_type="decoder",
        has_sliding_window=has_sliding_window,
        use_non_causal=vllm_config.attention_config.use_non_causal,
        use_batch_invariant=envs.VLLM_BATCH_INVARIANT,
        use_kv_connector=kv_transfer is not None and kv_transfer.is_kv_transfer_instance,
        use_pcp=parallel.prefill_context_parallel_size > 1,
        use_dcp=parallel.decode_context_parallel_size > 1,
    )


def thin_model_backend(vllm_config, ranks: list[int] | tuple[int, ...], share_group: int = 1) -> type[ThinKVBackend]:
    """The backend a thin model's layers use, after both checks (one per distinct rank).
    `share_group`: KV heads per key latent (method joint)."""
    backend = check_deployment(vllm_config)
    if share_group > 1 and SnapKVConfig.from_hf_config(vllm_config.model_config.hf_config) is not None:
        # SnapKV keeps different prompt tokens per KV head; a shared key needs all S slots of a token.
        raise ThinKVError(
            f"thinkv SnapKV does not support a key latent shared by {share_group} KV heads (method joint) yet: SnapKV "
            "keeps different prompt tokens per KV head. Use a per-head method (pca, pairs, svd) with SnapKV"
        )
    for rank in sorted(set(ranks)):
        check_selection(backend, selection_for(vllm_config, rank))
    return backend
