"""Benchmarks through vLLM itself (`benchmarks/throughput.py`, `benchmarks/snapkv_quality.py`).

`engine` runs one vLLM engine in a fresh process (modes generate, step, trace; the
end-to-end tests use it too), `workload` builds the token prompts, `server` drives a
running OpenAI server, `summary` turns per-token timestamps into the reported numbers
and `report` writes the throughput JSON, markdown and plot (on `vllm_thinkv.results`).
Nothing here imports vLLM at module level.
"""
