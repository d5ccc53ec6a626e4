"""`thinkv compress` end to end on a tiny checkpoint: files, round trip through `hf.load`, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_thinkv.cli import main
from vllm_thinkv.compress import calibration_windows, compress_model
from vllm_thinkv.config import ThinKVConfig
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf import load
from vllm_thinkv.hf.thin_model import make_thin

FAST = ["--calib-tokens", "256", "--calib-ctx", "128", "--no-progress"]


def _ids(tok):
    return torch.tensor([tok("It is a truth universally acknowledged, that a single man in possession")["input_ids"]])


@pytest.fixture(scope="module")
def pca_ckpt(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "thin-pca"
    assert main(["compress", str(tiny_llama_dir), str(out), "--method", "pca", "--rank", "32", *FAST]) == 0
    return out


@pytest.mark.parametrize("method", ["pairs", "pca", "svd", "joint"])
def test_round_trip_matches_in_memory(tiny_llama_dir, tmp_path, method):
    out = tmp_path / f"thin-{method}"
    assert main(["compress", str(tiny_llama_dir), str(out), "--method", method, "--rank", "32", *FAST]) == 0
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["architectures"] == ["ThinKVLlamaForCausalLM"]
    section = ThinKVConfig.from_dict(cfg_json["thinkv"])
    assert section.ranks == (32,) * 4 and section.method == method and not section.finetuned
    assert section.calibration["tokens"] == 256
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "thinkv_compress.json"):
        assert (out / f).is_file(), f

    loaded = load(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    windows, _ = calibration_windows(tok, section_request(method))
    cfg, tensors = compress_model(original, section_request(method), windows, progress=False)
    in_memory = make_thin(original, cfg, tensors)
    ids = _ids(tok)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, in_memory(ids).logits)


def section_request(method):
    from vllm_thinkv.config import CompressRequest

    return CompressRequest(method, rank=32, calib_tokens=256, calib_ctx=128)


def test_load_uncompressed_is_plain_transformers(tiny_llama_dir):
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = _ids(AutoTokenizer.from_pretrained(tiny_llama_dir))
    with torch.no_grad():
        assert torch.equal(load(tiny_llama_dir)(ids).logits, ref(ids).logits)


def test_section_disagreeing_with_weights_is_refused(pca_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(pca_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["thinkv"]["ranks"][2] = 48
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ThinKVError, match=r"layer 2: model.layers.2.self_attn.q_basis has shape \(2, 64, 32\) .* implies \(2, 64, 48\)"):
        load(bad)
    assert main(["eval", "ppl", str(bad), "--max-tokens", "256", "--ctx", "128"]) == 2
    assert "layer 2" in capsys.readouterr().err


def test_existing_out_dir_is_refused_unless_overwrite(tiny_llama_dir, pca_ckpt, capsys):
    args = ["compress", str(tiny_llama_dir), str(pca_ckpt), "--method", "pca", "--rank", "16", *FAST]
    assert main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert json.loads((pca_ckpt / "config.json").read_text())["thinkv"]["ranks"] == [32] * 4  # untouched
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((pca_ckpt / "config.json").read_text())["thinkv"]["ranks"] == [16] * 4
    assert main(["compress", str(tiny_llama_dir), str(pca_ckpt), "--method", "pca", "--rank", "32", *FAST, "--overwrite"]) == 0


def test_compressing_a_thin_checkpoint_is_refused(pca_ckpt, tmp_path, capsys):
    assert main(["compress", str(pca_ckpt), str(tmp_path / "o"), "--method", "pca", "--rank", "16", *FAST]) == 2
    assert "already a thin-key checkpoint" in capsys.readouterr().err


def test_load_time_request_uses_the_packaged_text(tiny_llama_dir):
    """The zero-preparation path: a {"method", "rank"} request on an original folder, no files."""
    from vllm_thinkv.compress import compress_pretrained
    from vllm_thinkv.config import parse_thinkv_section

    request = parse_thinkv_section({"method": "pca", "rank": 16, "calib_tokens": 256, "calib_ctx": 128})
    cfg, tensors, model = compress_pretrained(tiny_llama_dir, request, progress=False)
    assert cfg.calibration["texts"] == ["vllm_thinkv/data/emma.txt (packaged)"] and cfg.calibration["tokens"] == 256
    assert cfg.calibration["source"] == str(tiny_llama_dir.resolve())
    assert cfg.calibration["ctx"] == 128 and cfg.fitted_positions == 128  # what start-up warns about
    assert set(tensors) == {f"model.layers.{i}.self_attn.{n}" for i in range(4) for n in ("q_basis", "k_basis")}
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"  # the original is left as it was


def test_calibration_window_defaults_to_the_serving_length():
    from vllm_thinkv.config import DEFAULT_CALIB_CTX, CompressRequest

    request = CompressRequest("joint", rank=16)
    assert request.calib_ctx is None
    assert request.for_serving(1024).calib_ctx == 1024  # vLLM's max_model_len at load time
    assert request.for_serving(131072).calib_ctx == DEFAULT_CALIB_CTX == 4096
    assert CompressRequest("pca", rank=16, calib_tokens=2048).for_serving(8192).calib_ctx == 2048
    assert CompressRequest("pca", rank=16, calib_ctx=512).for_serving(8192).calib_ctx == 512


def test_cli_calibrates_at_the_models_length_up_to_the_default(tiny_llama_dir, tmp_path):
    """max_position_embeddings 8192: 4096-token windows, recorded for the start-up warning."""
    out = tmp_path / "o"
    assert main(["compress", str(tiny_llama_dir), str(out), "--method", "pca", "--rank", "16",
                 "--calib-tokens", "8192", "--no-progress"]) == 0
    section = ThinKVConfig.from_dict(json.loads((out / "config.json").read_text())["thinkv"])
    assert section.calibration["ctx"] == 4096 and section.fitted_positions == 4096
