"""`ThinKVBackend`: what the thinkv backend supports, stated explicitly.

vLLM's selector calls these capability methods with the deployment's values
and refuses an unsupported configuration as the first attention layer is built; the thin
models and the CPU platform plugin run the same check (`deployment.check_selection`)
so every path gives the selector's message. Every limit comes from the kernels'
own definitions (`vllm_thinkv.kernels.checks`).

Head sizes: vLLM passes the QK head size (`head_size` = r) here; the V head
size d arrives with the layer's KV-cache spec and is checked in `customize_spec`.

A deployment with SnapKV runs on a subclass made by `backend_for(snapkv_config)`,
whose `customize_spec` puts those settings into the KV-cache spec (the only
channel vLLM offers from a backend to its engine-core block manager). The
subclass is made once per settings value and never changed afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType, MultipleOf

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels.checks import (
    BLOCK_SIZE_MULTIPLE,
    MAX_HEAD_DIM,
    MIN_COMPUTE_CAPABILITY,
    QK_MULTIPLE,
    SUPPORTED_DTYPES,
    SUPPORTED_KV_CACHE_DTYPES,
    check_head_dims,
    check_qk_head_dim,
)
from vllm_thinkv.snapkv.config import SnapKVConfig

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import AttentionSpec

def _capability(selection: dict[str, Any]) -> str:
    cap = selection.get("device_capability")
    return f"{cap.major}.{cap.minor}" if cap is not None else "none"


# vLLM's selector reports generic reasons; say what thinkv supports, and what it got.
THINKV_REASONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "head_size not supported": lambda c: f"thinkv backend: query/key head size must be a multiple of {QK_MULTIPLE} "
                                         f"from {QK_MULTIPLE} to {MAX_HEAD_DIM}, got {c.get('head_size')}",
    "dtype not supported": lambda c: f"thinkv backend supports {', '.join(str(t) for t in SUPPORTED_DTYPES)} models, "
                                     f"got {c.get('dtype')}",
    "kv_cache_dtype not supported": lambda c: f"thinkv backend does not support kv-cache-dtype {c.get('kv_cache_dtype')!r} "
                                              f"(supported: {', '.join(SUPPORTED_KV_CACHE_DTYPES)})",
    "block_size not supported": lambda c: f"thinkv backend: block size must be a multiple of {BLOCK_SIZE_MULTIPLE}, "
                                          f"got {c.get('block_size')}",
    "attention sinks not supported": lambda c: "thinkv backend does not support attention sinks",
    "MLA not supported": lambda c: "thinkv backend does not support MLA models",
    "compute capability not supported": lambda c: "thinkv kernels need a GPU with compute capability {}.{} or newer, "
                                                  "got {}".format(*MIN_COMPUTE_CAPABILITY, _capability(c)),
    "KV connector not supported": lambda c: "thinkv backend does not support KV-transfer connectors",
}

class ThinKVBackend(AttentionBackend):
    """Paged attention with QK head size r and V head size d (DiffKV cache layout)."""

    supported_dtypes: ClassVar[list[torch.dtype]] = list(SUPPORTED_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(SUPPORTED_KV_CACHE_DTYPES)
    # KV writes happen in `do_kv_cache_update`, before `forward`.
    forward_includes_kv_cache_update: bool = False
    # Set only in the subclasses `backend_for` makes, at their creation.
    snapkv_config: ClassVar[SnapKVConfig | None] = None

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
        # The layer's window reaches the impl (`sliding_window`) and the kernels (t - W < p <= t);
        # vLLM's SlidingWindowSpec carries head_size_v, and its manager frees the blocks that slid out.
        return True

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
        return [f"{r}: {THINKV_REASONS[r](kwargs)}" if r in THINKV_REASONS else f"{r} (thinkv backend)" for r in reasons]

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        from vllm.v1.kv_cache_interface import SlidingWindowSpec

        # The one place vLLM shows the backend the V head size before allocation.
        check_head_dims(spec.head_size, spec.head_size_v)
        if cls.snapkv_config is None or isinstance(spec, SlidingWindowSpec):
            # (vLLM asks sliding-window layers only for their page size; SnapKV with sliding layers is
            # refused at start-up, `deployment.check_deployment`.)
            return spec
        from vllm_thinkv.snapkv.kv_cache import snapkv_spec

        return snapkv_spec(spec, cls.snapkv_config)


@functools.cache
def backend_for(snapkv_config: SnapKVConfig | None) -> type[ThinKVBackend]:
    """The backend class for a deployment: `ThinKVBackend` itself without SnapKV,
    else one subclass per settings value (equal settings, the same class).

    It keeps the base class's module and name, so vLLM's logs and
    `full_cls_name()` path name it as the backend vLLM resolves
    (`vllm_thinkv.backend.selected`)."""
    if snapkv_config is None:
        return ThinKVBackend
    return type(ThinKVBackend.__name__, (ThinKVBackend,), {
        "__module__": "vllm_thinkv.backend.selected",
        "__qualname__": ThinKVBackend.__qualname__,
        "__doc__": f"ThinKVBackend with SnapKV {snapkv_config.to_dict()}",
        "snapkv_config": snapkv_config,
    })
