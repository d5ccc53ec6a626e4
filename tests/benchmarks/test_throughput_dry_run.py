"""`benchmarks/throughput.py --dry-run` end to end on the tiny Llama (two engine
starts: stock and thinkv + SnapKV), checked against what the scheduler must do
in a cache sized for three full-length stock requests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--model", str(tiny_llama_dir), "--dry-run",
           "--configs", "stock", "snapkv", "thin", "--out", str(out), "--name", "dry"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "dry.json").read_text())


def test_files_and_tags(dry_run):
    out, result = dry_run
    for suffix in (".json", ".md", ".png"):
        assert (out / f"dry{suffix}").stat().st_size > 0
    tag = result["tag"]
    assert tag["vllm_version"] and tag["date"] and tag["device"] and "--dry-run" in tag["command"]
    md = (out / "dry.md").read_text()
    assert "| stock |" in md and "| snapkv |" in md and "measured on a CPU" in md


def test_configurations(dry_run):
    _, result = dry_run
    configs = {c["name"]: c for c in result["configs"]}
    assert configs["thin"]["status"].startswith("not run: needs --thin-model")
    stock, snap = configs["stock"], configs["snapkv"]
    assert stock["status"] == snap["status"] == "ok"
    assert stock["kv_cache_spec"] == "FullAttentionSpec" and snap["kv_cache_spec"] == "SnapKVSpec"
    w = result["settings"]["workload"]
    lengths = result["settings"]["prompt_lengths"]
    block = result["settings"]["engine"]["block_size"]
    for c in (stock, snap):
        s = c["summary"]
        assert s["output_tokens"] == w["num_requests"] * w["output_tokens"]  # every request finished
        # same bytes and the same page size: the same cache; the capacity model agrees with the engine
        assert s["kv_cache_tokens"] == stock["summary"]["kv_cache_tokens"]
        assert c["predicted"]["kv_cache_tokens"] == pytest.approx(s["kv_cache_tokens"], rel=0.01)
        assert s["ttft_s"]["mean"] > 0 and s["itl_ms"]["mean"] > 0
    # memory-bound: all requests at full length do not fit, and a running stock request holds at
    # least its prompt's blocks, so no more run at once than the shortest prompts' blocks allow
    blocks = stock["summary"]["num_gpu_blocks"] - 1
    assert sum(-(-(n + w["output_tokens"]) // block) for n in lengths) > blocks
    shortest = sorted(-(-n // block) for n in lengths)
    fit = max(k for k in range(len(shortest) + 1) if sum(shortest[:k]) <= blocks)
    assert stock["summary"]["peak_running"] <= fit
    # compacted prompts give blocks back: more requests run at once
    assert snap["summary"]["peak_running"] > stock["summary"]["peak_running"]
    assert snap["agreement"]["requests"] == result["settings"]["agreement_requests"]
    assert 0 <= snap["agreement"]["prefix_fraction"] <= 1
