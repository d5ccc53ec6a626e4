"""`thinkv analyze` on a model whose answers are known by construction (see conftest)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.analyze.conftest import HEAD_DIM, K_RANK, KV_HEADS


def test_rank_k_key_projection_has_weight_effective_rank_k(analysis):
    for p, ranks in analysis["weights"]["k_proj"]["effective_rank"].items():
        assert ranks[0] == [K_RANK] * KV_HEADS, p
    # the other layers' random projections are full rank at 99% energy
    assert min(analysis["weights"]["k_proj"]["effective_rank"]["0.99"][1]) > K_RANK


def test_rank_k_keys_have_rank_at_most_k_before_rope_and_2k_after(analysis):
    pre = analysis["activations"]["k_pre"]["effective_rank"]["0.99"][0]
    post = analysis["activations"]["k_rope"]["effective_rank"]["0.99"][0]
    for h in range(KV_HEADS):
        assert 1 <= pre[h] <= K_RANK
        # RoPE turns each of the K_RANK written dims into a rotating pair: rank <= 2k, and higher than before
        assert pre[h] < post[h] <= 2 * K_RANK


def test_combined_head_is_predicted_exactly_from_two_peers(analysis):
    for kind in ("k_pre", "k_rope", "v"):  # a scalar combination commutes with RoPE
        p = analysis["predictability"][kind]
        assert p["k"] == [1, 2]  # 3 KV heads: at most 2 references
        for target in range(KV_HEADS):  # each of the three is a combination of the other two
            assert sorted(p["refs"][1][target]) == sorted(set(range(KV_HEADS)) - {target}), kind
            assert p["r2_heldout"][1][target][1] > 0.9999, (kind, target)
            assert p["r2_heldout"][1][target][0] < 0.999, (kind, target)  # one peer is not enough


def test_constant_keys_and_values(analysis):
    adj = analysis["adjacent_cosine"]
    for kind in ("k_pre", "v"):
        assert all(c == pytest.approx(1.0, abs=1e-5) for head in adj[kind][2] for c in head if c is not None)
        assert analysis["activations"][kind]["effective_rank"]["0.99"][2] == [1] * KV_HEADS
        assert analysis["activations"][kind]["effective_rank_centred"]["0.99"][2] == [0] * KV_HEADS
        assert analysis["predictability"][kind]["r2_heldout"][2][0] == [None, None]  # SST = 0: undefined


def test_constant_keys_after_rope_follow_the_rotation(analysis, constructed_llama):
    """cos(R_t b, R_{t+o} b) = sum_i (b_i^2 + b_{i+d/2}^2) cos(o theta_i) / |b|^2 for every t."""
    from safetensors.torch import load_file

    bias = load_file(constructed_llama / "model.safetensors")["model.layers.2.self_attn.k_proj.bias"].double()
    theta = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    adj = analysis["adjacent_cosine"]
    for h in range(KV_HEADS):
        b = bias[h * HEAD_DIM : (h + 1) * HEAD_DIM]
        pair_energy = b[: HEAD_DIM // 2] ** 2 + b[HEAD_DIM // 2 :] ** 2
        for i, o in enumerate(adj["offsets"]):
            if o >= analysis["settings"]["ctx"]:
                assert adj["k_rope"][2][h][i] is None
                continue
            expected = float((pair_energy * torch.cos(o * theta)).sum() / pair_energy.sum())
            assert adj["k_rope"][2][h][i] == pytest.approx(expected, abs=1e-4)


def test_every_method_is_exact_at_full_rank(analysis):
    le = analysis["logit_error"]
    assert set(le["methods"]) == {"pairs", "pca", "svd", "joint"}
    assert le["ranks"][-1] == HEAD_DIM
    for method, res in le["methods"].items():
        for layer in res["error"]:
            for head in layer:
                assert head[-1] < 1e-8, method


def test_keys_in_four_rotary_pairs_need_rank_8(analysis):
    """Layer 0's keys live in 4 rotary pairs: q.k uses 8 dims, which every method finds."""
    le = analysis["logit_error"]
    assert le["ranks"][0] == 2 * K_RANK
    for method, res in le["methods"].items():
        for head in res["error"][0]:
            assert head[0] < 1e-4, method
        for t in res["rank_at_error"]:
            assert res["rank_at_error"][t][0] == [2 * K_RANK] * KV_HEADS


def test_headline_is_the_mean_of_the_per_head_numbers(analysis):
    ranks = analysis["activations"]["v"]["effective_rank"]["0.95"]
    flat = [r for layer in ranks for r in layer]
    assert analysis["headline"]["effective_rank"]["v"]["0.95"] == pytest.approx(sum(flat) / len(flat), rel=1e-5)  # JSON keeps 6 digits
    assert not math.isnan(analysis["headline"]["r2_heldout"]["k_pre"]["2"])
