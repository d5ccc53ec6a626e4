"""The `thinkv` vLLM attention backend, split like vLLM's `triton_attn.py`:
`backend.py` (capabilities), `deployment.py` (the once-per-engine checks and the
backend class a deployment uses), `selected.py` (the path vLLM resolves),
`metadata.py` (per-batch metadata builder), `impl.py` (KV write + attention),
`ops.py` (Triton kernels or the CPU torch path), `snapkv_layer.py` (SnapKV's
per-layer work).
"""

from vllm_thinkv.backend.backend import ThinKVBackend
from vllm_thinkv.backend.selected import BACKEND_PATH

__all__ = ["BACKEND_PATH", "ThinKVBackend"]
