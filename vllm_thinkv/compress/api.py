"""`compress_model`: the one entry point shared by `thinkv compress` and vLLM's load-time path.

    cfg, tensors = compress_model(model, request, calib_windows)

`model` is an original (uncompressed) transformers Llama/Mistral/Qwen2/Qwen3/Gemma 3
causal LM, `request` a `CompressRequest` (method + uniform rank or rank budget)
or a `ThinKVConfig` (method + explicit per-layer ranks), `calib_windows` a
LongTensor [N, ctx] of calibration tokens (`calibration_windows`). It returns
the checkpoint's `thinkv` section and the changed/added tensors under their HF
names (``model.layers.{i}.self_attn.q_proj.weight`` ...), ready for
`vllm_thinkv.hf.thin_model.make_thin` or a vLLM weight loader. The model is not modified.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import vllm_thinkv
from vllm_thinkv.compress.base import Method, ModelInfo
from vllm_thinkv.compress.calibrate import LayerStats, collect_statistics
from vllm_thinkv.compress.joint import Joint
from vllm_thinkv.compress.pairs import Pairs
from vllm_thinkv.compress.pca import Pca
from vllm_thinkv.compress.ranks import allocate_ranks
from vllm_thinkv.compress import target as target_ranks
from vllm_thinkv.compress.svd import Svd
from vllm_thinkv.config import CompressRequest, ThinKVConfig, check_rank, check_share_divides, check_share_group, form_for
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.capture import attention_modules
from vllm_thinkv.hf.windows import windows_from_files
from vllm_thinkv.kernels.checks import MAX_HEAD_DIM, QK_MULTIPLE

log = logging.getLogger(__name__)

METHODS: dict[str, type[Method]] = {"pairs": Pairs, "pca": Pca, "svd": Svd, "joint": Joint}


def calibration_windows(tokenizer, request: CompressRequest, skip_chars: int = 5000) -> tuple[torch.Tensor, dict]:
    """Calibration tokens [N, calib_ctx] and their provenance: the request's text
    files (each skipping `skip_chars` of front matter; `calib_tokens` spread evenly
    over them), or the packaged public-domain text when it names none.
    Raises ThinKVError on too little text."""
    if request.calib_ctx is None:
        raise ThinKVError("the calibration window is not set: resolve the request for its serving length "
                          "(CompressRequest.for_serving) first")
    n_windows = request.calib_tokens // request.calib_ctx
    if n_windows < 1:
        raise ThinKVError(f"calib_tokens {request.calib_tokens} is less than one window of calib_ctx {request.calib_ctx}")
    return windows_from_files(
        tokenizer, request.calib, request.calib_ctx, n_windows, skip_chars, what="calibration text"
    )


def validate_request(model: nn.Module, request: CompressRequest | ThinKVConfig) -> tuple[ModelInfo, str, int]:
    """All start-up checks (architecture, RoPE, ranks, share group); returns the model
    info, the thin form and the share group (KV heads per key latent)."""
    info = ModelInfo.of(model)
    if any(type(a).__name__ == "ThinKVAttention" for a in attention_modules(model)):
        raise ThinKVError("the model is already thin-key compressed; compress the original checkpoint")
    form = form_for(request.method, info.architecture)
    if form == "rope_subspace":
        info.check_rope_subspace(model)
    if isinstance(request, ThinKVConfig):
        if request.num_layers != len(attention_modules(model)):
            raise ThinKVError(f"{request.num_layers} ranks given for a model with {len(attention_modules(model))} layers")
        for i, r in enumerate(request.ranks):
            check_rank(r, info.head_dim, request.method, what=f"rank of layer {i}")
        share = request.share_group
        check_share_divides(share, info.num_kv_heads)
    else:
        request.check_head_dim(info.head_dim)
        share = request.share_group_for(info.num_kv_heads)
        check_share_group(share, [request.nominal_rank], request.method)
    return info, form, share


def compress_model(
    model: nn.Module,
    request: CompressRequest | ThinKVConfig,
    calib_windows: torch.Tensor | None = None,
    progress: bool = True,
    *,
    stats: list[LayerStats] | None = None,
    provenance: Mapping[str, Any] | None = None,
    method: Method | None = None,
) -> tuple[ThinKVConfig, dict[str, torch.Tensor]]:
    """Calibrate and compress (see module docstring). `stats` reuses a previous
    `collect_statistics` pass (one pass serves every method and rank);
    `method` overrides the method's default parameters."""
    info, form, share = validate_request(model, request)
    method = method or (Joint(share_group=share) if request.method == "joint" else METHODS[request.method]())
    if method.name != request.method:
        raise ThinKVError(f"method object {method.name!r} does not match the request's {request.method!r}")
    if getattr(method, "share_group", 1) != share:
        raise ThinKVError(f"method object's share_group {method.share_group} does not match the request's {share}")
    target = getattr(request, "target", None)
    heldout = None
    if target is not None and target[0] == "ppl_increase":
        # fit on the first three quarters of the calibration windows, measure PPL on the rest
        if calib_windows is None or stats is not None or calib_windows.shape[0] < 2:
            raise ThinKVError("a PPL target needs at least 2 calibration windows (the last quarter is held out "
                              "to measure perplexity), not precomputed statistics")
        held = max(1, calib_windows.shape[0] // 4)
        calib_windows, heldout = calib_windows[:-held], calib_windows[-held:]
    if stats is None:
        if calib_windows is None:
            raise ThinKVError("compress_model needs calib_windows (or precomputed stats)")
        stats = collect_statistics(model, calib_windows, progress)
    fits = [method.fit(s, info, form) for s in stats]
    # a shared key is share × rank wide: cap the per-layer ranks at the kernels' width
    top = min(info.head_dim, MAX_HEAD_DIM // share // QK_MULTIPLE * QK_MULTIPLE)
    target_record: dict[str, Any] | None = None
    if isinstance(request, ThinKVConfig):
        ranks = list(request.ranks)
    elif request.rank is not None:
        ranks = [request.rank] * len(fits)
    elif request.rank_budget is not None:
        ranks = allocate_ranks(fits, request.rank_budget, top)
    elif target[0] == "logit_error":
        ranks = target_ranks.ranks_for_logit_error(fits, target[1], top)
        target_record = {"logit_error": target[1]}
    else:
        from vllm_thinkv.eval.ppl import perplexity

        original = perplexity(model, heldout, progress=False).ppl

        def cfg_for(r: list[int]) -> ThinKVConfig:
            return ThinKVConfig(method=request.method, form=form, ranks=tuple(r), head_dim=info.head_dim,
                                share_group=share)

        thin_ppl = target_ranks.thin_ppl_function(model, fits, cfg_for, heldout)
        ranks, search = target_ranks.ranks_for_ppl_increase(fits, target[1], top, thin_ppl, original)
        target_record = {"ppl_increase": target[1], "heldout_windows": int(heldout.shape[0]),
                         "original_ppl": round(original, 4), "ppl_by_mean_rank": {
                             str(k): round(v, 4) for k, v in sorted(search.measured.items())}}
    if target_record is not None:
        target_record.update(predicted_relative_logit_error=round(target_ranks.relative_error(fits, ranks), 6),
                             capacity_gain=round(target_ranks.capacity_gain(ranks, info.head_dim), 4))
        log.info("quality target %s: ranks %s (mean %.1f), %.2fx the KV tokens", target_record, ranks,
                 sum(ranks) / len(ranks), target_record["capacity_gain"])
    tensors: dict[str, torch.Tensor] = {}
    for i, (attn, fit, r) in enumerate(zip(attention_modules(model), fits, ranks)):
        for name, t in fit.tensors(attn, r).items():
            tensors[f"model.layers.{i}.self_attn.{name}"] = t.contiguous()
    calibration = dict(provenance or {})
    calibration.update(
        {
            "method_params": method.params(),
            "rank_budget": getattr(request, "rank_budget", None),
            **({"target": target_record} if target_record is not None else {}),
            "predicted_logit_mse": [round(f.error(r), 6) for f, r in zip(fits, ranks)],
            "vllm_thinkv": vllm_thinkv.__version__,
            "date": datetime.date.today().isoformat(),
        }
    )
    cfg = ThinKVConfig(
        method=request.method, form=form, ranks=tuple(ranks), head_dim=info.head_dim, calibration=calibration,
        share_group=share,
    )
    log.info("compressed with %s (%s): ranks %s", cfg.method, cfg.form, ranks)
    return cfg, tensors
