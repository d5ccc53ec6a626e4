"""`query_aware_factor` on singular and near-singular statistics (issue 19).

Gemma-3-270m's q/k norms zero whole rotary pairs of a layer's queries and keys,
so its post-RoPE second moments are exactly singular; the factor's balancing
then divided by ~0, the bases overflowed float32 and r = d gave NaN logits.
Each case draws float64 queries and keys, factors their second moments, and
checks that the bases are finite in float64 and after the cast to the model's
float32, and that at r = d the thin logits (Bᴴq)ᴴ(Aᴴk) equal qᴴk. The bases
written at r = d are the identity itself (`Factor.columns`).
"""

from __future__ import annotations

import pytest
import torch

from tests.compress.models import calib_windows, tiny_model
from vllm_thinkv.compress import compress_model
from vllm_thinkv.compress.calibrate import complex_pairs
from vllm_thinkv.compress.lowrank import query_aware_factor
from vllm_thinkv.config import CompressRequest

D, GROUP = 64, 4


def _samples(case: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [GROUP·T, D] and keys [T, D] (float64) whose second moments are singular or nearly so."""
    g = torch.Generator().manual_seed(seed)
    t = D // 2 if case == "fewer tokens than d" else 4096
    k = torch.randn(t, D, generator=g, dtype=torch.float64) * torch.logspace(0.5, -1.5, D, dtype=torch.float64)
    q = torch.randn(GROUP * t, D, generator=g, dtype=torch.float64) * torch.logspace(1, -1, D, dtype=torch.float64)
    pairs = torch.tensor([0, 3, 5, 9, 20])
    dims = torch.cat([pairs, pairs + D // 2])
    if case == "dead rotary pairs":  # what Gemma 3 does: the same pairs zero in q and k
        q[:, dims] = 0
        k[:, dims] = 0
    elif case == "dead key pairs":
        k[:, dims] = 0
    elif case == "near-singular keys":
        k[:, dims] *= 1e-9
    if case != "fewer tokens than d":  # RoPE-like mixing inside each pair keeps dead pairs dead
        angle = torch.rand(D // 2, generator=g, dtype=torch.float64) * 6.28
        cos, sin = angle.cos(), angle.sin()

        def rotate(x):
            a, b = x[:, : D // 2], x[:, D // 2 :]
            return torch.cat([a * cos - b * sin, a * sin + b * cos], 1)

        q, k = rotate(q), rotate(k)
    return q, k


CASES = ["dead rotary pairs", "dead key pairs", "near-singular keys", "fewer tokens than d"]


@pytest.mark.parametrize("case", CASES)
def test_full_rank_reproduces_logits_on_singular_statistics(case):
    q, k = _samples(case)
    cq, ck = q.T @ q / k.shape[0], k.T @ k / k.shape[0]
    f = query_aware_factor(cq, ck, GROUP)
    ref = q[:96] @ k[:128].T
    tol = {torch.float64: 1e-9, torch.float32: 1e-5}
    for dtype in (torch.float64, torch.float32):
        a, b = f.keys.to(dtype), f.queries.to(dtype)
        assert a.isfinite().all() and b.isfinite().all(), f"{case}: non-finite {dtype} basis"
        thin = ((q[:96].to(dtype) @ b) @ (k[:128].to(dtype) @ a).T).double()
        err = float((thin - ref).abs().max() / ref.abs().max())
        assert err < tol[dtype], f"{case}, {dtype}: r = d logits off by {err:.2e} (relative)"
    assert torch.isfinite(f.mu).all() and (f.mu >= 0).all() and (f.mu[:-1] >= f.mu[1:]).all()


@pytest.mark.parametrize("case", CASES)
def test_balanced_directions_stay_in_range(case):
    """Balancing keeps thin keys and queries O(1) relative to the inputs: no direction's
    scale explodes because its key (or query) second moment is ~0."""
    q, k = _samples(case)
    f = query_aware_factor(q.T @ q / k.shape[0], k.T @ k / k.shape[0], GROUP)
    kt, qt = k @ f.keys, q @ f.queries
    assert float(kt.abs().max()) < 1e3 * float(k.abs().max())
    assert float(qt.abs().max()) < 1e3 * float(q.abs().max())
    assert float(f.keys.abs().max()) < 1e6 and float(f.queries.abs().max()) < 1e6


def test_complex_full_rank_on_dead_pairs():
    """The Hermitian (rotary-pair) form `svd` uses: the same property in complex128."""
    q, k = _samples("dead rotary pairs", seed=1)
    m = D // 2
    zq, zk = torch.complex(q[:, :m], q[:, m:]), torch.complex(k[:, :m], k[:, m:])
    cq, ck = complex_pairs(q.T @ q / k.shape[0]), complex_pairs(k.T @ k / k.shape[0])
    assert torch.allclose(ck, zk.T @ zk.conj() / k.shape[0])  # E[z zᴴ], the statistic svd factors
    f = query_aware_factor(cq, ck, GROUP)
    ref = zq[:96].conj() @ zk[:128].T  # qᴴk
    for dtype, tol in ((torch.complex128, 1e-9), (torch.complex64, 1e-5)):
        a, b = f.keys.to(dtype), f.queries.to(dtype)
        assert a.isfinite().all() and b.isfinite().all()
        thin = ((zq[:96].to(dtype) @ b.conj()).conj() @ (zk[:128].to(dtype) @ a.conj()).T).to(torch.complex128)
        assert float((thin - ref).abs().max() / ref.abs().max()) < tol


def test_full_width_columns_are_the_identity():
    """r = d is the identity compression: `columns` gives B = A = I there (exact in any dtype),
    and the factor's most important directions below it."""
    q, k = _samples("dead rotary pairs")
    f = query_aware_factor(q.T @ q / k.shape[0], k.T @ k / k.shape[0], GROUP)
    eye = torch.eye(D, dtype=torch.float64)
    a, b = f.columns(D)
    assert torch.equal(a, eye) and torch.equal(b, eye)
    a, b = f.columns(D - 8)
    assert torch.equal(a, f.keys[:, : D - 8]) and torch.equal(b, f.queries[:, : D - 8])


@pytest.mark.parametrize(("method", "share"), [("pca", None), ("joint", 2)])
def test_full_rank_checkpoint_bases_are_the_identity(method, share):
    """pca and joint (a latent over both KV heads: S·d wide) write identity bases at r = d, so
    a full-rank layer of a mixed-rank checkpoint is the original layer in any dtype."""
    model = tiny_model("llama")
    request = CompressRequest(method, rank=64, **({"share_group": share} if share else {}))
    cfg, tensors = compress_model(model, request, calib_windows(model), progress=False)
    s = cfg.share_group
    for layer in range(2):
        qb = tensors[f"model.layers.{layer}.self_attn.q_basis"]  # [Hkv, d, S·d]
        kb = tensors[f"model.layers.{layer}.self_attn.k_basis"]  # [Hkv/S, S·d, S·d]
        assert s == (share or 1) and kb.shape == (2 // s, 64 * s, 64 * s)
        assert torch.equal(kb, torch.eye(64 * s).expand_as(kb))
        for h in range(2):
            want = torch.zeros(64, 64 * s)
            want[:, (h % s) * 64 : (h % s + 1) * 64] = torch.eye(64)
            assert torch.equal(qb[h], want)
