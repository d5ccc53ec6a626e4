"""Unsupported configurations with `--attention-backend thinkv` fail at start-up
with the backend's own message (never a crash mid-request, never a silent fallback)."""

import json
import shutil

import pytest

from tests.tiny import build_tiny_llama
from tests.vllm.engine import BASE_ENV, ENGINE, EngineFailed, run_engine
from vllm_thinkv.launch import ServerProcess


def expect_startup_failure(model, message: str, **engine) -> None:
    spec = {"model": str(model), "engine": {**ENGINE, "attention_backend": "thinkv", **engine},
            "batches": [["Hello"]], "max_tokens": 2}
    with pytest.raises(EngineFailed) as err:
        run_engine(spec, timeout=300)
    assert message in err.value.log


def test_sliding_window_rejected(tiny_llama_dir, tmp_path):
    model = shutil.copytree(tiny_llama_dir, tmp_path / "swa")
    config = json.loads((model / "config.json").read_text())
    config.update(sliding_window=64, layer_types=["sliding_attention"] * config["num_hidden_layers"])
    (model / "config.json").write_text(json.dumps(config))
    expect_startup_failure(model, "thinkv backend does not support sliding-window attention (window 64)")


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
