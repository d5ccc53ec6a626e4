"""Perplexity equals an independent exp(mean NLL) computation."""

from __future__ import annotations

import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_thinkv.cli import main
from vllm_thinkv.eval.ppl import perplexity
from vllm_thinkv.hf.text import packaged_text, token_windows


def _independent_ppl(model, windows):
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            nll -= sum(float(logp[t, w[t + 1]]) for t in range(len(w) - 1))
            n += len(w) - 1
    return math.exp(nll / n)


def test_ppl_matches_independent_computation(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    windows = token_windows(tok, packaged_text(), 64, max_tokens=192)
    res = perplexity(model, windows, progress=False)
    assert res.tokens == [63, 63, 63]
    assert abs(res.ppl - _independent_ppl(model, windows)) < 1e-6 * res.ppl


def test_eval_ppl_cli_writes_json(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", str(tiny_llama_dir), "--ctx", "64", "--max-tokens", "192", "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    windows = token_windows(AutoTokenizer.from_pretrained(tiny_llama_dir), packaged_text(), 64, max_tokens=192)
    assert abs(res["ppl"] - _independent_ppl(model, windows)) < 1e-6 * res["ppl"]
    assert res["windows"] == 3 and res["tokens"] == 189 and res["thinkv"] is None
    assert "| original |" in capsys.readouterr().out


def test_eval_ppl_too_little_text(tiny_llama_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    args = ["eval", "ppl", str(tiny_llama_dir), "--text", str(short), "--skip-chars", "0", "--ctx", "64", "--max-tokens", "128"]
    assert main(args) == 2
    assert "evaluation text" in capsys.readouterr().err


def test_eval_ppl_says_what_to_pass_and_what_it_skips(tiny_llama_dir, tmp_path, capsys):
    """A short user file: the error names the options that would work; a file that does
    fit is evaluated with a line saying its front matter was skipped."""
    text = tmp_path / "mine.txt"
    text.write_text(packaged_text()[:8000])
    assert main(["eval", "ppl", str(tiny_llama_dir), "--text", str(text), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Pass a smaller --max-tokens (it asks for 16 windows of --ctx 1024) or --ctx" in err
    assert "--skip-chars 0 (the first 5000 characters of each file are skipped)" in err
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", str(tiny_llama_dir), "--text", str(text), "--ctx", "64", "--max-tokens", "128",
                 "--out", str(out), "--no-progress"]) == 0
    assert "skipping the first 5000 characters of each file as front matter; --skip-chars 0 keeps them" in \
        capsys.readouterr().out


def test_windows_start_with_the_tokenizers_prefix(tmp_path):
    """A tokenizer that prepends <bos> (Gemma's, after `hf.gemma3.add_bos`) gets it at the start of every
    window, followed by consecutive text tokens; one that prepends nothing gets plain text windows."""
    from tests.tiny import build_tokenizer
    from vllm_thinkv.hf.gemma3 import add_bos

    tok = build_tokenizer(tmp_path)
    text_ids = tok(packaged_text(), add_special_tokens=False)["input_ids"]
    plain = token_windows(tok, packaged_text(), 64, max_tokens=192)
    assert plain.tolist() == torch.tensor(text_ids[:192]).view(3, 64).tolist()
    add_bos(tok)
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    windows = token_windows(tok, packaged_text(), 64, max_tokens=192)
    assert windows.shape == (3, 64) and (windows[:, 0] == tok.bos_token_id).all()
    assert windows[:, 1:].tolist() == torch.tensor(text_ids[:189]).view(3, 63).tolist()
