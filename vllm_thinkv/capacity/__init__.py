"""`thinkv capacity`: how many tokens and concurrent requests fit in the KV cache,
stock vs thin keys vs SnapKV, from an HF config alone (no weights, no vLLM).

- `model`: the analytic model (mirrors vLLM's block allocator; the throughput
  benchmark and tests/capacity compare it with a real engine);
- `cli`:   the command line and its JSON / markdown report.

Shipped configs (`llama-3.1-8b`, ...) live in `vllm_thinkv/data/configs/`.
"""
