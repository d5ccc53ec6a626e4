"""Each compaction policy's selection against a float64 loop written from its paper's definition."""

import pytest
import torch

from vllm_thinkv.snapkv import SnapKVConfig
from vllm_thinkv.snapkv.config import POLICIES
from vllm_thinkv.snapkv.policies import REGISTRY, PromptKV, make_policy, top_tokens
from vllm_thinkv.snapkv.selection import select_tokens, window_attention


def reference_scores(window_q, keys, scale, config):
    """SnapKV: window attention summed over the window queries, pooled, averaged over the group."""
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


def ranked(score_list, exclude=()):
    """Positions by descending score, ties to the earlier position."""
    return [t for t in sorted(range(len(score_list)), key=lambda t: (-score_list[t], t)) if t not in exclude]


def reference_selection(window_q, keys, values, scale, config, budget):
    """The kept positions per KV head: the first `sinks`, then the policy's best."""
    w = config.window
    prompt_len, num_kv_heads, _ = keys.shape
    n = prompt_len - w
    sinks = min(config.sinks, budget)
    out = []
    for h in range(num_kv_heads):
        kept = list(range(sinks))
        if config.policy == "recent":
            kept += list(range(n - (budget - sinks), n))
        elif config.policy in ("snapkv", "merge"):  # merge keeps SnapKV's tokens (and folds the rest in)
            kept += ranked(reference_scores(window_q, keys, scale, config)[h].tolist(), kept)[: budget - sinks]
        elif config.policy == "value_aware":
            # CriticalKV's two stages: half of what the sinks leave by attention, the rest by attention x |v|_1
            attn = reference_scores(window_q, keys, scale, config)[h].tolist()
            kept += ranked(attn, kept)[: (budget - sinks) // 2]
            norms = [float(values[t, h].double().abs().sum()) for t in range(n)]
            product = [(attn[t] + 1e-4) * norms[t] for t in range(n)]
            kept += ranked(product, kept)[: budget - len(kept)]
        elif config.policy == "keydiff":
            k = keys[:, h].double()
            anchor = sum(k[t] / k[t].norm() for t in range(prompt_len)) / prompt_len
            diff = [-float(k[t] @ anchor / (k[t].norm() * anchor.norm())) for t in range(n)]
            kept += ranked(diff, kept)[: budget - sinks]
        out.append(sorted(kept))
    return torch.tensor(out)


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("heads, kv_heads, r", [(9, 3, 64), (4, 4, 16), (8, 2, 24)])
def test_scores_match_definition(pooling, heads, kv_heads, r):
    torch.manual_seed(0)
    config = SnapKVConfig(budget=20, window=6, kernel_size=5, pooling=pooling)
    q, k, v = torch.randn(6, heads, r), torch.randn(50, kv_heads, r), torch.randn(50, kv_heads, 32)
    got = make_policy(config).scores(PromptKV(k, v, window_attention(q, k, 0.3)), 20)
    ref = reference_scores(q, k, 0.3, config)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("heads, kv_heads, r, d", [(9, 3, 64, 64), (8, 2, 16, 48)])
def test_selection_matches_definition(policy, sinks, heads, kv_heads, r, d):
    torch.manual_seed(1)
    config = SnapKVConfig(budget=24, window=8, kernel_size=5, policy=policy, sinks=sinks)
    # random data with per-token value scales and a few strong keys, so every score matters
    q, k = torch.randn(8, heads, r), torch.randn(120, kv_heads, r) * torch.rand(120, 1, 1) * 2
    v = torch.randn(120, kv_heads, d) * torch.rand(120, kv_heads, 1) * 3
    got = select_tokens(make_policy(config), q, k, v, 0.25, 24)
    want = reference_selection(q, k, v, 0.25, config, 24)
    assert got.shape == (kv_heads, 24)
    assert torch.equal(got, want)
    if sinks:
        assert (got[:, :sinks] == torch.arange(sinks)).all()


def test_policies_differ_on_the_same_data():
    """The scores matter: on the same random prompt the four dropping policies keep different sets
    (`merge` keeps SnapKV's, tests/snapkv/test_merge.py)."""
    torch.manual_seed(2)
    q, k, v = torch.randn(8, 4, 16), torch.randn(200, 2, 16), torch.randn(200, 2, 32) * torch.rand(200, 2, 1)
    dropping = [p for p in POLICIES if not REGISTRY[p].merges]
    kept = {p: select_tokens(make_policy(SnapKVConfig(budget=40, window=8, policy=p)), q, k, v, 0.25, 40)
            for p in dropping}
    sets = [frozenset(map(tuple, kept[p].tolist())) for p in dropping]
    assert len(set(sets)) == len(dropping) == 4


def test_query_agnostic_policies_ignore_the_queries():
    torch.manual_seed(3)
    k, v = torch.randn(64, 2, 16), torch.randn(64, 2, 16)
    for policy in ("keydiff", "recent"):
        p = make_policy(SnapKVConfig(budget=16, window=4, policy=policy, sinks=2))
        assert not p.uses_queries
        without = select_tokens(p, None, k, v, 0.25, 16)
        assert torch.equal(without, select_tokens(p, torch.randn(4, 4, 16), k, v, 0.25, 16))
    for policy in ("snapkv", "value_aware", "merge"):
        assert make_policy(SnapKVConfig(budget=16, window=4, policy=policy)).uses_queries


def test_sinks_larger_than_a_ratio_budget_keep_only_sinks():
    p = make_policy(SnapKVConfig(budget_ratio=0.1, window=4, policy="keydiff", sinks=8))
    kept = select_tokens(p, None, torch.randn(64, 2, 16), torch.randn(64, 2, 16), 1.0, 6)
    assert kept.tolist() == [list(range(6))] * 2


def test_registry_matches_the_config_names():
    assert list(REGISTRY) == list(POLICIES)


def test_top_tokens_in_position_order_ties_to_earlier():
    scores = torch.tensor([[0.1, 0.9, 0.9, 0.5, 0.9, 0.2]])
    assert top_tokens(scores, 3).tolist() == [[1, 2, 4]]
    assert top_tokens(scores, 2).tolist() == [[1, 2]]


def test_recent_policy_keeps_the_tokens_before_the_window():
    config = SnapKVConfig(budget=5, window=3, policy="recent")
    keys = torch.randn(20, 2, 8)
    kept = select_tokens(make_policy(config), torch.randn(3, 4, 8), keys, torch.randn(20, 2, 8), 1.0, 5)
    assert kept.tolist() == [[12, 13, 14, 15, 16]] * 2
