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

logger = init_logger(__name__)

BACKEND_ALIAS = "THINKV"


def register() -> None:
    try:
        _register_backend()
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
    # The alias: AttentionBackendEnum["THINKV"] is CUSTOM (enum members are
    # looked up in _member_map_; `register()` writes the same map).
    AttentionBackendEnum._member_map_.setdefault(BACKEND_ALIAS, custom)
