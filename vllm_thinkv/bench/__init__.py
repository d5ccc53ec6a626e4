"""Serving benchmark through vLLM itself (`benchmarks/throughput.py`).

`workload` builds the token prompts, `offline` steps an in-process engine and
reads the scheduler's own accounting, `server` drives a running OpenAI server,
`summary` turns per-token timestamps into the reported numbers and `report`
writes JSON, markdown and the plot. Nothing here imports vLLM at module level.
"""
