"""Load original or thin-key checkpoints as transformers causal LMs (the reference model).

`load(path)` on an original checkpoint is plain `from_pretrained`. On a thin
checkpoint (config.json with a `thinkv` section and a ThinKV* architecture) it
builds the original architecture from the config, swaps every attention module
for `ThinKVAttention` at the layer's rank, checks every q/k-side tensor's shape
against the `thinkv` section (ThinKVError naming the layer otherwise) and loads
the weights strictly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vllm_thinkv.config import (
    ARCHITECTURES,
    ORIGINAL_ARCHITECTURES,
    CompressRequest,
    ThinKVConfig,
    check_shapes,
    parse_thinkv_section,
)
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.capture import attention_modules
from vllm_thinkv.hf.thin_attention import ThinKVAttention


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def make_thin(model: nn.Module, cfg: ThinKVConfig, tensors: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap `model`'s attention modules (in place) for thin ones and load `tensors`
    (HF names, as returned by `compress_model`). Marks the config as thin."""
    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise ThinKVError(f"unsupported architecture {arch!r}; thinkv supports {', '.join(ARCHITECTURES)}")
    if tensors is not None:
        check_shapes(cfg, model.config, {k: tuple(v.shape) for k, v in tensors.items()}, only_thin=True)
    for layer, attn, rank in zip(_decoder_layers(model), attention_modules(model), cfg.ranks):
        if isinstance(attn, ThinKVAttention):
            raise ThinKVError("the model is already thin-key compressed")
        layer.self_attn = ThinKVAttention(attn, cfg.form, rank, cfg.share_group)
    if tensors is not None:
        load_thin_tensors(model, tensors)
    model.config.thinkv = cfg.to_dict()
    model.config.architectures = [ARCHITECTURES[arch]]
    return model


@torch.no_grad()
def load_thin_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy named q/k-side tensors into a thin model (shapes must match exactly)."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, t in tensors.items():
        if name not in state:
            raise ThinKVError(f"thin tensor {name} has no place in the model")
        if tuple(state[name].shape) != tuple(t.shape):
            raise ThinKVError(f"thin tensor {name}: shape {tuple(t.shape)}, model expects {tuple(state[name].shape)}")
        state[name].copy_(t)


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ThinKVError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    return json.loads(cfg_file.read_text())


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or sharded)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ThinKVError(f"{path} holds no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """A transformers causal LM for an original or thin-key checkpoint folder, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = read_config(path)
    section = raw.get("thinkv")
    if section is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    cfg = parse_thinkv_section(section)
    if isinstance(cfg, CompressRequest):
        raise ThinKVError(
            f"{path}/config.json holds a thinkv compression request, not a compressed checkpoint; "
            "run `thinkv compress` to produce one"
        )
    archs = raw.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ORIGINAL_ARCHITECTURES:
        raise ThinKVError(
            f"thin checkpoint {path} has architectures {archs}; expected one of {', '.join(ORIGINAL_ARCHITECTURES)}"
        )
    hf_config = AutoConfig.from_pretrained(path)
    state = read_safetensors(path)
    check_shapes(cfg, hf_config, {k: tuple(v.shape) for k, v in state.items()})
    hf_config.architectures = [ORIGINAL_ARCHITECTURES[archs[0]]]
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    if type(model).__name__ != ORIGINAL_ARCHITECTURES[archs[0]]:
        raise ThinKVError(
            f"{archs[0]} needs model_type for {ORIGINAL_ARCHITECTURES[archs[0]]}, config has {hf_config.model_type!r}"
        )
    make_thin(model, cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(hf_config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ThinKVError(f"thin checkpoint {path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    if tied:
        model.tie_weights()
    if (Path(path) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(device=device, dtype=dtype).eval()
