"""Serving: `thinkv serve` and what drives it from outside.

- `cli`:     `thinkv serve`, vLLM's OpenAI-compatible server with the thinkv backend;
- `process`: `ServerProcess`, a `thinkv serve` child on 127.0.0.1 (demo, HTTP tests, benchmarks);
- `demo`:    `make demo`, serve SmolLM2-135M-Instruct and ask it a question;
- `budget_limit`: the server middleware that refuses per-request SnapKV budgets above `max_budget`.

Nothing here but `budget_limit` (which runs inside vLLM's server) imports vLLM at import
time: `cli` imports it when it runs.
"""
