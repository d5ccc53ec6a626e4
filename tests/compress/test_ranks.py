"""Per-layer rank allocation under a mean-rank budget."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from tests.compress.models import calib_windows, tiny_model
from vllm_thinkv.compress import compress_model
from vllm_thinkv.compress.base import LayerFit
from vllm_thinkv.compress.ranks import allocate_ranks
from vllm_thinkv.config import CompressRequest
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.thin_model import make_thin


class _Curve(LayerFit):
    def __init__(self, eigen):  # sorted descending "eigenvalues", one per 8 dims
        self.eigen = eigen

    def error(self, rank):
        return float(sum(self.eigen[rank // 8 :]))

    def tensors(self, attn, rank):
        raise NotImplementedError


def test_greedy_equals_exhaustive_optimum():
    g = torch.Generator().manual_seed(0)
    fits = [_Curve(sorted((torch.rand(8, generator=g) * s).tolist(), reverse=True)) for s in (1, 5, 20, 2)]
    for budget in (16, 32, 48):
        ranks = allocate_ranks(fits, budget, head_dim=64)
        assert sum(ranks) == budget * 4 and all(r % 8 == 0 and 8 <= r <= 64 for r in ranks)
        best = min(
            (sum(f.error(r) for f, r in zip(fits, combo)), combo)
            for combo in itertools.product(range(8, 65, 8), repeat=4)
            if sum(combo) == budget * 4
        )
        assert abs(sum(f.error(r) for f, r in zip(fits, ranks)) - best[0]) < 1e-9


@pytest.mark.parametrize("budget", [4, 12, 72])
def test_bad_budget(budget):
    with pytest.raises(ThinKVError, match="rank budget"):
        allocate_ranks([_Curve([1.0] * 8)], budget, head_dim=64)


def test_compress_with_budget():
    model = copy.deepcopy(tiny_model("llama", num_layers=4))
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(4)  # 16x the logit energy: it needs more rank
    cfg, tensors = compress_model(model, CompressRequest("pca", rank_budget=24), calib_windows(model), progress=False)
    assert cfg.mean_rank == 24 and cfg.ranks[1] == max(cfg.ranks) > 24
    assert cfg.calibration["rank_budget"] == 24
    thin = make_thin(copy.deepcopy(model), cfg, tensors)
    assert [layer.self_attn.rank for layer in thin.model.layers] == list(cfg.ranks)
