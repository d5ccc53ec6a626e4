"""Helpers for end-to-end tests: run a vLLM engine in a subprocess, compare outputs."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_thinkv.bench.engine import OFFLINE_ENV, EngineFailed, run_in_subprocess  # noqa: F401  (EngineFailed: for tests)

REPO = Path(__file__).resolve().parents[2]

# One engine configuration for every comparison: fp32 so that stock and thinkv
# differ only by summation order; block 32 because stock CPU attention needs
# multiples of 32; a small token budget so long prompts are prefilled in chunks
# while short ones already decode (mixed batches).
ENGINE = {
    "dtype": "float32",
    "max_model_len": 2048,
    "block_size": 32,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 128,
    "enforce_eager": True,
    "seed": 0,
}

BASE_ENV = {
    **OFFLINE_ENV,
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; also skips vLLM's NUMA free-memory check
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # for the apply_model probes
}

# Run inside the workers with LLM.apply_model (tests/vllm/probes.py; importable from REPO).
PROBES = {
    "attention_impls": "tests.vllm.probes:attention_classes",
    "snapkv_selections": "tests.vllm.probes:snapkv_selections",
    "attention_ops": "tests.vllm.probes:attention_ops",
    "compilation": "tests.vllm.probes:compilation",
}
# What a spec leaves out: 32 tokens with top-2 log-probs (generate), 16 tokens (step, trace).
DEFAULTS = {"generate": {"max_tokens": 32, "logprobs": 2}, "step": {"max_tokens": 16}, "trace": {"max_tokens": 16}}


def run_engine(spec: dict[str, Any], env: dict[str, str] | None = None, timeout: int = 900, *, mode: str = "generate",
               probes: Sequence[str] = (), all_workers: bool = False, log: Path | None = None) -> dict[str, Any]:
    """One engine (`vllm_thinkv.bench.engine`, MODE) on SPEC in a fresh process; returns its result.

    Every generate run also reports which attention impl classes the workers use
    (`attention_impls`); `probes` names more of PROBES (e.g. "snapkv_selections",
    the first worker's, as there is one; with `all_workers`, a list with every worker's, in rank order);
    `log` keeps the engine's output there."""
    names = [*(["attention_impls"] if mode == "generate" else []), *probes]
    spec = {**DEFAULTS[mode], **spec, "mode": mode, "probes": {n: PROBES[n] for n in names}}
    run = run_in_subprocess(spec, env={**os.environ, **BASE_ENV, **(env or {})}, cwd=REPO, timeout=timeout, log=log)
    per_worker = run.pop("probes")
    if "attention_impls" in per_worker:
        run["attention_impls"] = sorted({c for worker in per_worker.pop("attention_impls") for c in worker})
    run.update({name: result if all_workers else result[0] for name, result in per_worker.items()})
    return run


def prompts_from_text(tokenizer, text: str, lengths: list[int], offset: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths cut from consecutive parts of `text`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][offset:]
    prompts, pos = [], 0
    for n in lengths:
        prompts.append(ids[pos : pos + n])
        pos += n
    return prompts


def assert_greedy_equal(stock: list[dict], other: list[dict], tie_tol: float = 1e-4, logprob_tol: float = 1e-3):
    """Greedy outputs must be token-for-token identical, except where the stock
    run's top-two log-probs tie within `tie_tol`: there the two runs may pick
    different tokens, so their log-probs for both tokens are compared instead and
    the rest of that sequence (now a different context) is not compared.
    Log-probs of every compared token must agree within `logprob_tol`."""
    assert len(stock) == len(other)
    for n, (a, b) in enumerate(zip(stock, other)):
        assert a["prompt_token_ids"] == b["prompt_token_ids"]
        for i, (ta, tb) in enumerate(zip(a["token_ids"], b["token_ids"])):
            lp_a, lp_b = a["logprobs"][i], b["logprobs"][i]
            if ta != tb:
                top = sorted(lp_a.values(), reverse=True)
                margin = top[0] - top[1] if len(top) > 1 else math.inf
                assert margin < tie_tol, (
                    f"request {n}: token {i} differs ({ta} vs {tb}) although stock's top-2 "
                    f"margin is {margin:.3g} (not a tie)"
                )
                for tok in (str(ta), str(tb)):
                    if tok in lp_a and tok in lp_b:
                        assert abs(lp_a[tok] - lp_b[tok]) < logprob_tol
                break
            assert abs(lp_a[str(ta)] - lp_b[str(tb)]) < logprob_tol, (
                f"request {n}: token {i} log-prob {lp_a[str(ta)]} vs {lp_b[str(tb)]}"
            )


# The prompt set of the stock-vs-thinkv comparisons: six lengths in one batch
# (one longer than 4 blocks of 32), then a prompt sharing 20 full blocks with
# the longest, which must be served from the prefix cache.
LENGTHS = [5, 23, 64, 130, 300, 700]


def check_served(run: dict, impl: str, num_results: int = len(LENGTHS) + 1,
                 cached: dict[int, int] | None = None) -> None:
    """The run used IMPL in every attention layer and vLLM's spawned engine processes, served
    NUM_RESULTS prompts, and served each prompt i of CACHED at least CACHED[i] tokens from the
    prefix cache (default: make_spec's last prompt, which shares 20 full blocks with the longest)."""
    assert run["attention_impls"] == [impl]
    assert run["multiproc_method"] == "spawn"  # vLLM started its engine processes with spawn
    assert len(run["results"]) == num_results
    for i, tokens in (cached or {len(LENGTHS): 20 * 32}).items():
        assert run["results"][i]["num_cached_tokens"] >= tokens, f"prompt {i} must hit the prefix cache"


def make_spec(model_dir, max_tokens: int = 32, **engine) -> dict:
    from transformers import AutoTokenizer

    from vllm_thinkv.hf.text import packaged_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = prompts_from_text(tok, packaged_text(), LENGTHS)
    prefix_hit = prompts[-1][: 20 * 32] + prompts_from_text(tok, packaged_text(), [40], offset=5000)[0]
    return {
        "model": str(model_dir),
        "engine": {**ENGINE, **engine},
        "batches": [prompts, [prefix_hit]],
        "max_tokens": max_tokens,
        "logprobs": 2,
    }
