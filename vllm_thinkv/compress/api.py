"""`compress_model`: the one entry point shared by `thinkv compress` and vLLM's load-time path.

    cfg, tensors = compress_model(model, request, calib_windows)

`model` is an original (uncompressed) transformers Llama/Mistral/Qwen2/Qwen3
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
from vllm_thinkv.compress.pairs import Pairs
from vllm_thinkv.compress.pca import Pca
from vllm_thinkv.compress.ranks import allocate_ranks
from vllm_thinkv.compress.svd import Svd
from vllm_thinkv.config import CompressRequest, ThinKVConfig, check_rank, form_for
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.capture import attention_modules
from vllm_thinkv.hf.windows import windows_from_files

log = logging.getLogger(__name__)

METHODS: dict[str, type[Method]] = {"pairs": Pairs, "pca": Pca, "svd": Svd}


def calibration_windows(tokenizer, request: CompressRequest, skip_chars: int = 5000) -> tuple[torch.Tensor, dict]:
    """Calibration tokens [N, calib_ctx] and their provenance: the request's text
    files (each skipping `skip_chars` of front matter; `calib_tokens` spread evenly
    over them), or the packaged public-domain text when it names none.
    Raises ThinKVError on too little text."""
    n_windows = request.calib_tokens // request.calib_ctx
    if n_windows < 1:
        raise ThinKVError(f"calib_tokens {request.calib_tokens} is less than one window of calib_ctx {request.calib_ctx}")
    return windows_from_files(
        tokenizer, request.calib, request.calib_ctx, n_windows, skip_chars, what="calibration text"
    )


def validate_request(model: nn.Module, request: CompressRequest | ThinKVConfig) -> tuple[ModelInfo, str]:
    """All start-up checks (architecture, RoPE, ranks); returns the model info and thin form."""
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
    else:
        request.check_head_dim(info.head_dim)
    return info, form


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
    info, form = validate_request(model, request)
    method = method or METHODS[request.method]()
    if method.name != request.method:
        raise ThinKVError(f"method object {method.name!r} does not match the request's {request.method!r}")
    if stats is None:
        if calib_windows is None:
            raise ThinKVError("compress_model needs calib_windows (or precomputed stats)")
        stats = collect_statistics(model, calib_windows, progress)
    fits = [method.fit(s, info, form) for s in stats]
    if isinstance(request, ThinKVConfig):
        ranks = list(request.ranks)
    elif request.rank is not None:
        ranks = [request.rank] * len(fits)
    else:
        ranks = allocate_ranks(fits, request.rank_budget, info.head_dim)
    tensors: dict[str, torch.Tensor] = {}
    for i, (attn, fit, r) in enumerate(zip(attention_modules(model), fits, ranks)):
        for name, t in fit.tensors(attn, r).items():
            tensors[f"model.layers.{i}.self_attn.{name}"] = t.contiguous()
    calibration = dict(provenance or {})
    calibration.update(
        {
            "method_params": method.params(),
            "rank_budget": getattr(request, "rank_budget", None),
            "predicted_logit_mse": [round(f.error(r), 6) for f, r in zip(fits, ranks)],
            "vllm_thinkv": vllm_thinkv.__version__,
            "date": datetime.date.today().isoformat(),
        }
    )
    cfg = ThinKVConfig(
        method=request.method, form=form, ranks=tuple(ranks), head_dim=info.head_dim, calibration=calibration
    )
    log.info("compressed with %s (%s): ranks %s", cfg.method, cfg.form, ranks)
    return cfg, tensors
