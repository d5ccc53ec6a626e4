"""Run one engine configuration on the workload, in this process, and record what
the scheduler itself sees.

    python -m vllm_thinkv.bench.offline SPEC.json OUT.json

One fresh process per configuration (vLLM loads plugins and its platform once
per process). The engine core runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
so that after every `step()` the scheduler's accounting can be read: running
and waiting requests, each request's preemption count, KV-cache usage. Every
generated token is stamped with the time its step returned, which is when a
streaming client would have received it. SPEC: model, engine (vllm.LLM kwargs),
prompts (token-id lists, all submitted at once), output_tokens.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def run(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], **spec["engine"])
    init_s = time.perf_counter() - t0
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_tokens"], ignore_eos=True)
    prompts = spec["prompts"]
    tokens: list[list[int]] = [[] for _ in prompts]
    stamps: list[list[float]] = [[] for _ in prompts]
    preemptions: dict[str, int] = {}
    timeline = []
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=p), params)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            i = int(out.request_id)
            new = list(out.outputs[0].token_ids)[len(tokens[i]):]
            tokens[i].extend(new)
            stamps[i].extend([now] * len(new))
        for r in (*scheduler.running, *scheduler.waiting):
            preemptions[r.request_id] = max(preemptions.get(r.request_id, 0), r.num_preemptions)
        timeline.append({"t": now, "running": len(scheduler.running), "waiting": len(scheduler.waiting),
                         "kv_usage": scheduler.kv_cache_manager.usage})
    config = engine.vllm_config
    return {
        "vllm_version": vllm.__version__,
        "init_s": init_s,
        "wall_s": time.perf_counter() - start,
        "num_gpu_blocks": config.cache_config.num_gpu_blocks,
        "block_size": config.cache_config.block_size,
        "dtype": str(config.model_config.dtype).replace("torch.", ""),
        "kv_cache_spec": type(scheduler.kv_cache_manager.coordinator.single_type_managers[0].kv_cache_spec).__name__,
        "prefix_caching": bool(config.cache_config.enable_prefix_caching),
        "timeline": timeline,
        "preemptions": sum(preemptions.values()),
        "requests": [{"token_ids": t, "token_times": s} for t, s in zip(tokens, stamps)],
    }


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    result = run(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
