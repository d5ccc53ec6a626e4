"""benchmarks/quality.py runs end to end on a tiny model, writes its three files, and resumes
(fine-tuned q/k tensors are cached and reused by the passkey run)."""

from __future__ import annotations

import json

import pytest

from vllm_thinkv.hf.text import packaged_text

def test_sweep_writes_results_and_resumes(tiny_llama_dir, tmp_path, load_benchmark):
    bench = load_benchmark("quality")
    text = tmp_path / "text.txt"
    text.write_text(packaged_text()[:80000])
    out = tmp_path / "q"
    argv = ["--model", str(tiny_llama_dir), "--calib", str(text), "--eval", str(text), "--eval-skip-chars", "40000",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--ctx", "64", "--eval-windows", "2",
            "--calib-tokens", "128", "--methods", "pca", "svd", "--ranks", "16", "64", "--load-ranks", "16",
            "--budget-ranks", "16", "--ft-methods", "pca", "--ft-ranks", "16", "--ft-steps", "2", "--ft-windows", "2",
            "--ft-ctx", "32", "--passkey", "original", "pca:16:ft", "--passkey-ctx", "200", "--passkey-trials", "1",
            "--passkey-depths", "0.1", "0.9", "--quarters", "original", "pca:16@128", "--quarters-ctx", "160",
            "--quarters-windows", "1", "--quarter-len", "64"]
    assert bench.main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    res = data["results"]
    assert set(res) == {"pca:16", "svd:16", "pca:64", "svd:64", "pca:16:load", "svd:16:load", "pca:16:budget",
                        "svd:16:budget", "pca:16:ft"}
    assert res["pca:64"]["exact_check_max_logit_diff"] < 1e-3 and res["pca:64"]["ppl"] == data["original"]["ppl"]
    ft = res["pca:16:ft"]["finetune"]
    assert ft["objective"] == "local" and len(ft["curve"]) == 2 and ft["windows"] == [2, 32]
    passkey = data["passkey"]  # keyed "SPEC ctx=N" (bare SPEC for the historical 2048)
    assert len(passkey["pca:16:ft ctx=200"]["trials"]) == 2 and set(passkey["original ctx=200"]["by_depth"]) == {"0.1", "0.9"}
    quarters = data["quarters"]  # PPL per 64 positions of a 160-token window; @128: calibrated on 128-token windows
    assert set(quarters) == {"original ctx=160", "pca:16@128 ctx=160"}
    assert all(len(q["ppl"]) == 3 and all(x > 1 for x in q["ppl"]) for q in quarters.values())
    assert data["text"]["calib@128"]["ctx"] == 128
    assert all(v["date"] and v["command"] for v in res.values())
    md = out.with_suffix(".md").read_text()
    assert "| pca + QK fine-tune |" in md and "not run" not in md.split("## Passkey")[0].split("| pca + QK")[0]
    assert out.with_suffix(".png").stat().st_size > 0

    # resume: nothing is recomputed; the fine-tuned model comes from the cache
    before = out.with_suffix(".json").read_text()
    assert bench.main(argv) == 0
    after = json.loads(out.with_suffix(".json").read_text())
    assert after["results"] == json.loads(before)["results"] and after["passkey"] == json.loads(before)["passkey"]
    assert after["quarters"] == json.loads(before)["quarters"]
    assert len(list((tmp_path / "cache").glob("ft-*.pt"))) == 1

    # --only runs exactly the keys given, even outside the sweep's lists (svd was not in --ft-methods)
    assert bench.main(argv + ["--only", "svd:16:ft"]) == 0
    after = json.loads(out.with_suffix(".json").read_text())
    assert set(after["results"]) == set(res) | {"svd:16:ft"} and after["results"]["svd:16:ft"]["finetune"]


def test_sweep_rejects_bad_keys_before_running(load_benchmark, capsys):
    bench = load_benchmark("quality")
    for bad in (["--only", "pca:32:typo"], ["--only", "qr:32"], ["--only", "passkey:pca"], ["--passkey", "pca:x"],
                ["--only", "pca:32@x"], ["--quarters", "pca:32@1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--calib", "a.txt", "--eval", "b.txt", *bad])
        assert "bad key" in capsys.readouterr().err


def test_sweep_runs_gemma3_and_refuses_what_does_not_apply(tmp_path, load_benchmark, capsys):
    """The sweep on a tiny random Gemma 3 (what `--model gemma3-270m` runs on the real one): the methods
    that apply give results (r = d exact); svd (q/k norms) is refused before any work; passkey on a base
    model (no chat template) runs completion-style prompts."""
    from tests.tiny import build_tiny_gemma3

    bench = load_benchmark("quality")
    model = build_tiny_gemma3(tmp_path / "gemma3", sliding_window=32)
    (model / "chat_template.jinja").unlink(missing_ok=True)  # a base model, as Gemma-3-270m
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    text = tmp_path / "text.txt"
    text.write_text(packaged_text()[:60000])
    out = tmp_path / "q"
    argv = ["--model", str(model), "--calib", str(text), "--eval", str(text), "--eval-skip-chars", "40000",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--ctx", "64", "--eval-windows", "2",
            "--calib-tokens", "128", "--ranks", "16", "64", "--load-ranks", "--budget-ranks", "--ft-ranks",
            "--ft-windows", "2", "--ft-ctx", "32"]
    assert bench.main(argv + ["--methods", "pca", "svd", "--passkey"]) == 2
    assert "per-head k_norm" in capsys.readouterr().err
    assert not out.with_suffix(".json").exists()
    assert bench.main(argv + ["--methods", "pca", "pairs", "joint", "--passkey", "original", "--passkey-ctx", "200",
                              "--passkey-trials", "1", "--passkey-depths", "0.5"]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["model"] == "gemma3"
    assert set(data["results"]) == {f"{m}:{r}" for m in ("pca", "pairs", "joint") for r in (16, 64)}
    for m in ("pca", "pairs", "joint"):
        assert data["results"][f"{m}:64"]["exact_check_max_logit_diff"] < 1e-3
        assert data["results"][f"{m}:16"]["ppl"] != data["original"]["ppl"]
    passkey = data["passkey"]["original ctx=200"]
    assert passkey["style"] == "completion" and len(passkey["trials"]) == 1
    # one layer type compressed, the other exact (r = d): which layers cost quality
    assert bench.main(argv + ["--methods", "pca", "--passkey", "--only", "pca:16:sliding", "pca:16:global"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())["results"]
    assert res["pca:16:sliding"]["ranks"] == [16, 64, 16, 64] and res["pca:16:global"]["ranks"] == [64, 16, 64, 16]
    assert len({res[k]["ppl"] for k in ("pca:16", "pca:16:sliding", "pca:16:global")}) == 3
    assert "| pca sliding layers only |" in out.with_suffix(".md").read_text()
