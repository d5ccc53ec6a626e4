"""Writing thin checkpoints: HF format (safetensors + config.json) that vLLM serves with the plugin.

config.json keeps the original model's fields and gets
``"architectures": ["ThinKV<Orig>ForCausalLM"]`` and the versioned ``"thinkv"``
section; the tokenizer and generation files are copied from the source.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from vllm_thinkv.errors import ThinKVError

# Files of the source checkpoint that the thin checkpoint replaces (everything else is copied).
_REPLACED = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_REPLACED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty OUT_DIR unless `overwrite` (checked at start-up)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ThinKVError(f"output path {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ThinKVError(f"output folder {out} already exists; pass --overwrite to replace it")


def write_checkpoint(model: nn.Module, src_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Save thin `model` (from `make_thin`) to `out_dir`, in the source checkpoint's dtype."""
    src, out = Path(src_dir), Path(out_dir)
    check_out_dir(out, overwrite)
    thinkv = model.config.thinkv
    architectures = list(model.config.architectures)
    src_cfg = json.loads((src / "config.json").read_text())
    dtype_name = src_cfg.get("dtype") or src_cfg.get("torch_dtype") or "float32"
    dtype = getattr(torch, dtype_name, torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for f in src.iterdir():
            if f.is_file() and f.name not in _REPLACED and not f.name.endswith(_REPLACED_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        orig_dtype = next(model.parameters()).dtype
        model.to(dtype)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.to(orig_dtype)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["architectures"] = architectures
        cfg["thinkv"] = thinkv
        if "rope_theta" in src_cfg:  # keep legacy keys older config readers (and vLLM) look at
            cfg.setdefault("rope_theta", src_cfg["rope_theta"])
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
