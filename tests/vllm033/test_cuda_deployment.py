"""vLLM 0.33.0 (the CUDA build) on its CUDA platform, mocked as one H100 (`sm90.py`), in-process:
the paths a GPU deployment takes before its first forward pass. `--attention-backend thinkv`
resolved by vLLM's own CUDA selector, its refusals with thinkv's reasons, stock and thin models
built by vLLM's layers, their KV-cache specs (r != d) and page sizes, the SnapKV spec and the
block manager vLLM would give it."""

import socket
import subprocess
import sys

import pytest
import torch
from vllm.config import AttentionConfig, CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.platforms import current_platform
from vllm.platforms.interface import DeviceCapability
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.selector import AttentionSelectorConfig
from vllm.v1.kv_cache_interface import FullAttentionSpec

from tests.compress.models import tiny_model
from tests.tiny import build_tokenizer
from vllm_thinkv import plugin
from vllm_thinkv.backend import BACKEND_PATH, ThinKVBackend
from vllm_thinkv.backend.deployment import check_selection
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.snapkv.config import SnapKVConfig
from vllm_thinkv.snapkv.kv_cache import SnapKVManager, SnapKVSpec

SNAPKV = {"budget": 64, "window": 8}
CUSTOM = AttentionBackendEnum.CUSTOM


@pytest.fixture(autouse=True)
def registered():
    plugin.register()


def test_runs_on_vllm_033s_cuda_platform():
    import triton
    import vllm

    assert (vllm.__version__, torch.__version__, triton.__version__) == ("0.33.0", "2.14.0+cu130", "3.8.0")
    assert not torch.cuda.is_available()  # the stub driver: no device, even to torch
    assert current_platform.is_cuda() and current_platform.get_device_capability() == DeviceCapability(9, 0)


def selector(**overrides) -> AttentionSelectorConfig:
    return AttentionSelectorConfig(**{**dict(head_size=32, dtype=torch.bfloat16, kv_cache_dtype="auto",
                                             block_size=16), **overrides})


def test_cuda_selector_resolves_thinkv_and_leaves_other_selections_alone():
    assert AttentionConfig(backend="thinkv").backend is CUSTOM  # the alias: registered off CPU too
    # The CUDA selector answers with the path of the class CUSTOM resolves to (outside a
    # deployment, the unconfigured base class), not with the registered BACKEND_PATH.
    for config in (selector(), selector(head_size=16, dtype=torch.float16)):
        assert resolve_obj_by_qualname(current_platform.get_attn_backend_cls(CUSTOM, config)) is ThinKVBackend
    assert CUSTOM.get_path() == BACKEND_PATH
    stock = current_platform.get_attn_backend_cls(None, selector(head_size=64))
    assert "thinkv" not in stock


REFUSALS = [
    (dict(block_size=24), "block_size not supported: thinkv backend: block size must be a multiple of 16, got 24"),
    (dict(head_size=12), "head_size not supported: thinkv backend: query/key head size must be a multiple of 8"),
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype not supported: thinkv backend does not support kv-cache-dtype 'fp8'"),
    (dict(has_sink=True), "attention sinks not supported: thinkv backend does not support attention sinks"),
    (dict(use_mla=True), "MLA not supported: thinkv backend does not support MLA models"),
    (dict(attn_type="encoder_only"), "attention type encoder_only not supported (thinkv backend)"),
]


@pytest.mark.parametrize("overrides, reason", REFUSALS)
def test_cuda_selector_refuses_with_thinkvs_reason(overrides, reason):
    """vLLM's CUDA selector raises with the backend's reasons; `check_selection` (the thin
    models' and the CPU plugin's path) must say exactly the same."""
    with pytest.raises(ValueError) as cuda:
        current_platform.get_attn_backend_cls(CUSTOM, selector(**overrides))
    message = str(cuda.value)
    assert message.startswith("Selected backend AttentionBackendEnum.CUSTOM is not valid for this configuration. "
                              "Reason: [") and reason in message
    with pytest.raises(ThinKVError) as ours:
        check_selection(ThinKVBackend, {**selector(**overrides)._asdict(), "device_capability": DeviceCapability(9, 0)})
    assert str(ours.value) == message


def test_cuda_selector_refuses_a_gpu_older_than_ampere(monkeypatch):
    monkeypatch.setattr(type(current_platform), "get_device_capability",
                        classmethod(lambda cls, device_id=0: DeviceCapability(7, 5)))
    with pytest.raises(ValueError, match=r"thinkv kernels need a GPU with compute capability 8.0 or newer, got 7.5"):
        current_platform.get_attn_backend_cls(CUSTOM, selector())


@pytest.fixture(scope="module")
def distributed():
    """A one-rank (gloo) process group: vLLM's parallel layers ask for their rank."""
    from vllm.distributed import (
        cleanup_dist_env_and_memory,
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        ensure_model_parallel_initialized(1, 1)
    yield
    cleanup_dist_env_and_memory()


def vllm_config(model_dir, backend=None, snapkv=None, block_size=16) -> VllmConfig:
    model = ModelConfig(model=str(model_dir), dtype="bfloat16",
                        hf_overrides={"thinkv_snapkv": snapkv} if snapkv else {})
    return VllmConfig(model_config=model, cache_config=CacheConfig(block_size=block_size),
                      attention_config=AttentionConfig(backend=backend))


def build(config: VllmConfig) -> torch.nn.Module:
    """The model vLLM's loader would build (its registry's class, under the config), left on the CPU.
    vLLM caches its selector's answer per process (one deployment per process), so the cache is
    emptied first, as in a fresh engine process."""
    from vllm.model_executor.model_loader.utils import get_model_architecture
    from vllm.v1.attention.selector import _cached_get_attn_backend

    _cached_get_attn_backend.cache_clear()
    cls, _ = get_model_architecture(config.model_config)
    with set_current_vllm_config(config):
        return cls(vllm_config=config)


def attention_layers(model) -> list:
    from vllm.model_executor.layers.attention import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def kv_cache_spec(layer, config: VllmConfig):
    """A layer's KV-cache spec as vLLM 0.33's GPU model runners (V1 and V2) make it."""
    from vllm.v1.worker.utils import customize_attention_spec

    return customize_attention_spec(layer.get_attn_backend(), layer.get_kv_cache_spec(config))


def test_stock_model_with_attention_backend_thinkv(tiny_llama_dir, distributed):
    """A stock Llama with `--attention-backend thinkv`: vLLM's CUDA selector gives every layer
    the thinkv backend; the KV-cache spec is vLLM's own (r = d = 64)."""
    config = vllm_config(tiny_llama_dir, backend="thinkv")
    layers = attention_layers(build(config))
    assert len(layers) == 4 and all(layer.attn_backend is ThinKVBackend for layer in layers)
    spec = kv_cache_spec(layers[0], config)
    assert type(spec) is FullAttentionSpec and (spec.head_size, spec.head_size_v) == (64, 64)
    assert spec.page_size_bytes == 16 * 2 * (64 + 64) * 2  # block x KV heads x (k + v) x bf16


def test_snapkv_on_cuda_with_either_model_runner(tiny_llama_dir, distributed, monkeypatch):
    """vLLM 0.33 runs the V2 model runner by default on CUDA: SnapKV's settings carry
    `resumed_prefill` (its manager places the compaction step after a re-admitted request's
    tokens, as V2's `is_prefilling` does); with VLLM_USE_V2_MODEL_RUNNER=0 they do not. Either
    way they reach the KV-cache spec, which vLLM's registry hands to SnapKVManager."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    config = vllm_config(tiny_llama_dir, backend="thinkv", snapkv=SNAPKV)
    assert config.use_v2_model_runner
    spec = kv_cache_spec(attention_layers(build(config))[0], config)
    assert isinstance(spec, SnapKVSpec) and spec.snapkv_config == SnapKVConfig(**SNAPKV, resumed_prefill=True)
    assert KVCacheSpecRegistry.get_manager_class(spec) is SnapKVManager
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    config = vllm_config(tiny_llama_dir, backend="thinkv", snapkv=SNAPKV)
    assert not config.use_v2_model_runner
    layers = attention_layers(build(config))
    backend = layers[0].attn_backend
    assert issubclass(backend, ThinKVBackend) and backend.snapkv_config == SnapKVConfig(**SNAPKV)
    assert all(layer.attn_backend is backend for layer in layers)
    spec = kv_cache_spec(layers[0], config)
    assert isinstance(spec, SnapKVSpec) and spec.snapkv_config == SnapKVConfig(**SNAPKV)
    assert KVCacheSpecRegistry.get_manager_class(spec) is SnapKVManager
    assert spec.page_size_bytes == 16 * 2 * (64 + 64) * 2


def test_vllm_keeps_its_full_and_piecewise_cuda_graphs(tiny_llama_dir, distributed):
    """vLLM 0.33's CUDA default, FULL_AND_PIECEWISE, resolved against thinkv's builder as the model
    runner does: it stays (pure-decode and uniform speculative batches replay whole graphs, mixed
    ones piecewise); with SnapKV the builder answers NEVER and vLLM falls back to PIECEWISE."""
    from vllm.config import CUDAGraphMode
    from vllm.v1.attention.backend import AttentionCGSupport

    cases = [(None, 1, AttentionCGSupport.UNIFORM_BATCH, CUDAGraphMode.FULL_AND_PIECEWISE),
             (None, 3, AttentionCGSupport.UNIFORM_BATCH, CUDAGraphMode.FULL_AND_PIECEWISE),
             (SNAPKV, 1, AttentionCGSupport.NEVER, CUDAGraphMode.PIECEWISE)]
    for snapkv, uniform_query_len, support, mode in cases:
        config = vllm_config(tiny_llama_dir, backend="thinkv", snapkv=snapkv)
        layer = attention_layers(build(config))[0]
        got = layer.attn_backend.get_builder_cls().get_cudagraph_support(config, kv_cache_spec(layer, config))
        assert got is support
        assert config.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
        resolved = config.compilation_config.resolve_cudagraph_mode_and_sizes(
            got, layer.attn_backend.__name__, uniform_query_len, use_v2_model_runner=config.use_v2_model_runner)
        assert resolved == mode, (snapkv, uniform_query_len)


def test_stock_model_refused_by_the_cuda_selector(tiny_llama_dir, distributed):
    with pytest.raises(ValueError, match=r"block size must be a multiple of 16, got 24"):
        build(vllm_config(tiny_llama_dir, backend="thinkv", block_size=24))


@pytest.fixture(scope="module")
def thin_dir(tmp_path_factory):
    """A 2-layer Llama (8 query / 2 KV heads, d = 64) compressed to r = 16 with pairs."""
    root = tmp_path_factory.mktemp("thin")
    tiny_model("llama").save_pretrained(root / "src")
    build_tokenizer(root / "src", vocab_size=512)
    subprocess.run([sys.executable, "-m", "vllm_thinkv.cli", "compress", str(root / "src"), str(root / "thin"),
                    "--method", "pairs", "--rank", "16", "--calib-tokens", "512", "--calib-ctx", "128",
                    "--no-progress"], check=True)
    return root / "thin"


def test_thin_model_built_and_loaded_by_vllm_layers(thin_dir, distributed, monkeypatch):
    """A thin checkpoint builds without the selector (its layers name thinkv), with KV-cache
    specs of r = 16 keys and d = 64 values, and loads its own tensors into vLLM's layers."""
    from safetensors.torch import load_file

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # for SnapKV (above)
    for snapkv in (None, SNAPKV):
        config = vllm_config(thin_dir, snapkv=snapkv)
        model = build(config)
        layers = attention_layers(model)
        assert len(layers) == 2 and all(issubclass(layer.attn_backend, ThinKVBackend) for layer in layers)
        for layer in layers:
            spec = kv_cache_spec(layer, config)
            assert (spec.head_size, spec.head_size_v, spec.num_kv_heads, spec.block_size) == (16, 64, 2, 16)
            assert spec.page_size_bytes == 16 * 2 * (16 + 64) * 2
            assert spec.page_size_bytes == FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16,
                                                             head_size_v=64, dtype=torch.bfloat16).page_size_bytes
            assert isinstance(spec, SnapKVSpec) == (snapkv is not None)
    tensors = {}
    for path in sorted(thin_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    loaded = model.load_weights(iter(tensors.items()))
    params = dict(model.named_parameters())
    assert set(params) <= loaded
    attn = model.model.layers[1].self_attn
    name = "model.layers.1.self_attn"
    assert torch.equal(attn.rope_inv_freq, tensors[f"{name}.rope_inv_freq"])
    q, k, v = attn.qkv_proj.weight.split(attn.splits, dim=0)
    assert q.shape == (8 * 16, 256) and k.shape == (2 * 16, 256) and v.shape == (2 * 64, 256)
    assert torch.equal(k, tensors[f"{name}.k_proj.weight"].to(k.dtype))
