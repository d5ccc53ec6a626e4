"""Calibration statistics: one pass over the calibration windows feeds every method.

Per layer and KV head we keep second moments summed over tokens (and over the
query heads of the group, because all of them share the KV head's basis):

* pre-RoPE: ``cq_pre``/``ck_pre [Hkv, d, d]`` (independent of positions), and
  their complex "rotary pair" view (`complex_pairs`: pair i = dims (i, i + d/2)
  as ``x_i + j·x_{i+d/2}``, which RoPE multiplies by ``e^{j θ_i t}``).
* post-RoPE, real: ``cq_post``/``ck_post [Hkv, d, d]`` (what `pca` needs; these
  depend on the calibration positions, 0..ctx-1).
* post-RoPE keys of all KV heads stacked: ``ck_joint [Hkv·d, Hkv·d]`` (what
  `joint` needs: the cross-head covariance that per-head bases cannot use),
  weighted by the attention a token receives averaged over the KV heads.

Keys are weighted by the attention they receive (w_n = attention mass key n gets
from all queries of the group's heads, averaged over heads; mean 1 over keys).
The logit error of a key matters in proportion to the probability it gets: a
sink token that takes half of a head's attention must keep its logit, a key
nobody attends to need not. On SmolLM2 (pca, r = 32) this lowered PPL by 3.5%
against uniform weights; centring the keys instead made it 1.7% worse.
The probabilities are the original model's causal softmax with its own scale
(d**-0.5, or Gemma's query_pre_attn_scalar**-0.5); a sliding window, if any, is ignored.

Everything (the probabilities included) is computed in float64 so that r = d
stays exact (until issue 23 the probabilities were float32; the statistics
moved by that float32 round-off, ~1e-7 relative).

Cost (issue 23): the model's own fp32 forward pass plus, per layer, one causal
float64 score matrix, computed `ATTENTION_BLOCK` queries at a time against only
the keys they can see (in cache, the masked half skipped); the second moments
are batched matmuls. SmolLM2-135M, 16 × 1024 tokens, 2 idle CPU cores: 75 s
before, 48 s after; the statistics went from 2.6 to 0.7 s per window, the
forward pass (1.6 s) is now the larger part. The first window's time, times
the number of windows, is logged as an estimate.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vllm_thinkv.hf.capture import LayerAttention, attention_modules, capture

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """Second moments of one layer's queries and keys (sums; divide by `tokens` for means)."""

    cq_pre: torch.Tensor  # float64 [Hkv, d, d], summed over the group's query heads
    ck_pre: torch.Tensor  # float64 [Hkv, d, d], attention-weighted
    cq_post: torch.Tensor  # float64 [Hkv, d, d], summed over the group's query heads
    ck_post: torch.Tensor  # float64 [Hkv, d, d], attention-weighted
    tokens: int = 0
    ck_joint: torch.Tensor | None = None  # float64 [Hkv·d, Hkv·d], weighted by the KV heads' mean attention

    def means(self) -> LayerStats:
        n = max(self.tokens, 1)
        joint = None if self.ck_joint is None else self.ck_joint / n
        return LayerStats(self.cq_pre / n, self.ck_pre / n, self.cq_post / n, self.ck_post / n, self.tokens, joint)


def complex_pairs(c: torch.Tensor) -> torch.Tensor:
    """Real second moments [..., d, d] -> complex E[z zᴴ] [..., d/2, d/2] of z_i = x_i + j·x_{i+d/2}."""
    m = c.shape[-1] // 2
    xx, xy, yx, yy = c[..., :m, :m], c[..., :m, m:], c[..., m:, :m], c[..., m:, m:]
    return torch.complex(xx + yy, yx - xy)


ATTENTION_BLOCK = 32  # queries per block in `received_attention` (fastest of 16..128 on CPU at ctx 1024)


def _kv_major(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """x [T, H, n] -> float64 [Hkv, T, g, n] (g = H / Hkv; head h belongs to KV head h // g), in one copy."""
    t, h, n = x.shape
    return x.reshape(t, hkv, h // hkv, n).transpose(0, 1).to(torch.float64, memory_format=torch.contiguous_format)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x [Hkv, T, g, n] -> sum over tokens and the group's heads of x xᴴ: [Hkv, n, n]."""
    x = x.flatten(1, 2)
    return torch.bmm(x.transpose(1, 2), x.conj())


def _weighted_gram(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [Hkv, T, 1, n], weights w [Hkv, T] -> sum_t w x xᵀ: [Hkv, n, n]."""
    x = x.flatten(1, 2)
    return torch.bmm((x * w[..., None]).transpose(1, 2), x)


def _received_attention(q: torch.Tensor, k: torch.Tensor, block: int, scaling: float | None = None) -> torch.Tensor:
    """q [Hkv, T, g, d], k [Hkv, T, 1, d] (float64, `_kv_major`) -> attention mass per key [Hkv, T],
    summed over the group's query heads: `block` queries at a time against the keys they
    can see, so only the diagonal block is masked and the work stays in cache."""
    hkv, t, g, d = q.shape
    k = k.flatten(1, 2) * (d**-0.5 if scaling is None else scaling)  # [Hkv, T, d]
    masked = torch.ones(block, block, dtype=torch.bool, device=q.device).triu(1)[:, None, :]  # key after query
    mass = torch.zeros(hkv, t, dtype=q.dtype, device=q.device)
    for i0 in range(0, t, block):
        i1 = min(i0 + block, t)
        b = i1 - i0
        scores = torch.bmm(q[:, i0:i1].flatten(1, 2), k[:, :i1].transpose(1, 2))  # [Hkv, b·g, i1]
        scores.view(hkv, b, g, i1)[..., i0:].masked_fill_(masked[:b, :, :b], float("-inf"))
        mass[:, :i1] += scores.softmax(-1).sum(1)
    return mass


def received_attention(q_rope: torch.Tensor, k_rope: torch.Tensor, block: int = ATTENTION_BLOCK) -> torch.Tensor:
    """Attention mass each key receives [T, Hkv] (float64), averaged over the group's query
    heads (causal softmax in float64, scale d**-0.5): sums to T over keys, so its mean is 1."""
    hkv = k_rope.shape[1]
    g = q_rope.shape[1] // hkv
    return (_received_attention(_kv_major(q_rope, hkv), _kv_major(k_rope, hkv), block) / g).T


class _Accumulator:
    def __init__(self, num_layers: int):
        self.stats: list[LayerStats | None] = [None] * num_layers

    def __call__(self, la: LayerAttention) -> None:
        hkv = la.k.shape[1]
        g = la.q.shape[1] // hkv
        # RoPE in the model's dtype (what it attends with), then float64
        q_rope, k_rope = _kv_major(la.q_rope, hkv), _kv_major(la.k_rope, hkv)
        w = _received_attention(q_rope, k_rope, ATTENTION_BLOCK, la.scaling) / g  # [Hkv, T], mean 1
        stacked = k_rope.transpose(0, 1).flatten(1)  # [T, Hkv·d]: token t's keys of all KV heads
        update = LayerStats(
            cq_pre=_gram(_kv_major(la.q, hkv)),
            ck_pre=_weighted_gram(_kv_major(la.k, hkv), w),
            cq_post=_gram(q_rope),
            ck_post=_weighted_gram(k_rope, w),
            tokens=la.q.shape[0],
            ck_joint=(stacked * w.mean(0)[:, None]).T @ stacked,
        )
        cur = self.stats[la.layer]
        if cur is None:
            self.stats[la.layer] = update
        else:
            for f in ("cq_pre", "ck_pre", "cq_post", "ck_post", "ck_joint"):
                getattr(cur, f).add_(getattr(update, f))
            cur.tokens += update.tokens


def _estimate(first: float, n_windows: int, ctx: int) -> str:
    return (
        f"calibrating on {n_windows * ctx} tokens in {n_windows} windows of {ctx}: about {first * n_windows:.0f} s "
        f"on this machine (first window {first:.1f} s)"
    )


@torch.no_grad()
def collect_statistics(model: torch.nn.Module, windows: torch.Tensor, progress: bool = True) -> list[LayerStats]:
    """Run `model` over `windows` [N, ctx] and return per-layer mean statistics.
    Logs an estimate of the whole pass after the first window (its time x N)."""
    num_layers = len(attention_modules(model))
    acc = _Accumulator(num_layers)
    device = next(model.parameters()).device
    n, ctx = windows.shape
    with logging_redirect_tqdm(loggers=[logging.getLogger()]) if progress else contextlib.nullcontext():
        for i, row in enumerate(tqdm(windows, desc="calibrating", unit="window", disable=not progress)):
            t0 = time.perf_counter()
            # stop after the last attention input: the rest (last MLP, lm_head) is not needed
            capture(model, row[None].to(device), acc, stop_after=num_layers - 1)
            if i == 0 and n > 1:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                log.info(_estimate(time.perf_counter() - t0, n, ctx))
    log.info("calibrated on %d windows x %d tokens", n, ctx)
    return [s.means() for s in acc.stats]
