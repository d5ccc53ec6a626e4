"""One analysis: load the model, two passes over the text, every number in one dict.

Pass 1 (calibration windows) accumulates statistics and, at its end, fits the
thin-key methods. Pass 2 (held-out windows) accumulates the same statistics
and scores the fitted methods on logits they have not seen. The result dict is
what `analysis.json` holds; the summary and plots are drawn from it alone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from vllm_thinkv.analyze.config import KINDS, KV_KINDS, SUPPORTED_MODEL_TYPES, WEIGHTS, AnalyzeConfig
from vllm_thinkv.analyze.logits import LogitErrors, fit_methods, rank_at_error
from vllm_thinkv.analyze.predict import greedy_predictability
from vllm_thinkv.analyze.spectra import (
    centred_singular_values,
    energy_ranks,
    gram_singular_values,
    weight_singular_values,
)
from vllm_thinkv.analyze.stats import LayerStats, kind_tensors
from vllm_thinkv.compress.calibrate import LayerStats as CalibrationStats
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.capture import attention_modules, capture
from vllm_thinkv.hf.windows import windows_from_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def heads(self, kind: str) -> int:
        return self.num_heads if kind.startswith("q") else self.num_kv_heads


def check_model(path: str):
    """Read the model's config and reject what `capture` does not understand, before loading weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ThinKVError(f"cannot read a model config from {path!r}: {str(e).splitlines()[0]}") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ThinKVError(
            f"model type {model_type!r} is not supported: thinkv analyze understands Llama-family and Gemma 3 attention "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return config


def _check_settings(cfg: AnalyzeConfig, max_positions: int | None) -> None:
    if cfg.skip_chars < 0 or cfg.max_refs < 1:
        raise ThinKVError(f"--skip-chars must be >= 0 and --max-refs >= 1 (got {cfg.skip_chars}, {cfg.max_refs})")
    if not cfg.logit_errors or not all(0.0 < e < 1.0 for e in cfg.logit_errors):
        raise ThinKVError(f"--logit-errors must be fractions in (0, 1), e.g. 0.05 for 5%; got {list(cfg.logit_errors)}")
    if cfg.ctx < 2:
        raise ThinKVError(f"--ctx must be at least 2 tokens (adjacent-token statistics), got {cfg.ctx}")
    if max_positions and cfg.ctx > max_positions:
        raise ThinKVError(f"--ctx {cfg.ctx} exceeds the model's max_position_embeddings ({max_positions})")
    if not 0.0 < cfg.fit_fraction < 1.0:
        raise ThinKVError(f"fit fraction must be in (0, 1), got {cfg.fit_fraction}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ThinKVError("--device cuda was requested but CUDA is not available here; use --device cpu")
    if cfg.device.split(":")[0] not in ("cpu", "cuda"):
        raise ThinKVError(f"--device {cfg.device!r} is not supported: use cpu or cuda")


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ThinKVError(f"cannot load a tokenizer from {path!r}: {str(e).splitlines()[0]}") from None


def _shape(model, config) -> AttentionShape:
    attn = attention_modules(model)
    heads = config.num_attention_heads
    return AttentionShape(
        num_layers=len(attn),
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=attn[0].head_dim,
    )


def _calibration(stats: LayerStats, shape: AttentionShape) -> CalibrationStats:
    """The compress methods' statistics (per-token second moments, queries summed over
    each group) from the fit split's Gram blocks: no second calibration pass."""

    def moments(kind: str, heads: range) -> torch.Tensor:
        return sum(stats.head_moments(kind, h, "fit")[0] for h in heads)

    n = stats.head_moments("k_pre", 0, "fit")[2]
    g = shape.group
    kv = range(shape.num_kv_heads)
    return CalibrationStats(
        cq_pre=torch.stack([moments("q_pre", range(h * g, (h + 1) * g)) for h in kv]).cpu() / n,
        ck_pre=torch.stack([moments("k_pre", range(h, h + 1)) for h in kv]).cpu() / n,
        cq_post=torch.stack([moments("q_rope", range(h * g, (h + 1) * g)) for h in kv]).cpu() / n,
        ck_post=torch.stack([moments("k_rope", range(h, h + 1)) for h in kv]).cpu() / n,
        tokens=int(n),
        ck_joint=stats.full_gram("k_rope", "fit")[:-1, :-1].cpu() / n,  # all KV heads' keys stacked
    )


def _nan_to_none(x):
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    return x


def _windows(tokenizer, files: list[str], cfg: AnalyzeConfig) -> tuple[torch.Tensor, dict]:
    """`max_tokens` of text in `ctx` windows spread evenly over the files (the way
    `thinkv compress` and `thinkv eval` read text), at least two: one to fit, one to score."""
    n = cfg.max_tokens // cfg.ctx
    if n < 2:
        raise ThinKVError(
            f"--max-tokens {cfg.max_tokens} makes {n} window(s) of --ctx {cfg.ctx}; analyze needs at least 2 "
            "(one to fit, one held out)"
        )
    try:
        return windows_from_files(tokenizer, files, cfg.ctx, n, cfg.skip_chars, what="text")
    except ThinKVError as e:
        raise ThinKVError(f"{e}; give more text, or lower --max-tokens or --ctx") from None


def analyze(model_path: str, files: list[str], cfg: AnalyzeConfig) -> dict:
    """Run every measurement of `thinkv analyze` on `files` (none: the packaged text)
    and return them as a JSON-able dict."""
    t_start = time.perf_counter()
    config = check_model(model_path)
    _check_settings(cfg, getattr(config, "max_position_embeddings", None))
    windows, provenance = _windows(_tokenizer(model_path), files, cfg)
    n_fit = min(max(1, round(len(windows) * cfg.fit_fraction)), len(windows) - 1)
    log.info("%d windows of %d tokens: %d to fit, %d held out", len(windows), cfg.ctx, n_fit, len(windows) - n_fit)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.dtype)).to(cfg.device).eval()
    shape = _shape(model, config)
    if shape.num_heads % shape.num_kv_heads:
        raise ThinKVError(f"{shape.num_heads} query heads do not divide into {shape.num_kv_heads} KV heads")
    features = min(cfg.max_refs, shape.num_heads - 1) * shape.head_dim + 1
    if n_fit * cfg.ctx < 10 * features:
        log.warning(
            "only %d fit tokens for up to %d regression inputs: inter-head R^2 will be noisy; give more text",
            n_fit * cfg.ctx,
            features,
        )
    timings = {"load": time.perf_counter() - t_start}

    stats = [LayerStats(cfg.offsets) for _ in range(shape.num_layers)]
    t0 = time.perf_counter()
    for w in tqdm(windows[:n_fit], desc="calibration windows", unit="win"):
        capture(model, w[None], lambda att: stats[att.layer].add(kind_tensors(att), "fit"))
    timings["calibration_pass"] = time.perf_counter() - t0

    ranks = cfg.ranks(shape.head_dim)
    t0 = time.perf_counter()
    maps, skipped = fit_methods(model, [_calibration(s, shape) for s in stats], ranks)
    errors = [LogitErrors(m, shape.num_kv_heads, cfg.logit_queries) for m in maps]
    methods = list(maps[0])
    timings["fit_methods"] = time.perf_counter() - t0

    heldout = windows[n_fit:]
    scored = set(torch.linspace(0, len(heldout) - 1, min(cfg.logit_windows, len(heldout))).round().long().tolist())

    def on_heldout(att, score: bool) -> None:
        stats[att.layer].add(kind_tensors(att), "heldout")
        if score:
            errors[att.layer].add(att)

    t0 = time.perf_counter()
    for i, w in enumerate(tqdm(heldout, desc="held-out windows", unit="win")):
        capture(model, w[None], lambda att: on_heldout(att, i in scored))
    timings["heldout_pass"] = time.perf_counter() - t0
    for s in stats:
        s.to_cpu()

    t0 = time.perf_counter()
    result = {
        "model": {"path": str(model_path), "model_type": config.model_type, **asdict(shape), "group": shape.group,
                  # per layer: "full_attention" or "sliding_attention" (Gemma 3), to read the results by layer type
                  "layer_types": list(getattr(config, "layer_types", None) or ["full_attention"] * shape.num_layers),
                  "sliding_window": getattr(config, "sliding_window", None)},
        "settings": {**asdict(cfg), "ranks": ranks, "methods": methods},
        "text": {
            **provenance,
            "windows_fit": n_fit,
            "windows_heldout": len(windows) - n_fit,
            "tokens_fit": n_fit * cfg.ctx,
            "tokens_heldout": (len(windows) - n_fit) * cfg.ctx,
            "windows_logit_error": len(scored),
        },
        "weights": _weights(model, shape, cfg),
        "activations": _activations(stats, shape, cfg),
        "adjacent_cosine": {"offsets": list(cfg.offsets), **{k: [s.mean_cosine(k).tolist() for s in stats] for k in KINDS}},
        "predictability": _predictability(stats, shape, cfg),
        "logit_error": {**_logit_error(errors, methods, ranks, cfg), "not_applicable": skipped},
    }
    timings["analysis"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    result["timings_s"] = timings
    return _nan_to_none(result)


def _weights(model, shape: AttentionShape, cfg: AnalyzeConfig) -> dict:
    out = {}
    for name in WEIGHTS:
        heads = shape.num_heads if name == "q_proj" else shape.num_kv_heads
        svs = [weight_singular_values(getattr(a, name).weight, heads, shape.head_dim) for a in attention_modules(model)]
        out[name] = {
            "singular_values": [[sv.tolist() for sv in layer] for layer in svs],
            "effective_rank": {
                f"{p:g}": [[energy_ranks(sv, (p,))[f"{p:g}"] for sv in layer] for layer in svs] for p in cfg.energies
            },
        }
    return out


def _activations(stats: list[LayerStats], shape: AttentionShape, cfg: AnalyzeConfig) -> dict:
    out = {}
    for kind in KINDS:
        sv, sv_c = [], []
        for s in stats:
            moments = [s.head_moments(kind, h) for h in range(shape.heads(kind))]
            sv.append([gram_singular_values(g, n) for g, _, n in moments])
            sv_c.append([centred_singular_values(g, c, n) for g, c, n in moments])
        out[kind] = {
            "rms_singular_values": [[x.tolist() for x in layer] for layer in sv],
            "effective_rank": _ranks_by_energy(sv, cfg.energies),
            "effective_rank_centred": _ranks_by_energy(sv_c, cfg.energies),
        }
    return out


def _ranks_by_energy(sv: list[list[torch.Tensor]], energies: tuple[float, ...]) -> dict[str, list[list[int]]]:
    per = [[energy_ranks(x, energies) for x in layer] for layer in sv]
    return {f"{p:g}": [[r[f"{p:g}"] for r in layer] for layer in per] for p in energies}


def _predictability(stats: list[LayerStats], shape: AttentionShape, cfg: AnalyzeConfig) -> dict:
    out = {}
    for kind in (*KV_KINDS, "q_pre", "q_rope"):
        heads = shape.heads(kind)
        preds = [
            greedy_predictability(s.full_gram(kind, "fit"), s.full_gram(kind, "heldout"), heads, shape.head_dim, cfg.max_refs)
            for s in stats
        ]
        out[kind] = {
            "k": list(range(1, min(cfg.max_refs, heads - 1) + 1)),
            "refs": [[p.refs for p in layer] for layer in preds],
            "r2_heldout": [[p.r2_heldout for p in layer] for layer in preds],
            "r2_fit": [[p.r2_fit for p in layer] for layer in preds],
        }
    return out


def _logit_error(errors: list[LogitErrors], methods: list[str], ranks: list[int], cfg: AnalyzeConfig) -> dict:
    out: dict = {"ranks": ranks, "targets": list(cfg.logit_errors), "methods": {}}
    for method in methods:
        rel = [e.relative()[method] for e in errors]  # layer -> rank -> [Hkv]
        per_head = [[[layer[r][h] for r in ranks] for h in range(len(layer[ranks[0]]))] for layer in rel]
        out["methods"][method] = {
            "error": per_head,
            "rank_at_error": {
                f"{t:g}": [[rank_at_error(dict(zip(ranks, head)), t) for head in layer] for layer in per_head]
                for t in cfg.logit_errors
            },
        }
    return out
