"""Token windows drawn evenly from several text files: how calibration and evaluation read text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.text import read_texts, token_windows

PACKAGED = "vllm_thinkv/data/emma.txt (packaged)"


def windows_from_files(
    tokenizer, files: Sequence[str | Path], ctx: int, num_windows: int, skip_chars: int = 5000, what: str = "text"
) -> tuple[torch.Tensor, dict]:
    """`num_windows` windows [N, ctx], split as evenly as possible over `files`
    (each file's first windows after skipping `skip_chars`), or from the packaged
    text when `files` is empty. Returns the windows and their provenance.
    Raises ThinKVError naming the file when one is too short."""
    if num_windows < 1:
        raise ThinKVError(f"{what}: need at least one window of {ctx} tokens")
    sources = list(files) or [None]
    counts = [num_windows // len(sources) + (i < num_windows % len(sources)) for i in range(len(sources))]
    parts = []
    for f, n in zip(sources, counts):
        if n == 0:
            continue
        text = read_texts([f] if f else None, skip_chars=skip_chars if f else 0)
        try:
            parts.append(token_windows(tokenizer, text, ctx, max_tokens=n * ctx, min_windows=n))
        except ThinKVError as e:
            raise ThinKVError(f"{what} {f or PACKAGED}: {e}") from None
    windows = torch.cat(parts)
    provenance = {
        "texts": [Path(f).name for f in files] or [PACKAGED],
        "skip_chars": skip_chars if files else 0,
        "windows": int(windows.shape[0]),
        "ctx": int(ctx),
        "tokens": int(windows.numel()),
    }
    return windows, provenance
