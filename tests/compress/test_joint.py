"""`joint` (a key latent shared by a group of KV heads) against independent references,
its optimality, and its settings' validation."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.compress.models import calib_windows, max_logit_diff, tiny_model
from tests.compress.reference import expand_groups, reference_model
from vllm_thinkv.cli import main
from vllm_thinkv.compress import compress_model
from vllm_thinkv.config import CompressRequest, ThinKVConfig
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.capture import capture
from vllm_thinkv.hf.thin_model import make_thin


def _thin(model, method, rank, windows, **request):
    cfg, tensors = compress_model(model, CompressRequest(method, rank=rank, **request), windows, progress=False)
    return cfg, tensors, make_thin(copy.deepcopy(model), cfg, tensors)


def test_joint_equals_the_shared_latent_reference():
    """Scores q̃_hᵀ z with z = k_basisᵀ[k_1; k_2] (both KV heads stacked) and q̃_h = q_basis[h // g]ᵀ q_h,
    recomputed from the original projections and RoPE (GQA group of 3)."""
    model = tiny_model("llama-g3")
    cfg, tensors, thin = _thin(model, "joint", 16, calib_windows(model))
    assert cfg.share_group == 2 and cfg.form == "shared_projection"

    def scores(layer, t):
        qb = tensors[f"model.layers.{layer}.self_attn.q_basis"].double()  # [Hkv, d, 2r]
        kb = tensors[f"model.layers.{layer}.self_attn.k_basis"].double()  # [1, 2d, 2r]
        q, k = t["q_rope"].double(), t["k_rope"].double()  # [B, H, T, d], [B, Hkv, T, d]
        stacked = torch.cat([k[:, 0], k[:, 1]], dim=-1)  # [B, T, 2d]
        z = stacked @ kb[0]  # [B, T, 2r]
        qt = torch.einsum("bhtd,hdr->bhtr", q, expand_groups(qb[None], q.shape[1])[0])
        return (qt @ z[:, None].transpose(-1, -2)).float()

    ids = calib_windows(model, n=1, ctx=80, seed=5)
    assert max_logit_diff(thin, reference_model(model, scores), ids) < 1e-4
    assert max_logit_diff(thin, model, ids) > 1e-2


def _received_mean(la):
    """Attention mass each key receives [T], averaged over all query heads (one head at a time)."""
    t, h, d = la.q.shape
    hkv = la.k.shape[1]
    w = torch.zeros(t, dtype=torch.float64)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for head in range(h):
        s = (la.q_rope[:, head].double() @ la.k_rope[:, head // (h // hkv)].double().T) / d**0.5
        w += s.masked_fill(~causal, float("-inf")).softmax(-1).sum(0) / h
    return w


def test_joint_predicted_error_matches_its_objective_and_beats_per_head_pca():
    """fit.error(r) = Σ_g tr(C_q,g (E_g − B_g Wᵀ) C_k (E_g − B_g Wᵀ)ᵀ) with independently recomputed
    statistics; and joint, the optimum of that objective, has less of it than per-head pca's
    bases at the same cache bytes (a feasible block-diagonal W)."""
    model = tiny_model("llama")  # 8 heads, 2 KV heads, d = 64
    windows = calib_windows(model)
    d, rank = 64, 16
    cq = torch.zeros(2, d, d, dtype=torch.float64)
    ck = torch.zeros(2 * d, 2 * d, dtype=torch.float64)
    n = 0

    def on_layer(la):
        nonlocal n
        if la.layer != 0:
            return
        q = la.q_rope.double().view(la.q.shape[0], 2, -1, d)
        k = la.k_rope.double().flatten(1)  # [T, 2d]
        cq.add_(torch.einsum("tgai,tgaj->gij", q, q))
        ck.add_(torch.einsum("t,ti,tj->ij", _received_mean(la), k, k))
        n += la.q.shape[0]

    for w in windows:
        capture(model, w[None], on_layer)
    cq, ck = cq / n, ck / n

    def objective(b: list[torch.Tensor], w: torch.Tensor) -> float:
        """b[g] [d, R] query maps, w [2d, R] key map."""
        total = 0.0
        for g in range(2):
            e = torch.zeros(d, 2 * d, dtype=torch.float64)
            e[:, g * d:(g + 1) * d] = torch.eye(d, dtype=torch.float64)
            m = e - b[g] @ w.T
            total += float(torch.trace(cq[g] @ m @ ck @ m.T))
        return total

    _, tensors, _ = _thin(model, "joint", rank, windows)
    qb = tensors["model.layers.0.self_attn.q_basis"].double()  # [2, d, 2r]
    kb = tensors["model.layers.0.self_attn.k_basis"].double()[0]  # [2d, 2r]
    from vllm_thinkv.compress.base import ModelInfo
    from vllm_thinkv.compress.calibrate import collect_statistics
    from vllm_thinkv.compress.joint import Joint

    fit = Joint(share_group=2).fit(collect_statistics(model, windows, progress=False)[0], ModelInfo.of(model),
                                   "shared_projection")
    joint = objective([qb[0], qb[1]], kb)
    assert abs(joint - fit.error(rank)) < 1e-3 * joint

    _, pca, _ = _thin(model, "pca", rank, windows)
    pq = pca["model.layers.0.self_attn.q_basis"].double()  # [2, d, r]
    pk = pca["model.layers.0.self_attn.k_basis"].double()
    w = torch.block_diag(pk[0], pk[1])  # [2d, 2r]
    b = [torch.cat([pq[0], torch.zeros_like(pq[0])], 1), torch.cat([torch.zeros_like(pq[1]), pq[1]], 1)]
    assert joint < objective(b, w)


def test_linearly_related_heads_share_one_latent_exactly():
    """Two KV heads with identical keys: one latent of d dims (r = d/2 per head slot) holds both
    exactly; per-head pca at the same bytes cannot."""
    model = copy.deepcopy(tiny_model("llama"))
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.k_proj.weight
            w[64:] = w[:64]
    windows = calib_windows(model)
    ids = calib_windows(model, n=1, ctx=80, seed=5)
    _, _, joint = _thin(model, "joint", 32, windows)
    _, _, pca = _thin(model, "pca", 32, windows)
    assert max_logit_diff(model, joint, ids) < 1e-3
    assert max_logit_diff(model, pca, ids) > 1e-2


def test_share_group_of_one_is_per_head_with_a_cross_head_free_basis():
    """share_group 1 keeps one latent per KV head: k_basis has one block per head."""
    model = tiny_model("llama")
    cfg, tensors, _ = _thin(model, "joint", 24, calib_windows(model), share_group=1)
    assert cfg.share_group == 1
    assert tensors["model.layers.0.self_attn.k_basis"].shape == (2, 64, 24)
    assert tensors["model.layers.0.self_attn.q_basis"].shape == (2, 64, 24)


@pytest.mark.parametrize("kv_heads, rank, share", [(8, 32, 8), (8, 48, 4), (8, 128, 2), (3, 64, 3), (6, 64, 3),
                                                   (2, 256, 1)])
def test_default_share_group_is_the_widest_that_fits_the_kernels(kv_heads, rank, share):
    assert CompressRequest("joint", rank=rank).share_group_for(kv_heads) == share
    assert CompressRequest("pca", rank=rank).share_group_for(kv_heads) == 1


@pytest.mark.parametrize("make, message", [
    (lambda: ThinKVConfig("joint", "shared_projection", (128,), 128, share_group=4),
     r"share_group 4 x rank 128 = 512 is wider than the thinkv kernels' 256-dim query/key limit: use a share "
     r"group of at most 2 KV heads"),
    (lambda: ThinKVConfig("pca", "post_rope_projection", (32,), 64, share_group=2),
     r"share_group 2 needs a shared-key method \(joint\); method 'pca' keeps one key basis per KV head"),
    (lambda: ThinKVConfig("joint", "post_rope_projection", (32,), 64), r"method 'joint' cannot produce form"),
    (lambda: ThinKVConfig("joint", "shared_projection", (32,), 64, share_group=0), r"share_group must be a positive"),
    (lambda: CompressRequest("pca", rank=32, share_group=2), r"share_group 2 needs a shared-key method"),
    (lambda: CompressRequest("joint", rank=32, share_group=3).share_group_for(8),
     r"share_group 3 does not divide the model's 8 KV heads; supported: 1, 2, 4, 8"),
])
def test_bad_share_settings_are_refused(make, message):
    with pytest.raises(ThinKVError, match=message):
        make()


def test_section_round_trip_keeps_the_share_group():
    cfg = ThinKVConfig("joint", "shared_projection", (16, 24), 64, share_group=3)
    assert cfg.to_dict()["share_group"] == 3
    assert ThinKVConfig.from_dict(cfg.to_dict()) == cfg
    assert "share_group" not in ThinKVConfig("pca", "post_rope_projection", (16,), 64).to_dict()


def test_cli_refuses_a_share_group_that_does_not_divide_the_kv_heads(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["compress", str(tiny_llama_dir), str(out), "--method", "joint", "--rank", "16", "--share-group", "3",
            "--calib-tokens", "256", "--calib-ctx", "128", "--no-progress"]
    assert main(argv) == 2
    assert "share_group 3 does not divide the model's 2 KV heads; supported: 1, 2" in capsys.readouterr().err
    assert not out.exists()
