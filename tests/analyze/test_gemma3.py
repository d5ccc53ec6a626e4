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
    by_type = result["headline"]["effective_rank_by_layer_type"]  # means over each type's layers
    assert set(by_type) == {"sliding_attention", "full_attention"}
    ranks = result["activations"]["k_rope"]["effective_rank"]["0.9"]
    for t, layers in (("sliding_attention", [0, 2]), ("full_attention", [1, 3])):
        heads = [h for i in layers for h in ranks[i]]
        assert abs(by_type[t]["k_rope"]["0.9"] - sum(heads) / len(heads)) < 1e-3  # JSON keeps 6 digits
    assert "## Effective rank by layer type" in (out / "summary.md").read_text()
