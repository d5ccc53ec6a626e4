"""The fast statistics pass (issue 23) against the slow algorithm it replaced.

`_slow_statistics` is the previous `calibrate.py` kept verbatim (full [g·T, T]
score matrix per KV head, einsum moments), with the dtype of the attention
probabilities as a parameter: float32 is exactly what the old code did, float64
the exact quantity the docstring promises. The fast code must equal the float64
version to float64 round-off, in the statistics and in every fitted basis and
written tensor; its only difference from the old float32 probabilities is their
float32 round-off.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from tests.compress.models import calib_windows, tiny_model
from vllm_thinkv.compress import compress_model
from vllm_thinkv.compress.base import ModelInfo
from vllm_thinkv.compress.calibrate import LayerStats, collect_statistics, received_attention
from vllm_thinkv.compress.pca import Pca
from vllm_thinkv.config import CompressRequest
from vllm_thinkv.hf.capture import LayerAttention, attention_modules, capture

FIELDS = ("cq_pre", "ck_pre", "cq_post", "ck_post")


# --- the slow reference: the previous calibrate.py, probabilities' dtype as a parameter ---


def _slow_received_attention(q_rope, k_rope, prob_dtype):
    t, h, d = q_rope.shape
    hkv = k_rope.shape[1]
    q = q_rope.to(prob_dtype).transpose(0, 1).reshape(hkv, h // hkv * t, d)  # [Hkv, g·T, d]
    k = k_rope.to(prob_dtype).transpose(0, 1)  # [Hkv, T, d]
    scores = (q @ k.transpose(1, 2)) * d**-0.5  # [Hkv, g·T, T]
    causal = torch.ones(t, t, dtype=torch.bool).tril().repeat(h // hkv, 1)
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return (probs.sum(1) / (h // hkv)).T.double()  # [T, Hkv]


def _slow_second_moment(x, hkv):
    t, h, n = x.shape
    x = x.reshape(t, hkv, h // hkv, n)
    return torch.einsum("tgai,tgaj->gij", x, x.conj())


def _slow_weighted_second_moment(x, w):
    return torch.einsum("tg,tgi,tgj->gij", w, x, x)


@torch.no_grad()
def _slow_statistics(model, windows, prob_dtype=torch.float64) -> list[LayerStats]:
    num_layers = len(attention_modules(model))
    stats: list[LayerStats | None] = [None] * num_layers

    def on_layer(la: LayerAttention):
        hkv = la.k.shape[1]
        q_rope, k_rope = la.q_rope, la.k_rope
        w = _slow_received_attention(q_rope, k_rope, prob_dtype)
        update = LayerStats(
            cq_pre=_slow_second_moment(la.q.double(), hkv),
            ck_pre=_slow_weighted_second_moment(la.k.double(), w),
            cq_post=_slow_second_moment(q_rope.double(), hkv),
            ck_post=_slow_weighted_second_moment(k_rope.double(), w),
            tokens=la.q.shape[0],
        )
        cur = stats[la.layer]
        if cur is None:
            stats[la.layer] = update
        else:
            for f in FIELDS:
                getattr(cur, f).add_(getattr(update, f))
            cur.tokens += update.tokens

    for row in windows:
        capture(model, row[None], on_layer, stop_after=num_layers - 1)
    return [s.means() for s in stats]


# --- helpers ---


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300))


def _worst(fast: list[LayerStats], slow: list[LayerStats]) -> float:
    assert [s.tokens for s in fast] == [s.tokens for s in slow]
    return max(_rel(getattr(f, name), getattr(s, name)) for f, s in zip(fast, slow) for name in FIELDS)


# --- tests ---


@pytest.mark.parametrize("t", [1, 5, 31, 32, 33, 100])
@pytest.mark.parametrize("block", [1, 7, 32, 128])
def test_received_attention_blocks_match_the_full_matrix(t, block):
    """Any block size, windows shorter than a block or not a multiple of it (GQA group 3)."""
    g = torch.Generator().manual_seed(t * 1000 + block)
    q = torch.randn(t, 6, 16, generator=g) * 4  # sharp attention
    k = torch.randn(t, 2, 16, generator=g) * 4
    fast = received_attention(q, k, block=block)
    slow = _slow_received_attention(q, k, torch.float64)
    assert fast.dtype == torch.float64 and fast.shape == (t, 2)
    assert _rel(fast, slow) < 1e-13
    assert torch.allclose(fast.sum(0), torch.full((2,), float(t), dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "llama-g3", "qwen2", "qwen3"])
def test_statistics_match_the_slow_algorithm(arch):
    """Float64 round-off from the slow algorithm with float64 probabilities; the old float32
    probabilities differ only by their own round-off (ctx 50: a partial last block)."""
    model = tiny_model(arch)
    windows = calib_windows(model, n=3, ctx=50)
    fast = collect_statistics(model, windows, progress=False)
    assert _worst(fast, _slow_statistics(model, windows, torch.float64)) < 1e-12
    old = _worst(fast, _slow_statistics(model, windows, torch.float32))
    assert 1e-12 < old < 1e-5  # the old code's float32 probabilities: all that changed


@pytest.mark.parametrize("method,rank", [("pca", 16), ("pca", 64), ("svd", 24), ("pairs", 32)])
def test_written_tensors_match_the_slow_algorithm(method, rank):
    """Every fitted basis / written tensor, on a float64 copy of the model (so nothing is
    rounded to float32 on the way): equal to float64 round-off."""
    model = copy.deepcopy(tiny_model("llama-g3")).double()
    windows = calib_windows(model, n=2, ctx=64)
    request = CompressRequest(method, rank=rank)
    fast = collect_statistics(model, windows, progress=False)
    slow = _slow_statistics(model, windows, torch.float64)
    _, t_fast = compress_model(model, request, stats=fast, progress=False)
    _, t_slow = compress_model(model, request, stats=slow, progress=False)
    assert t_fast.keys() == t_slow.keys() and t_fast
    for name in t_fast:
        assert t_fast[name].dtype == (torch.float32 if name.endswith("rope_inv_freq") else torch.float64)
        assert _rel(t_fast[name], t_slow[name]) < 1e-10, name


def test_pca_bases_match_on_a_float32_model():
    """The usual fp32 model: the float64 factors match to round-off; the float32 tensors
    written from them differ by at most one float32 rounding."""
    model = tiny_model("qwen2")
    windows = calib_windows(model, n=2, ctx=64)
    info = ModelInfo.of(model)
    fast = collect_statistics(model, windows, progress=False)
    slow = _slow_statistics(model, windows, torch.float64)
    for layer, (sf, ss) in enumerate(zip(fast, slow)):
        ff, fs = Pca().fit(sf, info, "post_rope_projection"), Pca().fit(ss, info, "post_rope_projection")
        for a, b in zip(ff.factors, fs.factors):
            assert _rel(a.keys, b.keys) < 1e-10 and _rel(a.queries, b.queries) < 1e-10 and _rel(a.mu, b.mu) < 1e-10
        attn = attention_modules(model)[layer]
        for name, x in ff.tensors(attn, 32).items():
            y = fs.tensors(attn, 32)[name]
            assert ((x - y).abs() <= torch.finfo(torch.float32).eps * y.abs()).all(), name


def test_estimate_is_logged_after_the_first_window(caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="vllm_thinkv.compress.calibrate"):
        collect_statistics(model, calib_windows(model, n=3, ctx=40), progress=False)
    msgs = [r.getMessage() for r in caplog.records]
    estimate = [m for m in msgs if m.startswith("calibrating on 120 tokens in 3 windows of 40: about ")]
    assert len(estimate) == 1 and " s on this machine (first window " in estimate[0]
