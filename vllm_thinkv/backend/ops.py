"""Which implementation of the attention ops a layer calls (write, attend, gather).

CUDA: the Triton kernels. CPU (`THINKV_CPU_ATTENTION`): by default `numba`, the
JIT-compiled kernel that reads K and V in place from the paged cache
(`kernels.cpu_numba`), for decodes and short chunks; a sequence with more than
`cpu_numba.PREFILL_TOKENS` query tokens in a step (a long prefill chunk) goes to the
torch path's fused SDPA instead, which is faster there (`cpu_numba.paged_attention_cpu`); `torch`, the vectorised torch implementation of the same op
(gathers each sequence's blocks into a copy first; the readable fallback and test oracle);
`triton`, the real Triton kernels under the interpreter (needs `TRITON_INTERPRET=1`
set before Triton is first imported; a kernel program takes milliseconds there, so
only for tests), which is how CI checks the kernels inside a running vLLM engine.
Without numba installed the default is `torch`, and the ops' name says so (the
backend logs it); asking for `numba` explicitly without it is an error.
Cache writes and SnapKV's gather use torch on CPU whichever attention runs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_thinkv.errors import ThinKVError

CPU_ATTENTION_ENV = "THINKV_CPU_ATTENTION"
CPU_ATTENTION_CHOICES = ("numba", "torch", "triton")


@dataclass(frozen=True)
class AttentionOps:
    """One set of ops for everything a layer does to its cache: attention and
    new-token writes, and SnapKV's gather + rewrite of a prompt."""

    name: str
    paged_attention: Callable[..., torch.Tensor]
    write_kv: Callable[..., None]
    # (cache [B, N, Hkv, D], block ids, start, end) -> tokens [end - start, Hkv, D]; torch on every device
    gather_tokens: Callable[..., torch.Tensor]
    # called at layer construction with the cache dtype and the head sizes (r, d): JIT ops compile at
    # start-up, not in a request
    prepare: Callable[[torch.dtype, int, int], None] = lambda dtype, r, d: None


@functools.cache
def select_ops(device_type: str) -> AttentionOps:
    """The ops for a device type ("cuda" or "cpu"), chosen once per process (they
    depend only on it and on the environment at start-up); raises ThinKVError on
    an unusable configuration."""
    from vllm_thinkv import kernels
    from vllm_thinkv.kernels import cpu_numba
    from vllm_thinkv.kernels.torch_ops import gather_tokens

    if device_type == "cuda":
        return AttentionOps("triton", kernels.paged_attention, kernels.write_kv, gather_tokens)
    if device_type != "cpu":
        raise ThinKVError(f"thinkv backend: device type {device_type!r} is not supported (supported: cuda, cpu)")
    choice = os.environ.get(CPU_ATTENTION_ENV, "").strip().lower()
    if not choice:  # the default: numba where it is installed
        if cpu_numba.available():
            return AttentionOps("numba", cpu_numba.paged_attention_cpu, kernels.write_kv_torch, gather_tokens,
                                cpu_numba.warm_up)
        return AttentionOps("torch (numba is not installed)", kernels.paged_attention_torch, kernels.write_kv_torch,
                            gather_tokens)
    if choice not in CPU_ATTENTION_CHOICES:
        raise ThinKVError(
            f"{CPU_ATTENTION_ENV}={choice!r} is not valid (choose one of: {', '.join(CPU_ATTENTION_CHOICES)})"
        )
    if choice == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ThinKVError(
                f"{CPU_ATTENTION_ENV}=triton runs the Triton kernels on CPU through the Triton "
                "interpreter: also set TRITON_INTERPRET=1 (before starting vLLM)"
            )
        return AttentionOps("triton-interpreter", kernels.paged_attention, kernels.write_kv, gather_tokens)
    if choice == "numba":
        if not cpu_numba.available():
            raise ThinKVError(f"{CPU_ATTENTION_ENV}=numba needs numba (pip install numba), or choose torch")
        return AttentionOps("numba", cpu_numba.paged_attention_cpu, kernels.write_kv_torch, gather_tokens,
                            cpu_numba.warm_up)
    return AttentionOps("torch", kernels.paged_attention_torch, kernels.write_kv_torch, gather_tokens)
