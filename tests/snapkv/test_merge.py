"""The `merge` policy against a float64 loop written from its definition (`policies.merge`), and the
two properties the definition is chosen for, checked against the queries themselves: over the
window queries, a merged slot receives exactly the attention its tokens received, and contributes
exactly their summed value mass."""

import math

import pytest
import torch

from vllm_thinkv.snapkv import SnapKVConfig
from vllm_thinkv.snapkv.policies import PromptKV, make_policy, merges
from vllm_thinkv.snapkv.policies.merge import nearest_targets
from vllm_thinkv.snapkv.selection import select, window_attention

from .test_selection import reference_selection

SCALE = 0.25


def probabilities(window_q, keys, h, g):
    """[g, w, P] float64 window attention of KV head h's query heads, by loops (causal inside the window)."""
    w = window_q.shape[0]
    prompt_len = keys.shape[0]
    out = torch.zeros(g, w, prompt_len, dtype=torch.float64)
    for i in range(g):
        for j in range(w):
            pos = prompt_len - w + j
            logits = keys[: pos + 1, h].double() @ window_q[j, h * g + i].double() * SCALE
            out[i, j, : pos + 1] = logits.softmax(0)
    return out


def reference_merge(window_q, keys, values, config, budget):
    """Per KV head: kept slots (SnapKV's), and for each the merged key, value and ln count, by loops."""
    w = config.window
    prompt_len, num_kv_heads, _ = keys.shape
    n = prompt_len - w
    g = window_q.shape[1] // num_kv_heads
    sinks = min(config.sinks, budget)
    kept = reference_selection(window_q, keys, values, SCALE, config, budget)
    out = []
    for h in range(num_kv_heads):
        a = probabilities(window_q, keys, h, g).flatten(0, 1)  # [g*w, P]
        slots = kept[h].tolist()
        targets = slots[sinks:]
        groups = {t: [t] for t in slots}
        for j in range(n):
            if j not in groups and targets:
                groups[min(targets, key=lambda t: (abs(j - t), t))].append(j)  # nearest, ties to the earlier
        merged = []
        for t in slots:
            members = sorted(groups[t])
            mass = {j: float(a[:, j].sum()) for j in members}
            total = sum(mass.values())
            wts = {j: mass[j] / total for j in members}
            key = sum(wts[j] * keys[j, h].double() for j in members)
            value = sum(wts[j] * values[j, h].double() for j in members)
            received = sum(math.exp(sum(wts[j] * math.log(a[row, j]) for j in members)) for row in range(a.shape[0]))
            merged.append((key, value, 0.0 if len(members) == 1 else math.log(total) - math.log(received), members))
        out.append((kept[h], merged))
    return out


def _data(seed, heads, kv_heads, r, d, prompt_len=90):
    torch.manual_seed(seed)
    q = torch.randn(8, heads, r, dtype=torch.float64)
    k = torch.randn(prompt_len, kv_heads, r, dtype=torch.float64) * torch.rand(prompt_len, 1, 1, dtype=torch.float64) * 2
    v = torch.randn(prompt_len, kv_heads, d, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("heads, kv_heads, r, d", [(6, 2, 16, 32), (3, 3, 8, 16)])
def test_merge_matches_definition(sinks, heads, kv_heads, r, d):
    q, k, v = _data(4, heads, kv_heads, r, d)
    config = SnapKVConfig(budget=20, window=8, kernel_size=5, policy="merge", sinks=sinks)
    g = heads // kv_heads
    policy = make_policy(config)
    got = policy.select(PromptKV(k, v, lambda h: probabilities(q, k, h, g)), 20)  # float64 throughout
    fp32 = select(policy, q.float(), k.float(), v.float(), SCALE, 20)  # the backend's float32 path
    assert torch.equal(fp32.indices, got.indices)
    for h, (kept, merged) in enumerate(reference_merge(q, k, v, config, 20)):
        assert torch.equal(got.indices[h], kept)
        assert sorted(j for m in merged for j in m[3]) == list(range(90 - 8))  # every token in one slot
        for s, (key, value, log_count, members) in enumerate(merged):
            torch.testing.assert_close(got.keys[h, s], key, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(got.values[h, s], value, rtol=1e-10, atol=1e-10)
            assert abs(float(got.log_counts[h, s]) - log_count) < 1e-9, (h, s, members)
        torch.testing.assert_close(fp32.keys[h].double(), got.keys[h], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fp32.values[h].double(), got.values[h], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fp32.log_counts[h].double(), got.log_counts[h], rtol=1e-4, atol=1e-4)
    assert (got.log_counts > 0.1).any()  # some slots really stand for several tokens


def test_merged_slot_keeps_its_tokens_attention_and_value_mass():
    """With the window queries themselves (not the probabilities the policy saw): the merged slot's weight
    c·exp(q·k̄·scale)/Z summed over window queries and heads equals its tokens' total weight, and
    c·Σ exp(q·k̄·scale)/Z · v̄ equals their summed weighted values (Z: each query's own full softmax sum)."""
    q, k, v = _data(5, 4, 2, 16, 24)
    config = SnapKVConfig(budget=16, window=8, policy="merge", sinks=2)
    sel = make_policy(config).select(PromptKV(k, v, lambda h: probabilities(q, k, h, 2)), 16)
    prompt_len, n = 90, 82
    for h in range(2):
        slots = nearest_targets(sel.indices[h], 2, n)
        for s in range(16):
            members = (slots == s).nonzero().flatten()
            mass = torch.zeros((), dtype=torch.float64)
            value_mass = torch.zeros(24, dtype=torch.float64)
            slot_mass = torch.zeros((), dtype=torch.float64)
            for j in range(8):
                for i in range(2):
                    qv = q[j, h * 2 + i]
                    logits = k[: prompt_len - 8 + j + 1, h] @ qv * SCALE
                    z = logits.exp().sum()
                    mass += logits[members].exp().sum() / z
                    value_mass += (logits[members].exp() / z) @ v[members, h]
                    slot_mass += sel.log_counts[h, s].exp() * (sel.keys[h, s] @ qv * SCALE).exp() / z
            torch.testing.assert_close(slot_mass, mass, rtol=1e-9, atol=0)
            torch.testing.assert_close(mass * sel.values[h, s], value_mass, rtol=1e-9, atol=1e-12)


def test_nearest_targets():
    kept = torch.tensor([0, 1, 5, 9])
    # sinks 0 and 1 absorb nothing; 7 is as near to 5 as to 9 and goes to the earlier
    assert nearest_targets(kept, 2, 12).tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3]
    assert nearest_targets(kept, 0, 12).tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]  # 3: a tie, to 1
    assert nearest_targets(torch.tensor([0, 1]), 2, 5).tolist() == [0, 1, -1, -1, -1]  # only sinks: dropped


def test_only_merge_merges():
    for name in ("snapkv", "recent", "value_aware", "keydiff"):
        assert not merges(SnapKVConfig(budget=8, window=2, policy=name))
    assert merges(SnapKVConfig(budget=8, window=2, policy="merge"))
    q, k, v = _data(6, 2, 1, 8, 8, 40)
    plain = select(make_policy(SnapKVConfig(budget=8, window=4)), q.float(), k.float(), v.float(), SCALE, 8)
    assert plain.log_counts is None and plain.keys is None
