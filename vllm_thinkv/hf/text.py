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

    Each window starts with what the tokenizer puts before a text (`text_prefix`:
    Gemma's `<bos>`, which it needs at the start of every sequence; nothing for
    SmolLM2), followed by ctx minus that many text tokens.
    Raises ThinKVError when the text yields fewer than `min_windows` full windows.
    """
    prefix = text_prefix(tokenizer)
    body = ctx - len(prefix)
    if body < 1:
        raise ThinKVError(f"a window of {ctx} tokens leaves no room for text after the tokenizer's prefix {prefix}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[: max_tokens // ctx * body]
    n = len(ids) // body
    if n < min_windows:
        raise ThinKVError(
            f"too little text: {len(ids)} tokens make {n} window(s) of {ctx}; need at least {min_windows} "
            f"({min_windows * body} text tokens)"
        )
    windows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, -1), windows], dim=1)


def text_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (e.g. `[<bos>]`; often none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    cut = len(full) - len(plain)
    if cut < 0 or full[cut:] != plain:  # suffix tokens (e.g. an <eos>) are not a prefix
        cut = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
    return full[:cut]
