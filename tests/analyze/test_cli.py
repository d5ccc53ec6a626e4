"""`thinkv analyze` end to end: outputs, and a one-line error (exit 2) on bad input."""

from __future__ import annotations

import pytest
import torch

from vllm_thinkv.cli import main

PLOTS = {
    "overview.png", "spectra_activations.png", "spectra_weights.png", "effective_rank.png", "r2_vs_k.png",
    "adjacent_similarity.png", "logit_rank.png",
}


def test_writes_json_summary_and_plots(analysis_dir, analysis):
    names = {p.name for p in analysis_dir.iterdir()}
    assert names == {"analysis.json", "summary.md"} | PLOTS
    for name in PLOTS:
        assert (analysis_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (analysis_dir / "summary.md").read_text()
    assert analysis["meta"]["command"] in summary
    assert "Inter-head linear predictability" in summary
    assert analysis["meta"]["command"].startswith("thinkv analyze ")
    assert analysis["meta"]["versions"]["torch"] == torch.__version__
    assert analysis["text"]["windows_fit"] + analysis["text"]["windows_heldout"] == analysis["text"]["windows"]


def _fails(capsys, argv, *needles):
    assert main(["analyze", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("thinkv analyze: error: ") and "\n" not in err
    for needle in needles:
        assert needle in err, err


def test_unsupported_model_type(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    _fails(capsys, [str(tmp_path), "--out", str(tmp_path / "o")], "model type 'gpt2' is not supported",
           "llama, mistral, qwen2, qwen3")


def test_not_a_model(tmp_path, capsys):
    _fails(capsys, [str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "cannot read a model config")


def test_empty_text(constructed_llama, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(capsys, [str(constructed_llama), "--text", str(empty), "--out", str(tmp_path / "o"), "--ctx", "64",
                    "--max-tokens", "256"], "empty.txt", "too little text: 0 tokens")


def test_too_short_text(constructed_llama, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged. " * 5)
    _fails(capsys, [str(constructed_llama), "--text", str(short), "--skip-chars", "0", "--out", str(tmp_path / "o"),
                    "--ctx", "64", "--max-tokens", "256"], "short.txt", "too little text", "lower --max-tokens")


def test_missing_text_file(constructed_llama, tmp_path, capsys):
    _fails(capsys, [str(constructed_llama), "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")],
           "not found")


def test_fewer_than_two_windows(constructed_llama, tmp_path, capsys):
    _fails(capsys, [str(constructed_llama), "--out", str(tmp_path / "o"), "--ctx", "64", "--max-tokens", "100"],
           "at least 2")


def test_cuda_without_cuda(constructed_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(capsys, [str(constructed_llama), "--out", str(tmp_path / "o"), "--device", "cuda"], "CUDA is not available")


def test_out_is_a_file(constructed_llama, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _fails(capsys, [str(constructed_llama), "--out", str(f)], "not a folder")


@pytest.mark.parametrize(
    "flag, value", [("--ctx", "1"), ("--max-refs", "0"), ("--skip-chars", "-1"), ("--logit-errors", "5")]
)
def test_bad_settings(constructed_llama, tmp_path, capsys, flag, value):
    _fails(capsys, [str(constructed_llama), "--out", str(tmp_path / "o"), flag, value], flag)
