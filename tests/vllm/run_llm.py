"""Run one vLLM engine in a fresh process and dump what the tests compare.

Usage (from the repository root): python -m tests.vllm.run_llm SPEC.json OUT.json

Each engine start gets its own process because vLLM loads plugins once per
process and the tests need both stock (`VLLM_PLUGINS=""` or plugin present but
not asked) and thinkv engines. SPEC keys:
  model, engine (kwargs for vllm.LLM), batches (list of lists of prompts; each
  inner list is submitted as one `generate` call, in order), max_tokens,
  logprobs (top-k per generated token), prompt_logprobs (int or null).
A prompt is a string or a list of token ids.
"""

import json
import os
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(model=spec["model"], **spec.get("engine", {}))
    t_init = time.time() - t0
    params = SamplingParams(
        temperature=0.0,
        max_tokens=spec.get("max_tokens", 32),
        logprobs=spec.get("logprobs", 2),
        prompt_logprobs=spec.get("prompt_logprobs"),
        ignore_eos=True,
    )
    results = []
    for batch in spec["batches"]:
        prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in batch]
        for out in llm.generate(prompts, params, use_tqdm=False):
            c = out.outputs[0]
            results.append(
                {
                    "prompt_token_ids": list(out.prompt_token_ids),
                    "token_ids": list(c.token_ids),
                    "text": c.text,
                    # per generated token: {token_id: logprob} of the top-k (+ the sampled one)
                    "logprobs": [{str(k): v.logprob for k, v in lp.items()} for lp in (c.logprobs or [])],
                    "prompt_logprobs": [
                        None if lp is None else {str(k): v.logprob for k, v in lp.items()}
                        for lp in (out.prompt_logprobs or [])
                    ],
                    "num_cached_tokens": out.num_cached_tokens,
                }
            )
    engine_config = llm.llm_engine.vllm_config
    info = {
        "init_s": t_init,
        "results": results,
        "num_gpu_blocks": engine_config.cache_config.num_gpu_blocks,
        "block_size": engine_config.cache_config.block_size,
        "attention_backend": str(engine_config.attention_config.backend),
        "multiproc_method": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"),
    }
    if os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") == "1":
        # the probes must be importable by the worker, hence not defined in __main__
        from tests.vllm.probes import attention_classes

        info["attention_impls"] = sorted({c for w in llm.apply_model(attention_classes) for c in w})
        if spec.get("snapkv_selections"):
            from tests.vllm.probes import snapkv_selections

            info["snapkv_selections"] = llm.apply_model(snapkv_selections)[0]
    with open(out_path, "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
