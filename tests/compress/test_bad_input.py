"""Every bad input of the issue gives a ThinKVError with a precise message, and the CLI exits 2."""

from __future__ import annotations

import json

import pytest

from vllm_thinkv.cli import main
from vllm_thinkv.config import (
    CompressRequest,
    ThinKVConfig,
    check_load_time_parallel,
    check_tensor_parallel,
    form_for,
    parse_thinkv_section,
)
from vllm_thinkv.errors import ThinKVError

FAST = ["--calib-tokens", "256", "--calib-ctx", "128", "--no-progress"]


@pytest.mark.parametrize(
    "method, rank, message",
    [
        ("pca", 72, r"rank 72 is not supported: it must be a multiple of 8 from 8 to 64 \(the model's head_dim\)"),
        ("pca", 0, r"rank 0 is not supported: it must be a multiple of 8 from 8 to 64"),
        ("svd", -8, r"rank -8 is not supported"),
        ("pairs", 31, r"rank 31 is not supported: it must be a multiple of 8"),
        ("pca", 20, r"rank 20 is not supported: it must be a multiple of 8 from 8 to 64"),
        ("pairs", 30, r"rank 30 is not supported"),
    ],
)
def test_bad_rank(tiny_llama_dir, tmp_path, capsys, method, rank, message):
    assert main(["compress", str(tiny_llama_dir), str(tmp_path / "o"), "--method", method, "--rank", str(rank), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("thinkv compress: error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "o").exists()


def _config_only(tmp_path, **cfg):
    d = tmp_path / "model"
    d.mkdir()
    base = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2}
    (d / "config.json").write_text(json.dumps({**base, **cfg}))
    return d


def test_unsupported_architecture_names_the_supported_ones(tmp_path, capsys):
    d = _config_only(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    assert main(["compress", str(d), str(tmp_path / "o"), "--method", "pca", "--rank", "32"]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture ['GPT2LMHeadModel']" in err
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in err


def test_qwen3_svd_is_refused_with_the_reason(tmp_path, capsys):
    d = _config_only(tmp_path, architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    assert main(["compress", str(d), str(tmp_path / "o"), "--method", "svd", "--rank", "32"]) == 2
    assert "Qwen3's per-head k_norm" in capsys.readouterr().err


def test_scaled_rope_is_refused_for_rope_subspace_methods(tmp_path, capsys):
    d = _config_only(tmp_path, architectures=["LlamaForCausalLM"], model_type="llama",
                     rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    assert main(["compress", str(d), str(tmp_path / "o"), "--method", "pairs", "--rank", "32"]) == 2
    assert "RoPE type 'yarn'" in capsys.readouterr().err


def test_too_little_calibration_text(tiny_llama_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Emma Woodhouse, handsome, clever, and rich. " * 20)
    args = ["compress", str(tiny_llama_dir), str(tmp_path / "o"), "--method", "pca", "--rank", "32",
            "--calib", str(short), "--skip-chars", "0", "--calib-tokens", "2048", "--calib-ctx", "1024"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "calibration text" in err and "short.txt" in err and "too little text" in err and "need at least 2" in err


def test_missing_calibration_file(tiny_llama_dir, tmp_path, capsys):
    args = ["compress", str(tiny_llama_dir), str(tmp_path / "o"), "--method", "pca", "--rank", "32", "--calib", str(tmp_path / "nope.txt")]
    assert main(args) == 2
    assert "text file not found" in capsys.readouterr().err


def test_not_a_checkpoint(tmp_path, capsys):
    assert main(["compress", str(tmp_path), str(tmp_path / "o"), "--method", "pca", "--rank", "32"]) == 2
    assert "no config.json" in capsys.readouterr().err


SECTION = {"version": 1, "method": "pca", "form": "post_rope_projection", "ranks": [32, 48], "head_dim": 64}


def test_section_round_trip_and_dispatch():
    cfg = parse_thinkv_section(SECTION)
    assert isinstance(cfg, ThinKVConfig) and cfg.mean_rank == 40
    assert ThinKVConfig.from_dict(cfg.to_dict()) == cfg
    req = parse_thinkv_section({"method": "pca", "rank": 48})
    assert isinstance(req, CompressRequest) and req.calib == () and req.rank == 48
    assert CompressRequest.from_dict(req.to_dict()) == req


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 2}, "version 2 is not supported; this vllm-thinkv reads version 1"),
        ({"method": "lora"}, "unknown thinkv method 'lora'; supported: pairs, pca, svd"),
        ({"form": "rope_subspace"}, "method 'pca' cannot produce form 'rope_subspace'"),
        ({"ranks": [32, 72]}, r"rank of layer 1 72 is not supported: it must be a multiple of 8 from 8 to 64"),
        ({"ranks": [32, 12]}, "rank of layer 1 12 is not supported: it must be a multiple of 8"),
        ({"ranks": []}, "empty 'ranks'"),
        ({"head_dim": 63}, "head_dim must be a positive even integer"),
        ({"extra": 1}, r"unknown key\(s\) in the thinkv section: \['extra'\]"),
    ],
)
def test_bad_section(change, message):
    with pytest.raises(ValueError, match=message) as e:
        ThinKVConfig.from_dict({**SECTION, **change})
    assert type(e.value).__name__ == "ThinKVError"


@pytest.mark.parametrize(
    "request_dict, message",
    [
        ({"method": "pca", "rank": 32, "rank_budget": 32}, "exactly one of 'rank'"),
        ({"method": "pca"}, "exactly one of 'rank'"),
        ({"rank": 32}, "lacks 'method'"),
        ({"method": "pca", "rank": 32, "calib_tokens": 0}, "calib_tokens must be an integer > 1"),
        ({"method": "pca", "rnak": 32}, r"unknown key\(s\) in the thinkv request: \['rnak'\]"),
    ],
)
def test_bad_request(request_dict, message):
    with pytest.raises(ValueError, match=message):
        parse_thinkv_section(request_dict)


def test_form_for_architectures():
    assert form_for("pairs", "LlamaForCausalLM") == "rope_subspace"
    assert form_for("pairs", "Qwen3ForCausalLM") == "post_rope_projection"
    assert form_for("pca", "Qwen2ForCausalLM") == "post_rope_projection"
    with pytest.raises(ValueError, match="unsupported architecture 'PhiForCausalLM'"):
        form_for("pca", "PhiForCausalLM")


def test_tensor_parallel_sizes_for_thin_checkpoints():
    check_tensor_parallel(num_kv_heads=4, tp_size=2)
    check_tensor_parallel(num_kv_heads=4, tp_size=2, share_group=2)
    with pytest.raises(ThinKVError, match=r"tensor-parallel size \(4\) to divide the number of KV heads \(2\).*"
                                          r"supported: 1, 2"):
        check_tensor_parallel(num_kv_heads=2, tp_size=4)
    with pytest.raises(ThinKVError, match=r"shares one key latent among 4 KV heads, which tensor parallelism 2 splits"):
        check_tensor_parallel(num_kv_heads=4, tp_size=2, share_group=4)
    uniform, per_layer = CompressRequest(method="pca", rank=32), CompressRequest(method="pca", rank_budget=32)
    check_load_time_parallel(per_layer, 1)
    check_load_time_parallel(uniform, 4)
    with pytest.raises(ThinKVError, match="under tensor parallelism needs a uniform `rank`"):
        check_load_time_parallel(per_layer, 2)
    with pytest.raises(ThinKVError, match="does not support pipeline parallelism"):
        check_load_time_parallel(uniform, 1, 2)
