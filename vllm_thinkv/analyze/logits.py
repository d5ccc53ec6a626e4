"""The rank r at which each thin-key method reproduces the attention logits.

The methods are the package's own (`vllm_thinkv.compress`: pairs, pca, svd, joint;
joint with the share group `thinkv compress` would pick at each rank),
fitted per layer on the calibration split's statistics and run as the thin
model runs them (`hf.thin_attention.ThinKVAttention.thin_qk`, including the
thin r-dim RoPE of the rope_subspace form). Quality is the held-out relative
logit error, per KV head,

    err(r) = sum (q_t.k_s - q~_t.k~_s)^2 / sum (q_t.k_s)^2

over causal pairs s <= t of each held-out window (a sample of query positions
t, all their keys s) and the query heads of the KV head's group; q, k are the
model's post-RoPE queries and keys (the 1/sqrt(d) scale cancels).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vllm_thinkv.compress import METHODS as COMPRESS_METHODS
from vllm_thinkv.compress.base import ModelInfo
from vllm_thinkv.compress.calibrate import LayerStats as CalibrationStats
from vllm_thinkv.config import CompressRequest, form_for
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.capture import LayerAttention, attention_modules
from vllm_thinkv.hf.thin_attention import ThinKVAttention, shared_keys
from vllm_thinkv.hf.thin_model import load_thin_tensors

log = logging.getLogger(__name__)


@dataclass
class ThinQK:
    """One layer's thin attention at one rank: attention inputs -> (q~ [T, H, S·r], k~ [T, Hkv, S·r]), RoPE'd
    (S = 1 unless the key latent is shared: then k~ is each KV head's group latent)."""

    module: ThinKVAttention

    @torch.no_grad()
    def __call__(self, att: LayerAttention) -> tuple[torch.Tensor, torch.Tensor]:
        t = att.hidden.shape[0]
        positions = torch.arange(t, device=att.hidden.device)[None]  # capture runs windows from position 0
        q, k = self.module.thin_qk(att.hidden[None], positions, (att.cos[None], att.sin[None]))
        k = shared_keys(k, self.module.share_group)
        return q[0].transpose(0, 1), k[0].transpose(0, 1)


def fit_methods(
    model: nn.Module, calibration: list[CalibrationStats], ranks: Sequence[int]
) -> tuple[list[dict[str, dict[int, ThinQK]]], dict[str, str]]:
    """Fit every compress method on every layer at every rank.

    Returns per layer {method: {rank: thin map}}, and {method: reason} for the
    methods that do not apply to this model (e.g. svd on Qwen3).
    """
    info = ModelInfo.of(model)
    maps: list[dict[str, dict[int, ThinQK]]] = [{} for _ in calibration]
    skipped: dict[str, str] = {}
    for name, method_cls in COMPRESS_METHODS.items():
        try:
            form = form_for(name, info.architecture)
            if form == "rope_subspace":
                info.check_rope_subspace(model)
        except ThinKVError as e:
            skipped[name] = str(e)
            log.warning("method %s does not apply to this model: %s", name, e)
            continue
        shares = {r: CompressRequest(name, rank=r).share_group_for(info.num_kv_heads) for r in ranks}
        methods = {s: method_cls(share_group=s) if name == "joint" else method_cls() for s in set(shares.values())}
        for layer, (attn, stats) in enumerate(zip(attention_modules(model), calibration)):
            fits = {s: m.fit(stats, info, form) for s, m in methods.items()}
            maps[layer][name] = {}
            for r in ranks:
                thin = ThinKVAttention(attn, form, r, shares[r])
                load_thin_tensors(thin, fits[shares[r]].tensors(attn, r))
                maps[layer][name][r] = ThinQK(thin.eval())
    return maps, skipped


def _logits(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q [T, H, r], k [T, Hkv, r] -> logits of query positions `rows` against every key [Hkv, g, rows, T]."""
    t, h, r = q.shape
    hkv = k.shape[1]
    return torch.einsum("tngr,snr->ngts", q[rows].reshape(len(rows), hkv, h // hkv, r), k)


class LogitErrors:
    """Accumulates the held-out squared logit error of each method and rank, per KV head.

    Scores `queries` evenly spaced query positions per window (the last
    position included) against all their causal keys: an unbiased sample of
    the causal pairs at a fraction of the cost of all T^2.
    """

    def __init__(self, maps: dict[str, dict[int, ThinQK]], num_kv_heads: int, queries: int = 128):
        self.maps = maps
        self.queries = queries
        self.total = torch.zeros(num_kv_heads, dtype=torch.float64)
        self.sq_err = {m: {r: torch.zeros(num_kv_heads, dtype=torch.float64) for r in per} for m, per in maps.items()}

    @torch.no_grad()
    def add(self, att: LayerAttention) -> None:
        t = att.q.shape[0]
        stride = max(1, -(-t // self.queries))
        rows = torch.arange(t - 1, -1, -stride, device=att.q.device).flip(0)
        causal = torch.arange(t, device=att.q.device)[None, :] <= rows[:, None]  # [rows, T]
        ref = _logits(att.q_rope.float(), att.k_rope.float(), rows) * causal
        self.total += ref.pow(2).sum((1, 2, 3)).double().cpu()
        for method, per_rank in self.maps.items():
            for r, thin in per_rank.items():
                q, k = thin(att)
                diff = _logits(q.float(), k.float(), rows) * causal - ref
                self.sq_err[method][r] += diff.pow(2).sum((1, 2, 3)).double().cpu()

    def relative(self) -> dict[str, dict[int, list[float]]]:
        """method -> rank -> relative error per KV head."""
        return {m: {r: (e / self.total).tolist() for r, e in per.items()} for m, per in self.sq_err.items()}


def rank_at_error(errors_by_rank: dict[int, float], target: float) -> int | None:
    """Smallest tried rank whose error is <= target; None if none is."""
    ok = [r for r, e in sorted(errors_by_rank.items()) if e <= target]
    return ok[0] if ok else None
