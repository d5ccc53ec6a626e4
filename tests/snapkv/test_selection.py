"""SnapKV scores/top-k against a float64 loop written from the paper's definition."""

import pytest
import torch

from vllm_thinkv.snapkv import SnapKVConfig
from vllm_thinkv.snapkv.selection import select_tokens, snapkv_scores, top_tokens


def reference_scores(window_q, keys, scale, config):
    w, num_heads, _ = window_q.shape
    prompt_len, num_kv_heads, _ = keys.shape
    g = num_heads // num_kv_heads
    half = config.kernel_size // 2
    out = torch.zeros(num_kv_heads, prompt_len - w, dtype=torch.float64)
    for h in range(num_heads):
        votes = torch.zeros(prompt_len - w, dtype=torch.float64)
        for j in range(w):
            pos = prompt_len - w + j
            logits = keys[: pos + 1, h // g].double() @ window_q[j, h].double() * scale
            votes += logits.softmax(0)[: prompt_len - w]
        pooled = torch.empty_like(votes)
        for t in range(prompt_len - w):
            lo, hi = max(0, t - half), min(prompt_len - w, t + half + 1)
            # avg pooling counts the zero padding, as torch's avg_pool1d does
            pooled[t] = votes[lo:hi].max() if config.pooling == "max" else votes[lo:hi].sum() / config.kernel_size
        out[h // g] += pooled / g
    return out


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("heads, kv_heads, r", [(9, 3, 64), (4, 4, 16), (8, 2, 24)])
def test_scores_match_definition(pooling, heads, kv_heads, r):
    torch.manual_seed(0)
    config = SnapKVConfig(budget=20, window=6, kernel_size=5, pooling=pooling)
    q, k = torch.randn(6, heads, r), torch.randn(50, kv_heads, r)
    got = snapkv_scores(q, k, 0.3, config)
    ref = reference_scores(q, k, 0.3, config)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_top_tokens_in_position_order_ties_to_earlier():
    scores = torch.tensor([[0.1, 0.9, 0.9, 0.5, 0.9, 0.2]])
    assert top_tokens(scores, 3).tolist() == [[1, 2, 4]]
    assert top_tokens(scores, 2).tolist() == [[1, 2]]


def test_recent_policy_keeps_the_tokens_before_the_window():
    config = SnapKVConfig(budget=5, window=3, policy="recent")
    keys = torch.randn(20, 2, 8)
    kept = select_tokens(torch.randn(3, 4, 8), keys, 1.0, config, 5)
    assert kept.tolist() == [[12, 13, 14, 15, 16]] * 2
