"""vLLM general-plugin entry point (`vllm.general_plugins: thinkv`).

vLLM calls `register()` in every process it starts (API server, engine core,
workers). It must be idempotent and must never raise: a failure is logged and
the thinkv backend is then simply unavailable.

Backend name: `--attention-backend thinkv` (any case) resolves to the
`CUSTOM` member of vLLM's `AttentionBackendEnum` through an alias, and
`CUSTOM` is overridden with our backend class. A new enum member
(`register_backend("THINKV", ...)`) would be pickled by value into the
`VllmConfig` that vLLM sends to its engine-core and worker processes; under
the `spawn` start method (always used on CPU, and on CUDA whenever CUDA was
initialised early) the child unpickles that config before it loads plugins and
fails. `CUSTOM` pickles as a name every process knows, and each process
re-applies the override when it loads this plugin.

CPU: vLLM's CPU platform ignores `--attention-backend`; the companion platform
plugin (`vllm_thinkv.platform`) honours it for thinkv only.
"""

from __future__ import annotations

from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so vLLM's log handlers print it

BACKEND_ALIAS = "THINKV"


def register() -> None:
    try:
        _register_backend()
        from vllm_thinkv.snapkv.kv_cache import register_snapkv_spec

        register_snapkv_spec()
        _register_models()
    except Exception:  # never break vLLM start-up for users who did not ask for thinkv
        logger.exception("vllm-thinkv: registration failed; the thinkv attention backend is unavailable")


def _register_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_thinkv.backend import BACKEND_PATH

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_PATH:
        logger.error(
            "vllm-thinkv: the CUSTOM attention backend is already taken by %s; "
            "not registering thinkv (uninstall one of the two plugins)",
            custom.get_path(),
        )
        return
    register_backend(custom, BACKEND_PATH)
    if not _cpu_routing_available():
        return
    # The alias: AttentionBackendEnum["THINKV"] is CUSTOM (enum members are
    # looked up in _member_map_; `register()` writes the same map).
    AttentionBackendEnum._member_map_.setdefault(BACKEND_ALIAS, custom)


def _register_models() -> None:
    from vllm import ModelRegistry

    from vllm_thinkv.models import MODEL_CLASSES

    for arch, path in MODEL_CLASSES.items():
        ModelRegistry.register_model(arch, path)


def _cpu_routing_available() -> bool:
    """On CPU, thinkv needs our platform plugin; without it a thinkv selection would
    silently run vLLM's CPU attention, so the name is left unregistered (vLLM then
    rejects `--attention-backend thinkv` as unknown) and the reason is logged."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return True
    from vllm_thinkv.platform import ThinKVCpuPlatform

    if isinstance(current_platform, ThinKVCpuPlatform):
        return True
    logger.error(
        "vllm-thinkv: vLLM is using %s, not the thinkv CPU platform plugin, so it would ignore "
        "`--attention-backend thinkv`; the thinkv backend is unavailable. Platform plugins are "
        "skipped when VLLM_TARGET_DEVICE=cpu is set or VLLM_PLUGINS omits `thinkv`; the plugin "
        "supports vLLM's stock CpuPlatform only.",
        type(current_platform).__name__,
    )
    return False
