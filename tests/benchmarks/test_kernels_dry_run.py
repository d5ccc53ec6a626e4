"""benchmarks/kernels.py runs end to end in its --dry-run mode, so the GPU benchmark cannot rot."""

import json

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """As in tests/kernels: with more threads the float64 reference's tiny ops spin-wait on a small shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_torch_thread")
def test_benchmark_dry_run_writes_results(tmp_path, capsys, load_benchmark):
    module = load_benchmark("kernels")

    assert module.main(["--dry-run", "--out", str(tmp_path)]) == 0
    [json_path] = tmp_path.glob("kernels-*-dry-run.json")
    result = json.loads(json_path.read_text())
    assert result["dry_run"] is True
    assert {"date", "torch", "triton", "device"} <= set(result["environment"])
    assert result["correctness"] and all(c["ok"] for c in result["correctness"])
    # capture (a replay on a GPU) on one batch, then another: equal to eager, padding untouched
    assert sum(c["case"].startswith("graph replay") and c["padding_untouched"] for c in result["correctness"]) == 4
    assert result["roof"]["gb_per_s"] > 0
    ranks = {row["r"] for row in result["decode"]}
    assert ranks == set(module.GPU_DRY.ranks) and all(row["us"] > 0 for row in result["decode"])
    assert all(row["speedup_vs_r_eq_d"] for row in result["decode"])
    assert result["prefill"] and result["split_sweep"]
    assert {row["key_share"] for row in result["shared_keys"]} == {1} | {s for _, s in module.GPU_DRY.shared}
    if not torch.cuda.is_available():  # the CPU serving path is timed on CPU machines
        assert [row["case"] for row in result["torch_path"]] == ["prefill", "decode"]
    md = json_path.with_name(json_path.name.replace(".json", ".md")).read_text()
    assert "| batch | context | r |" in md and result["environment"]["date"] in md
    png = json_path.with_name(json_path.name.replace(".json", ".png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
