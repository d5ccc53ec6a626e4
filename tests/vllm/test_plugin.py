"""Registration, name resolution and capability gating, in-process (no engine)."""

import os
import pickle
import subprocess
import sys

import pytest
import torch
from vllm.config.attention import AttentionConfig
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.selector import AttentionSelectorConfig

from vllm_thinkv import plugin
from vllm_thinkv.backend import BACKEND_PATH, ThinKVBackend
from vllm_thinkv.platform import ThinKVCpuPlatform, cpu_platform


@pytest.fixture(autouse=True)
def registered():
    plugin.register()


def test_register_is_idempotent_and_resolves_any_case():
    plugin.register()
    plugin.register()
    for name in ("thinkv", "THINKV", "ThinKV"):
        assert AttentionConfig(backend=name).backend is AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.CUSTOM.get_class() is ThinKVBackend


def test_register_never_raises(monkeypatch):
    import vllm.v1.attention.backends.registry as registry

    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("registry exploded")

    monkeypatch.setattr(registry, "register_backend", broken)
    plugin.register()  # logs the failure instead of raising into vLLM's start-up
    assert calls


def test_selected_backend_pickles_as_a_stock_member():
    """What makes `--attention-backend thinkv` spawn-safe: the config carries CUSTOM,
    which a fresh process with no plugins loaded can unpickle."""
    payload = pickle.dumps(AttentionConfig(backend="thinkv").backend)
    code = (
        "import pickle, sys; from vllm.v1.attention.backends.registry import AttentionBackendEnum as E; "
        "assert pickle.loads(sys.stdin.buffer.read()) is E.CUSTOM"
    )
    subprocess.run([sys.executable, "-c", code], input=payload, check=True, env={**os.environ, "VLLM_PLUGINS": ""})


def selector(**overrides) -> AttentionSelectorConfig:
    return AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=32,
                                   **overrides)


def test_cpu_platform_routes_only_a_thinkv_selection():
    stock = AttentionBackendEnum.CPU_ATTN.get_path()
    assert ThinKVCpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, selector()) == BACKEND_PATH
    assert ThinKVCpuPlatform.get_attn_backend_cls(None, selector()) == stock
    assert ThinKVCpuPlatform.get_attn_backend_cls(AttentionBackendEnum.TRITON_ATTN, selector()) == stock


def test_platform_plugin_activates_only_where_stock_cpu_platform_would():
    from vllm.platforms import cpu_platform_plugin

    expected = "vllm_thinkv.platform.ThinKVCpuPlatform" if cpu_platform_plugin() == "vllm.platforms.cpu.CpuPlatform" else None
    assert cpu_platform() == expected


def reasons(**overrides) -> list[str]:
    args = dict(head_size=32, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, use_mla=False,
                has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
                device_capability=DeviceCapability(9, 0), attn_type="decoder")
    return ThinKVBackend.validate_configuration(**{**args, **overrides})


def test_capabilities_seen_by_vllm_selector():
    """On CUDA vLLM validates an explicitly selected backend with these methods and
    raises with the reasons: each must say what thinkv supports."""
    assert reasons() == []
    assert reasons(head_size=16) == []  # thin keys below vLLM's own Triton minimum of 32
    assert reasons(head_size=8) == []
    assert reasons(has_sliding_window=True) == []  # the layer's window reaches the kernels
    cases = {
        "head_size not supported: thinkv backend: query/key head size must be a multiple of 8": dict(head_size=12),
        "head_size not supported: thinkv": dict(head_size=264),
        "kv_cache_dtype not supported: thinkv backend does not support kv-cache-dtype 'fp8'": dict(kv_cache_dtype="fp8"),
        "block_size not supported: thinkv backend: block size must be a multiple of 16": dict(block_size=24),
        "attention sinks not supported: thinkv": dict(has_sink=True),
        "attention type encoder_only not supported (thinkv backend)": dict(attn_type="encoder_only"),
        "MLA not supported: thinkv": dict(use_mla=True),
    }
    for expected, overrides in cases.items():
        got = reasons(**overrides)
        assert len(got) == 1 and got[0].startswith(expected), (overrides, got)


def test_no_silent_cpu_fallback_when_platform_plugins_are_skipped():
    """VLLM_TARGET_DEVICE=cpu makes vLLM skip platform plugins, so the CPU platform would
    ignore a thinkv selection: the name must then be refused, with the reason logged."""
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins()\n"
        "from vllm.config.attention import AttentionConfig\n"
        "try:\n    AttentionConfig(backend='thinkv')\nexcept Exception as e:\n    print('REFUSED:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    assert "REFUSED:" in proc.stdout and "Unknown attention backend: 'THINKV'" in proc.stdout
    assert "not the thinkv CPU platform plugin" in proc.stdout + proc.stderr
