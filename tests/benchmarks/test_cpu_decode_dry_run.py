"""`benchmarks/cpu_decode.py --dry-run` end to end on the tiny Llama: two engines (stock, and thinkv with
SnapKV on the numba path) over 2 batch sizes x 2 contexts, and the op micro-benchmarks (decode, prefill chunks), whose
implementations must agree before their times mean anything. Times themselves are not checked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu-decode")
    cmd = [sys.executable, str(REPO / "benchmarks" / "cpu_decode.py"), "--model", str(tiny_llama_dir), "--dry-run",
           "--configs", "stock", "snapkv", "thin", "--dtype", "float32", "--threads", "1", "--out", str(out),
           "--name", "dry", "--raw", str(out / "raw")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "dry.json").read_text()), cmd


def test_a_cut_short_run_resumes_from_the_raw_outputs(dry_run):
    """--raw keeps each engine's output; a second run with the same settings reuses them (no engine
    starts: the op section is skipped here) and reports the same numbers and when each engine ran."""
    out, first, cmd = dry_run
    cmd = [*cmd[: cmd.index("--name")], "--name", "again", "--raw", str(out / "raw"), "--engines-only"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((out / "again.json").read_text())
    ran = [e for e in first["engines"] if e.get("status") == "ok"]
    assert ran and proc.stdout.count("reusing the engine run") == len(ran)
    assert [e.get("points") for e in again["engines"]] == [e.get("points") for e in first["engines"]]
    assert all(e["measured"]["start"] in (out / "again.md").read_text() for e in ran)


def test_files_and_tag(dry_run):
    out, result, _ = dry_run
    for suffix in (".json", ".md", ".png"):
        assert (out / f"dry{suffix}").stat().st_size > 0
    assert result["dry_run"] is True and "--dry-run" in result["tag"]["command"]
    md = (out / "dry.md").read_text()
    assert "| stock |" in md and "| snapkv |" in md and "meaningless" in md


def test_engines(dry_run):
    _, result, _ = dry_run
    engines = {e["name"]: e for e in result["engines"]}
    assert engines["thin"]["status"].startswith("not run: needs --thin-models")
    stock, snap = engines["stock"], engines["snapkv"]
    assert stock["status"] == snap["status"] == "ok"
    sizes = result["settings"]["sizes"]
    points = {(b, c) for b in sizes["batches"] for c in sizes["contexts"]}
    for e in (stock, snap):
        assert {(p["batch"], p["context"]) for p in e["points"]} == points
        for p in e["points"]:
            assert p["decode_steps"] >= 1 and p["decode_tokens_per_s"] > 0 and p["itl_ms"] > 0
    # SnapKV keeps budget + window prompt tokens: fewer bytes per step than stock at every point
    for p in snap["points"]:
        assert p["bytes_vs_stock"] > 1
    for p in stock["points"]:
        assert p["speed_vs_stock"] == pytest.approx(1.0) and p["bytes_vs_stock"] == pytest.approx(1.0)


def test_ops_agree(dry_run):
    _, result, _ = dry_run
    rows = result["kernels"]
    assert rows and all(k["torch_ms"] > 0 and k["numba_ms"] > 0 for k in rows)
    assert all(k["numba_torch_max_diff"] < 0.05 for k in rows)  # bf16 outputs of unit-scale data
    at_d = [k for k in rows if k["r"] == k["d"]]
    assert at_d and all(k["vllm_ms"] and k["numba_vllm_max_diff"] < 0.05 for k in at_d), at_d


def test_prefill_ops(dry_run):
    """The prefill-chunk section: every chunk length at r = d and the smallest rank, the two implementations
    agree, and the default routes by PREFILL_TOKENS (dry-run chunks lie on both sides of it only with a small
    constant, so only the rule is checked)."""
    from vllm_thinkv.kernels.cpu_numba import PREFILL_TOKENS

    _, result, _ = dry_run
    rows = result["prefill_ops"]
    sizes = result["settings"]["sizes"]
    assert {(k["r"], k["q_len"]) for k in rows} == {(r, q) for r in (rows[0]["d"], sizes["kernel_ranks"][-1])
                                                     for q in sizes["prefill_q_lens"]}
    assert all(k["torch_ms"] > 0 and k["numba_ms"] > 0 and k["default_ms"] > 0 for k in rows)
    assert all(k["numba_torch_max_diff"] < 0.05 for k in rows)
    assert all(k["default_route"] == ("torch" if k["q_len"] > PREFILL_TOKENS else "numba") for k in rows)
