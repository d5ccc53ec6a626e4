"""benchmarks/snapkv_quality.py runs end to end in its --dry-run mode (one vLLM
engine with SnapKV, two passkey prompts), writes its result files, and resumes."""

import json
from datetime import date

def test_dry_run_writes_results_and_resumes(smollm2_dir, tmp_path, monkeypatch, load_benchmark):
    bench = load_benchmark("snapkv_quality")
    out = tmp_path / "snapkv-passkey"
    argv = ["--dry-run", "--model", str(smollm2_dir), "--out", str(out)]
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
