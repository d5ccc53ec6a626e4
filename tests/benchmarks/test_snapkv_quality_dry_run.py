"""benchmarks/snapkv_quality.py runs end to end in its --dry-run mode (one vLLM
engine with SnapKV, two passkey prompts), writes its result files, and resumes. On the tiny
Llama (random weights: the answers are text, not the passkey; what is checked is the run,
not the accuracy), 4 layers instead of SmolLM2's 30."""

import json
from datetime import date

def test_dry_run_writes_results_and_resumes(tiny_llama_dir, tmp_path, monkeypatch, load_benchmark):
    bench = load_benchmark("snapkv_quality")
    out = tmp_path / "snapkv-passkey"
    argv = ["--dry-run", "--model", str(tiny_llama_dir), "--out", str(out)]
    assert bench.main(argv) == 0

    result = json.loads(out.with_suffix(".json").read_text())
    assert result["dry_run"] is True
    assert {"date", "device", "vllm", "dtype", "command"} <= set(result)
    assert result["dtype"] == "float32" and result["vllm"]
    [(key, config)] = result["configurations"].items()
    assert key == "snapkv-64"
    assert config["config"]["snapkv"] == {"budget": 64, "window": 16, "kernel_size": 7, "pooling": "max",
                                          "policy": "snapkv"}
    assert config["accuracy"]["overall"]["trials"] == 2
    assert set(config["accuracy"]["by_setting"]) == {"256@0.1", "256@0.9"}
    cases = result["cases"]
    assert [c["depth"] for c in cases] == [0.1, 0.9]
    assert all(len(c["key"]) == 5 and abs(c["prompt_tokens"] - 256) <= 4 for c in cases)
    assert len(result["answers"][key]) == 2 and all(isinstance(a, str) and a for a in result["answers"][key])

    run = json.loads((tmp_path / "snapkv-passkey-runs" / f"{key}.json").read_text())
    assert run["attention_backend"] and run["timing"]["generate_s"] >= 0
    assert all(r["served_prompt_tokens"] == r["prompt_tokens"] for r in run["results"])
    md = out.with_suffix(".md").read_text()
    assert result["date"] == run["date"] == date.today().isoformat()  # stamped when run, not written into the script
    assert "| configuration | 256 @ 0.1 | 256 @ 0.9 |" in md and "| snapkv-64 |" in md and result["date"] in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run finds the result and starts no engine.
    stamp = (tmp_path / "snapkv-passkey-runs" / f"{key}.json").stat().st_mtime_ns
    monkeypatch.setattr(bench, "run_engine", lambda *a, **k: (_ for _ in ()).throw(AssertionError("engine started")))
    assert bench.main(argv) == 0
    assert (tmp_path / "snapkv-passkey-runs" / f"{key}.json").stat().st_mtime_ns == stamp


def test_hf_dry_run_runs_every_policy_under_both_protocols(tiny_llama_dir, tmp_path, monkeypatch, load_benchmark):
    """--hf: full and every policy in the HF reference, question-aware and question-agnostic."""
    bench = load_benchmark("snapkv_quality")
    out = tmp_path / "snapkv-passkey"
    argv = ["--dry-run", "--hf", "--sinks", "2", "--model", str(tiny_llama_dir), "--out", str(out)]
    assert bench.main(argv) == 0

    result = json.loads((tmp_path / "snapkv-passkey-hf.json").read_text())
    keys = ["full", "snapkv-sinks2-64", "recent-sinks2-64", "value_aware-sinks2-64", "keydiff-sinks2-64"]
    assert result["configurations"] == keys and result["protocols"] == ["aware", "agnostic"]
    assert result["date"] == date.today().isoformat() and result["command"].endswith(" ".join(argv))
    assert len(result["cases"]) == 2
    for case in result["cases"]:
        assert set(case["answers"]) == {f"{p}/{k}" for p in ("aware", "agnostic") for k in keys}
        assert all(isinstance(a["answer"], str) and isinstance(a["correct"], bool) for a in case["answers"].values())
        # the agnostic protocol compacts the document only: the question's ~30 tokens come after
        assert case["aware_compacted_tokens"] == case["prompt_tokens"]
        assert 15 < case["prompt_tokens"] - case["agnostic_compacted_tokens"] < 60
    md = (tmp_path / "snapkv-passkey-hf.md").read_text()
    assert "| configuration | aware 256 | aware all | aware Δ vs full |" in md and "| keydiff-sinks2-64 |" in md

    # A second run finds every case done and generates nothing.
    import vllm_thinkv.hf.snapkv as ref

    monkeypatch.setattr(ref, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("generated")))
    assert bench.main(argv) == 0


def test_question_split(smollm2_dir, load_benchmark):
    """The document part holds none of the question; the tail holds all of it."""
    from transformers import AutoTokenizer

    from vllm_thinkv.eval.passkey import QUESTION, build_case

    bench = load_benchmark("snapkv_quality")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("word " * 2000, add_special_tokens=False)["input_ids"]
    case = build_case(tok, ids, 300, 0.5, seed=3)
    k = bench.split_question(tok, case.prompt_ids)
    assert QUESTION.strip() in tok.decode(case.prompt_ids[k:])
    assert "What is" not in tok.decode(case.prompt_ids[:k]) and case.key in tok.decode(case.prompt_ids[:k])
