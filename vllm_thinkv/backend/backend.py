"""`ThinKVBackend`: what the thinkv backend supports, stated explicitly.

vLLM's own selector (on CUDA) calls these capability methods and rejects an
unsupported configuration before the model is built; the impl re-checks what
the selector does not see (CPU skips selection) with messages that name the
problem and what is supported.

Head sizes: vLLM passes the QK head size (`head_size` = r) here; the V head
size d arrives with the layer's KV-cache spec and is checked in `customize_spec`
(the rules are the kernels' own: `vllm_thinkv.kernels.checks`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType, MultipleOf

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels.checks import check_head_dims, check_qk_head_dim
from vllm_thinkv.snapkv.config import SnapKVConfig

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import AttentionSpec

BACKEND_PATH = "vllm_thinkv.backend.backend.ThinKVBackend"

# vLLM's selector (CUDA) reports generic reasons; say what thinkv supports instead.
THINKV_REASONS = {
    "head_size not supported": "thinkv backend: query/key head size must be a multiple of 8 from 8 to 256",
    "dtype not supported": "thinkv backend supports float16, bfloat16 and float32 models",
    "kv_cache_dtype not supported": "thinkv backend does not support this kv-cache-dtype (supported: auto, float16, bfloat16)",
    "block_size not supported": "thinkv backend: block size must be a multiple of 16",
    "sliding window not supported": "thinkv backend does not support sliding-window attention",
    "attention sinks not supported": "thinkv backend does not support attention sinks",
    "MLA not supported": "thinkv backend does not support MLA models",
    "compute capability not supported": "thinkv kernels need a GPU with compute capability 8.0 or newer",
    "KV connector not supported": "thinkv backend does not support KV-transfer connectors",
}

# What the kernels implement is checked by the kernels' own functions (one rule, one place).
BLOCK_SIZE_MULTIPLE = 16
MIN_COMPUTE_CAPABILITY = (8, 0)  # bf16 tensor-core dots

class ThinKVBackend(AttentionBackend):
    """Paged attention with QK head size r and V head size d (DiffKV cache layout)."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # No quantised KV cache: the kernels read K and V in the model dtype.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]
    # KV writes happen in `do_kv_cache_update`, before `forward`.
    forward_includes_kv_cache_update: bool = False
    # The deployment's SnapKV settings, set while the model is built (the impl
    # reads them from the HF config) and read by `customize_spec`, which vLLM
    # calls without a config (the same pattern as vLLM's DiffKV `head_size_v`).
    snapkv: ClassVar[SnapKVConfig | None] = None

    @classmethod
    def configure_snapkv(cls, config: SnapKVConfig | None) -> None:
        cls.snapkv = config

    @staticmethod
    def get_name() -> str:
        # Must name an existing enum member: `thinkv` is an alias of CUSTOM
        # (see `vllm_thinkv.plugin`), which pickles safely under `spawn`.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        from vllm_thinkv.backend.impl import ThinKVImpl

        return ThinKVImpl

    @staticmethod
    def get_builder_cls():
        from vllm_thinkv.backend.metadata import ThinKVMetadataBuilder

        return ThinKVMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(BLOCK_SIZE_MULTIPLE)]

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return block_size is None or block_size % BLOCK_SIZE_MULTIPLE == 0

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        try:
            check_qk_head_dim(head_size)
        except ThinKVError:
            return False
        return True

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability is None or (capability.major, capability.minor) >= MIN_COMPUTE_CAPABILITY

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_alibi_sqrt(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_rswa(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False

    @classmethod
    def supports_kv_connector(cls) -> bool:
        # Untested with KV transfer connectors; refuse rather than guess.
        return False

    @classmethod
    def supported_kv_cache_layouts(cls):
        # The kernels take arbitrary strides: any layout vLLM prefers.
        return None

    @classmethod
    def validate_configuration(cls, **kwargs) -> list[str]:
        """vLLM's reasons (it calls this with keywords only), with thinkv's explanation."""
        reasons = super().validate_configuration(**kwargs)
        return [f"{r}: {THINKV_REASONS[r]}" if r in THINKV_REASONS else f"{r} (thinkv backend)" for r in reasons]

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        # The one place vLLM shows the backend the V head size before allocation.
        check_head_dims(spec.head_size, spec.head_size_v)
        if cls.snapkv is not None:
            from vllm_thinkv.snapkv.kv_cache import snapkv_spec

            return snapkv_spec(spec, cls.snapkv)
        return spec
