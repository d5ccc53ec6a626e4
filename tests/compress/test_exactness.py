"""r = d reproduces the untouched transformers model for every method and architecture;
r < d is lossy (which shows the comparison is sensitive)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.compress.models import ARCHS, QK_NORM_ARCHS, calib_windows, max_logit_diff, tiny_model
from vllm_thinkv.compress import compress_model
from vllm_thinkv.compress.svd import Svd
from vllm_thinkv.config import CompressRequest
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.thin_model import make_thin


def _thin(model, method_name, rank, **kw):
    cfg, tensors = compress_model(model, CompressRequest(method_name, rank=rank), calib_windows(model), progress=False, **kw)
    return cfg, make_thin(copy.deepcopy(model), cfg, tensors)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["pairs", "pca", "svd", "joint"])
def test_full_rank_reproduces_the_model(arch, method):
    model = tiny_model(arch)
    ids = calib_windows(model, n=1, ctx=96, seed=7)
    if arch in QK_NORM_ARCHS and method == "svd":
        with pytest.raises(ThinKVError, match="per-head k_norm"):
            _thin(model, method, 64)
        return
    cfg, full = _thin(model, method, 64)
    assert cfg.ranks == (64, 64)
    assert max_logit_diff(model, full, ids) < 1e-4
    _, lossy = _thin(model, method, 16)
    assert max_logit_diff(model, lossy, ids) > 1e-2


def test_svd_full_rank_is_exact_with_merged_frequency_bands():
    """With wide bands (many pairs mixed), full rank still keeps every band whole and exact."""
    model = tiny_model("llama")
    ids = calib_windows(model, n=1, ctx=96, seed=7)
    _, full = _thin(model, "svd", 64, method=Svd(max_phase=1e9))
    assert max_logit_diff(model, full, ids) < 1e-4


@pytest.mark.parametrize("arch", QK_NORM_ARCHS)
def test_qk_norm_pairs_uses_a_selection_basis_after_rope(arch):
    model = tiny_model(arch)
    cfg, tensors = compress_model(model, CompressRequest("pairs", rank=32), calib_windows(model), progress=False)
    assert cfg.form == "post_rope_projection"
    basis = tensors["model.layers.0.self_attn.k_basis"]
    assert basis.shape == (2, 64, 32)
    assert set(basis.unique().tolist()) == {0.0, 1.0} and torch.all(basis.sum(1) == 1)
    assert torch.equal(basis, tensors["model.layers.0.self_attn.q_basis"])


@pytest.mark.parametrize("method", ["pairs", "pca", "joint"])
def test_cached_generation_equals_full_recompute(method):
    """The thin KV cache path (k [.., r], v [.., d]) gives the same greedy tokens as recomputing."""
    model = tiny_model("llama")
    _, thin = _thin(model, method, 24)
    ids = calib_windows(model, n=1, ctx=20, seed=9)
    with torch.no_grad():
        gen = thin.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        seq = ids
        for _ in range(6):
            nxt = thin(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)
