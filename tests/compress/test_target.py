"""Per-layer ranks for a quality target (`--target-ppl`, `--target-logit-error`): the fewest bytes that meet it."""

from __future__ import annotations

import copy

import pytest

from tests.compress.models import calib_windows, tiny_model
from vllm_thinkv.cli import main
from vllm_thinkv.compress import compress_model
from vllm_thinkv.compress.base import ModelInfo
from vllm_thinkv.compress.calibrate import collect_statistics
from vllm_thinkv.compress.pca import Pca
from vllm_thinkv.compress.ranks import allocate_ranks
from vllm_thinkv.compress.target import capacity_gain, ranks_for_logit_error, relative_error
from vllm_thinkv.config import CompressRequest
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.eval.ppl import perplexity
from vllm_thinkv.hf.thin_model import make_thin


def test_capacity_gain_counts_bytes_per_layer():
    assert capacity_gain([16, 16], 64) == pytest.approx(128 / 80)
    assert capacity_gain([8, 56], 64) == pytest.approx(256 / 192)
    assert capacity_gain([64], 64) == 1.0


@pytest.mark.parametrize("target", [0.3, 0.1, 0.02])
def test_logit_target_is_met_with_the_fewest_bytes(target):
    model = tiny_model("llama", num_layers=3)
    stats = collect_statistics(model, calib_windows(model), progress=False)
    fits = [Pca().fit(s, ModelInfo.of(model), "post_rope_projection") for s in stats]
    ranks = ranks_for_logit_error(fits, target, 64)
    assert relative_error(fits, ranks) <= target
    budget = sum(ranks) // len(ranks)
    if budget > 8:  # one step fewer bytes misses it
        assert relative_error(fits, allocate_ranks(fits, budget - 8, 64)) > target
    # the error is relative to the full logit energy: rank 0 leaves all of it, full rank none
    assert relative_error(fits, [0] * 3) == pytest.approx(1.0)
    assert relative_error(fits, [64] * 3) < 1e-9


def test_ppl_target_measures_held_out_text_and_takes_the_smallest_passing_mean_rank():
    model = tiny_model("llama", num_layers=3)
    windows = calib_windows(model, n=4, ctx=64)
    request = CompressRequest("pca", target_ppl_increase=0.02)
    cfg, tensors = compress_model(model, request, windows, progress=False)
    target = cfg.calibration["target"]
    assert target["heldout_windows"] == 1
    measured = {int(k): v for k, v in target["ppl_by_mean_rank"].items()}
    budget = sum(cfg.ranks) // len(cfg.ranks)
    limit = 1.02 * target["original_ppl"]
    assert measured[budget] <= limit
    assert all(v > limit for k, v in measured.items() if k < budget)  # every cheaper one measured failed
    assert budget - 8 in measured or budget == 8
    # independent re-measurement of the chosen model on the held-out window
    original = perplexity(model, windows[-1:], progress=False).ppl
    assert original == pytest.approx(target["original_ppl"], rel=1e-4)
    thin = make_thin(copy.deepcopy(model), cfg, tensors)
    assert perplexity(thin, windows[-1:], progress=False).ppl == pytest.approx(measured[budget], rel=1e-4)
    assert target["capacity_gain"] == pytest.approx(capacity_gain(cfg.ranks, 64), abs=1e-4)


def test_cli_prints_the_capacity_gain(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["compress", str(tiny_llama_dir), str(out), "--method", "joint", "--target-logit-error", "0.2",
                 "--calib-tokens", "512", "--calib-ctx", "128", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "the tokens of the original in the same memory" in printed


@pytest.mark.parametrize("kwargs, message", [
    ({"target_ppl_increase": 0.0}, "target_ppl_increase must be a number between 0 and 1"),
    ({"target_logit_error": 1.5}, "target_logit_error must be a number between 0 and 1"),
    ({"rank": 16, "target_ppl_increase": 0.05}, "give exactly one of 'rank'"),
])
def test_bad_targets(kwargs, message):
    with pytest.raises(ThinKVError, match=message):
        CompressRequest("pca", **kwargs)


def test_ppl_target_needs_held_out_windows():
    model = tiny_model("llama")
    with pytest.raises(ThinKVError, match="a PPL target needs at least 2 calibration windows"):
        compress_model(model, CompressRequest("pca", target_ppl_increase=0.05), calib_windows(model, n=1),
                       progress=False)
