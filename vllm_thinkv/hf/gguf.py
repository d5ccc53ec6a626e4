"""Dequantise a GGUF model file into a plain HF folder (fp32), once, atomically.

vLLM and our compression tools want safetensors + config.json; the offline
models we ship tests against come as GGUF inside PyPI wheels
(`vllm_thinkv.hf.smollm2`, `vllm_thinkv.hf.gemma3`). Nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """`$THINKV_CACHE`, else `~/.cache/vllm-thinkv`."""
    return Path(os.environ.get("THINKV_CACHE", Path.home() / ".cache" / "vllm-thinkv"))


def is_converted(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def convert_gguf(src: Path, out: Path, fix_tokenizer: Callable | None = None) -> Path:
    """Write `src` (a GGUF file) as an fp32 HF folder at `out` unless it is there already.

    `fix_tokenizer(tokenizer)` may repair what transformers' GGUF reader leaves out
    before the tokenizer is saved (Gemma's `<bos>`), so every caller gets the fix.
    """
    if is_converted(out):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    if fix_tokenizer is not None:
        fix_tokenizer(tok)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a clean one from its config.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(cfg), dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(clean.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        rope = config.get("rope_parameters") or {}
        if "rope_theta" in rope:
            config.setdefault("rope_theta", rope["rope_theta"])  # for older config readers
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if out.exists():  # a concurrent conversion finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
