"""Folder-level compression: checks from config.json alone, then load, calibrate, compress.

Every check that can fail (architecture, rank, method/architecture pairing,
RoPE type, calibration text) runs before the weights are loaded, so bad input
fails in seconds with a ThinKVError.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vllm_thinkv.compress.api import calibration_windows, compress_model
from vllm_thinkv.config import (
    ARCHITECTURES,
    DEFAULT_CALIB_CTX,
    STATIC_ROPE_TYPES,
    CompressRequest,
    ThinKVConfig,
    form_for,
    rope_type,
)
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.thin_model import read_config

log = logging.getLogger(__name__)


def serving_length(raw: dict) -> int:
    """The longest context a checkpoint serves by default (its max_position_embeddings)."""
    return int(raw.get("max_position_embeddings") or DEFAULT_CALIB_CTX)


def precheck(model_dir: str | Path, request: CompressRequest) -> dict:
    """Validate `request` against `model_dir`'s config.json; return the raw config."""
    raw = read_config(model_dir)
    if "thinkv" in raw:
        raise ThinKVError(f"{model_dir} is already a thin-key checkpoint; compress the original checkpoint")
    archs = raw.get("architectures") or []
    arch = archs[0] if len(archs) == 1 else None
    if arch not in ARCHITECTURES:
        raise ThinKVError(f"unsupported architecture {archs}; thinkv supports {', '.join(ARCHITECTURES)}")
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    request.check_head_dim(head_dim)
    request.share_group_for(raw.get("num_key_value_heads") or raw["num_attention_heads"])
    if form_for(request.method, arch) == "rope_subspace":

        class _Cfg:  # rope_type() reads attributes
            rope_parameters = raw.get("rope_parameters")
            rope_scaling = raw.get("rope_scaling")

        rt = rope_type(_Cfg)
        if rt not in STATIC_ROPE_TYPES:
            raise ThinKVError(
                f"RoPE type {rt!r} cannot be carried into a thin r-dim RoPE; methods 'pairs'/'svd' support "
                f"RoPE types {', '.join(STATIC_ROPE_TYPES)}; use --method pca"
            )
    return raw


def load_original(model_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The original model in fp32 (calibration statistics need the precision)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def compress_pretrained(
    model_dir: str | Path,
    request: CompressRequest,
    device: str | torch.device = "cpu",
    progress: bool = True,
    skip_chars: int = 5000,
    model: nn.Module | None = None,
) -> tuple[ThinKVConfig, dict[str, torch.Tensor], nn.Module]:
    """Compress the checkpoint at `model_dir`: returns (thinkv section, thin tensors,
    the loaded original model — unchanged, for `make_thin` or the vLLM loader)."""
    from transformers import AutoTokenizer

    raw = precheck(model_dir, request)
    request = request.for_serving(serving_length(raw))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows, provenance = calibration_windows(tokenizer, request, skip_chars=skip_chars)
    provenance["source"] = str(Path(model_dir).resolve())
    model = model if model is not None else load_original(model_dir, device)
    cfg, tensors = compress_model(model, request, windows, progress=progress, provenance=provenance)
    return cfg, tensors, model
