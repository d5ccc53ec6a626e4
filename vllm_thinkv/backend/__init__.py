"""The `thinkv` vLLM attention backend, split like vLLM's `triton_attn.py`:
`backend.py` (capabilities), `metadata.py` (per-batch metadata builder),
`impl.py` (KV write + attention), `ops.py` (Triton kernels or the CPU torch path).
"""

from vllm_thinkv.backend.backend import BACKEND_PATH, ThinKVBackend

__all__ = ["BACKEND_PATH", "ThinKVBackend"]
