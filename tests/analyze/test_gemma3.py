"""`thinkv analyze` on a tiny random Gemma 3 (q/k RMSNorm, two RoPE bases, a sliding and a global layer):
it runs end to end, records each layer's type, and skips svd with its reason (the q/k norm)."""

from __future__ import annotations

import json

from tests.tiny import build_tiny_gemma3
from vllm_thinkv.cli import main


def test_analyze_gemma3(tmp_path):
    model = build_tiny_gemma3(tmp_path / "gemma3", sliding_window=32)
    out = tmp_path / "analysis"
    assert main(["analyze", str(model), "--out", str(out), "--ctx", "64", "--max-tokens", "256"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    meta = result["model"]
    assert meta["model_type"] == "gemma3_text" and meta["head_dim"] == 64 and meta["sliding_window"] == 32
    assert meta["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    text = json.dumps(result)
    assert "per-head k_norm" in text  # svd does not apply, and the JSON says why
    assert (out / "summary.md").is_file()
