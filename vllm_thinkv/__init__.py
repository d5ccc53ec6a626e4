"""vllm-thinkv: thin keys, full values — a smaller KV cache for vLLM.

Importing this package is cheap and never imports vLLM; the vLLM entry point is
`vllm_thinkv.plugin:register`.
"""

__version__ = "0.1.0"
