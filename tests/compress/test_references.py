"""Thin models at r < d against independent references."""

from __future__ import annotations

import copy

import torch

from tests.compress.models import calib_windows, max_logit_diff, tiny_model
from tests.compress.reference import expand_groups, reference_model
from vllm_thinkv.compress import compress_model
from vllm_thinkv.compress.base import ModelInfo
from vllm_thinkv.compress.calibrate import collect_statistics
from vllm_thinkv.compress.pca import Pca
from vllm_thinkv.compress.svd import Svd
from vllm_thinkv.config import CompressRequest
from vllm_thinkv.hf.capture import capture
from vllm_thinkv.hf.thin_model import make_thin


def _thin(model, method_name, rank, windows, **kw):
    cfg, tensors = compress_model(model, CompressRequest(method_name, rank=rank), windows, progress=False, **kw)
    return cfg, tensors, make_thin(copy.deepcopy(model), cfg, tensors)


def _received(la):
    """Attention mass each key receives [T, Hkv], averaged over the group's heads, one head at a time."""
    t, h, d = la.q.shape
    hkv = la.k.shape[1]
    w = torch.zeros(t, hkv, dtype=torch.float64)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for head in range(h):
        s = (la.q_rope[:, head].double() @ la.k_rope[:, head // (h // hkv)].double().T) / d**0.5
        w[:, head // (h // hkv)] += s.masked_fill(~causal, float("-inf")).softmax(-1).sum(0) / (h // hkv)
    return w


def _pair_energies(model, windows):
    """Per layer: E|q_i|² summed over the group's heads times the attention-weighted E|k_i|²
    per KV head [Hkv, d/2], recomputed here from captured pre-RoPE q/k."""
    sums = {}

    def on_layer(la):
        m = la.q.shape[-1] // 2
        qe = (la.q[..., :m] ** 2 + la.q[..., m:] ** 2).double()  # [T, H, m]
        ke = (la.k[..., :m] ** 2 + la.k[..., m:] ** 2).double() * _received(la)[..., None]
        hkv = la.k.shape[1]
        qe = qe.view(qe.shape[0], hkv, -1, m).sum(2)
        s = sums.setdefault(la.layer, [0, 0, 0])
        s[0] = s[0] + qe.sum(0)
        s[1] = s[1] + ke.sum(0)
        s[2] += qe.shape[0]

    for w in windows:
        capture(model, w[None], on_layer)
    return {i: (q / n) * (k / n) for i, (q, k, n) in sums.items()}


def test_pairs_equals_masked_dims_reference():
    model = tiny_model("llama-g3")
    windows = calib_windows(model)
    rank = 24
    energies = _pair_energies(model, windows)
    masks = {}
    for layer, e in energies.items():
        kept = e.argsort(dim=1, descending=True)[:, : rank // 2]
        mask = torch.zeros(e.shape[0], 64)
        for g in range(e.shape[0]):
            mask[g, kept[g]] = 1
            mask[g, kept[g] + 32] = 1
        masks[layer] = mask[None, :, None, :]  # [1, Hkv, 1, d]

    def scores(layer, t):
        mk = masks[layer]
        q = t["q_rope"] * expand_groups(mk, t["q_rope"].shape[1])
        return q @ expand_groups(t["k_rope"] * mk, q.shape[1]).transpose(-1, -2)

    _, _, thin = _thin(model, "pairs", rank, windows)
    ids = calib_windows(model, n=1, ctx=80, seed=5)
    assert max_logit_diff(thin, reference_model(model, scores), ids) < 1e-4
    assert max_logit_diff(thin, model, ids) > 1e-2


def test_pca_equals_projected_attention_reference():
    model = tiny_model("qwen2")  # with q/k biases
    windows = calib_windows(model)
    cfg, tensors, thin = _thin(model, "pca", 16, windows)

    def scores(layer, t):
        qb = tensors[f"model.layers.{layer}.self_attn.q_basis"]  # [Hkv, d, r]
        kb = tensors[f"model.layers.{layer}.self_attn.k_basis"]
        heads = t["q_rope"].shape[1]
        q = torch.einsum("bhtd,bhdr->bhtr", t["q_rope"], expand_groups(qb[None], heads))
        k = torch.einsum("bgtd,gdr->bgtr", t["k_rope"], kb)
        return q @ expand_groups(k, heads).transpose(-1, -2)

    ids = calib_windows(model, n=1, ctx=80, seed=5)
    assert max_logit_diff(thin, reference_model(model, scores), ids) < 1e-4
    assert max_logit_diff(thin, model, ids) > 1e-2


def test_svd_equals_rotary_reference():
    """Thin weights + thin RoPE compute Σ_j Re(conj(q'_j e^{jω_j m}) k'_j e^{jω_j n}) with
    q'_j = b_x·q + j b_y·q and k'_j = a_x·k + j a_y·k on pre-RoPE q, k (the fit's thin pairs)."""
    model = tiny_model("llama")
    windows = calib_windows(model)
    method = Svd(max_phase=20.0, horizon=2048)  # a wide slow band and merged bands: thin pairs mix many dims
    rank = 24
    fits = [method.fit(s, ModelInfo.of(model), "rope_subspace") for s in collect_statistics(model, windows, progress=False)]
    _, _, thin = _thin(model, "svd", rank, windows, method=method)
    pairs = [[h.thin_pairs(rank) for h in fit.heads] for fit in fits]
    assert any((p.ax != 0).sum() > 2 for layer in pairs for head in layer for p in head), "no mixed directions"
    assert any(p.omega == 0.0 for layer in pairs for head in layer for p in head), "no position-free pairs"

    def scores(layer, t):
        def thin_side(x, key):  # x [B, n, T, d] -> complex [B, n, T, r/2]
            n = x.shape[1]
            out = []
            for h in range(n):
                tp = pairs[layer][h if key else h // (n // 2)]
                vx = torch.stack([p.ax if key else p.bx for p in tp], 1)  # [d, r/2]
                vy = torch.stack([p.ay if key else p.by for p in tp], 1)
                xh = x[:, h].double()
                out.append(torch.complex(xh @ vx, xh @ vy))
            return torch.stack(out, 1)

        omega = torch.tensor([[p.omega for p in head] for head in pairs[layer]], dtype=torch.float64)  # [Hkv, r/2]
        phase = torch.exp(1j * t["positions"].double()[None, :, None] * omega[:, None, :])  # [Hkv, T, r/2]
        kt = thin_side(t["k_pre"], key=True) * phase
        heads = t["q_pre"].shape[1]
        qt = thin_side(t["q_pre"], key=False) * expand_groups(phase[None], heads)[0]
        return (qt.conj() @ expand_groups(kt, heads).transpose(-1, -2)).real.float()

    ids = calib_windows(model, n=1, ctx=80, seed=5)
    assert max_logit_diff(thin, reference_model(model, scores), ids) < 1e-4
    assert max_logit_diff(thin, model, ids) > 1e-2


def test_complex_direction_to_real_rows():
    from vllm_thinkv.compress.svd import _complex_to_real

    g = torch.Generator().manual_seed(0)
    v = torch.complex(torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64))
    q = torch.randn(16, generator=g, dtype=torch.float64)
    z = (v.conj() * torch.complex(q[:8], q[8:])).sum()
    vx, vy = _complex_to_real(v)
    assert torch.allclose(torch.stack([vx @ q, vy @ q]), torch.stack([z.real, z.imag]))


def test_svd_with_single_pair_bands_equals_pairs():
    """No merging, no position-free band: svd keeps the same pairs as `pairs` (rescaled), exactly."""
    model = tiny_model("llama")
    windows = calib_windows(model)
    _, _, svd = _thin(model, "svd", 24, windows, method=Svd(max_phase=1e-9))
    _, _, pairs = _thin(model, "pairs", 24, windows)
    ids = calib_windows(model, n=1, ctx=80, seed=5)
    assert max_logit_diff(svd, pairs, ids) < 1e-4


def test_pca_predicted_error_matches_its_objective_and_beats_key_pca():
    """fit.error(r) = tr((I-M)ᵀ C_q (I-M) C_k) for M = q_basis k_basisᵀ (independently recomputed
    second moments, keys weighted by the attention they receive), and the query-aware basis has
    less logit error than plain key PCA."""
    model = tiny_model("llama")
    windows = calib_windows(model)
    rank = 16
    cq = torch.zeros(2, 64, 64, dtype=torch.float64)
    ck = torch.zeros(2, 64, 64, dtype=torch.float64)
    n = 0

    def on_layer(la):
        nonlocal n
        if la.layer != 0:
            return
        q = la.q_rope.double().view(la.q.shape[0], 2, -1, 64)
        k = la.k_rope.double()
        cq.add_(torch.einsum("tgai,tgaj->gij", q, q))
        ck.add_(torch.einsum("tg,tgi,tgj->gij", _received(la), k, k))
        n += la.q.shape[0]

    for w in windows:
        capture(model, w[None], on_layer)
    cq, ck = cq / n, ck / n
    _, tensors, _ = _thin(model, "pca", rank, windows)
    qb = tensors["model.layers.0.self_attn.q_basis"].double()
    kb = tensors["model.layers.0.self_attn.k_basis"].double()
    fit = Pca().fit(collect_statistics(model, windows, progress=False)[0], ModelInfo.of(model), "post_rope_projection")

    def err(m):
        e = torch.eye(64, dtype=torch.float64) - m
        return float(sum(torch.trace(e[g].T @ cq[g] @ e[g] @ ck[g]) for g in range(2)))

    qa = err(qb @ kb.transpose(1, 2))
    assert abs(qa - fit.error(rank)) < 1e-3 * qa
    u = torch.linalg.eigh(ck).eigenvectors[..., -rank:]  # key PCA: project both q and k on the top key directions
    assert qa < err(u @ u.transpose(1, 2))
