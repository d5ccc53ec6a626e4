"""SnapKV prefill selection: keep the prompt tokens the last window of prompt
queries attends to, per KV head, and give the rest of the prompt's KV blocks
back to vLLM.

`config` (settings), `selection` (scores and top-k), `tracker` (when a request
is compacted, worker side) are plain torch/Python; `kv_cache` holds the vLLM KV
spec and manager that free the blocks.
"""

from vllm_thinkv.snapkv.config import SnapKVConfig

__all__ = ["SnapKVConfig"]
