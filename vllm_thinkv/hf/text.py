"""Text to token windows, the one way every calibration and evaluation reads text."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch

from vllm_thinkv.errors import ThinKVError


def packaged_text() -> str:
    """The public-domain calibration text shipped in the package (an Emma excerpt)."""
    return files("vllm_thinkv").joinpath("data/emma.txt").read_text(encoding="utf-8")


def read_texts(paths: list[str | Path] | None, skip_chars: int = 0) -> str:
    """Concatenate text files (or the packaged text when `paths` is empty).

    `skip_chars` drops each file's front matter (title, contents).
    """
    if not paths:
        return packaged_text()
    parts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ThinKVError(f"text file not found: {p}")
        parts.append(p.read_text(encoding="utf-8", errors="replace")[skip_chars:])
    return "\n\n".join(parts)


def token_windows(tokenizer, text: str, ctx: int, max_tokens: int | None = None, min_windows: int = 1) -> torch.Tensor:
    """Tokenise `text` and cut it into non-overlapping windows: LongTensor [N, ctx].

    Raises ThinKVError when the text yields fewer than `min_windows` full windows.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // ctx
    if n < min_windows:
        raise ThinKVError(
            f"too little text: {len(ids)} tokens make {n} window(s) of {ctx}; need at least {min_windows} "
            f"({min_windows * ctx} tokens)"
        )
    return torch.tensor(ids[: n * ctx], dtype=torch.long).view(n, ctx)
