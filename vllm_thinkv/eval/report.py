"""Result files: environment stamp, JSON writing, markdown tables (CLI and benchmarks share them)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any


def device_label(device: str) -> str:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def environment(device: str = "cpu") -> dict[str, Any]:
    import torch
    import transformers

    import vllm_thinkv

    return {
        "date": datetime.date.today().isoformat(),
        "device": device_label(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vllm_thinkv": vllm_thinkv.__version__,
    }


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomic write (a crash never leaves a half-written result file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
    return path


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
