"""Serving: `thinkv serve` and what drives it from outside.

- `cli`:     `thinkv serve`, vLLM's OpenAI-compatible server with the thinkv backend;
- `process`: `ServerProcess`, a `thinkv serve` child on 127.0.0.1 (demo, HTTP tests, benchmarks);
- `demo`:    `make demo`, serve SmolLM2-135M-Instruct and ask it a question.

Nothing here imports vLLM at import time: `cli` imports it when it runs.
"""
