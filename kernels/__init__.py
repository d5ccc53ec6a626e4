"""Paged attention and KV-cache writes for thin keys (q/k: r dims, v: d dims), optionally
with one key shared by groups of KV heads (`key_share`: q/k key_share * r dims).

`paged_attention` / `write_kv` are the Triton ops (CUDA, or the Triton interpreter);
`paged_attention_torch` / `write_kv_torch` are the same ops in vectorised torch (the
readable CPU fallback); `cpu_numba.paged_attention_numba` is a numba kernel reading the paged
cache in place (numba is imported on first use), and `cpu_numba.paged_attention_cpu`, the default
CPU attention, runs it for decodes and short chunks and the torch op for long prefill chunks;
`reference` holds the float64 oracles the tests compare them against.
All three share each op's signature and argument record (`calls`); `launch` is the
tuning table, `testing` builds poisoned random paged batches.
This package never imports vLLM.
"""

from . import reference
from .attention import paged_attention
from .torch_ops import paged_attention_torch, write_kv_torch
from .write_kv import write_kv

__all__ = ["paged_attention", "paged_attention_torch", "reference", "write_kv", "write_kv_torch"]
