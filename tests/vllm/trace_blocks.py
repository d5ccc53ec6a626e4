"""Step a vLLM engine in this process and record its KV-block accounting.

Usage (from the repository root): python -m tests.vllm.trace_blocks SPEC.json OUT.json

Same SPEC as `run_llm` (model, engine, batches -> all prompts are submitted at
once, max_tokens). The engine core runs in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so the scheduler's own accounting can be
read after every step: free blocks in the pool, and for each running request
its prompt length, computed tokens, times preempted and the non-null blocks it holds.
"""

import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    spec = json.loads(open(spec_path).read())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec.get("engine", {}))
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    kv = scheduler.kv_cache_manager
    manager = kv.coordinator.single_type_managers[0]
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16), ignore_eos=True)
    prompts = [p for batch in spec["batches"] for p in batch]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p, params)
    steps, texts = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                texts[out.request_id] = list(out.outputs[0].token_ids)
        steps.append({
            "free_blocks": kv.block_pool.get_num_free_blocks(),
            "waiting": len(scheduler.waiting),
            "running": [
                {"prompt": r.num_prompt_tokens, "computed": r.num_computed_tokens, "preemptions": r.num_preemptions,
                 "blocks": sum(not b.is_null for b in manager.req_to_blocks.get(r.request_id, []))}
                for r in scheduler.running
            ],
        })
    extra = {}
    if spec.get("snapkv_selections"):
        from tests.vllm.probes import snapkv_selections

        extra["snapkv_selections"] = llm.apply_model(snapkv_selections)[0]
    with open(out_path, "w") as f:
        json.dump({**extra, "num_blocks": engine.vllm_config.cache_config.num_gpu_blocks,
                   "block_size": engine.vllm_config.cache_config.block_size,
                   "spec_type": type(manager.kv_cache_spec).__name__,
                   "steps": steps, "outputs": texts}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
