"""A tiny Llama whose attention weights are set so that the analysis answers are known.

Layer 0: every KV head's k_proj has exactly rank K_RANK with equal singular
         values, and writes only the first K_RANK dims of the head (the fastest
         rotary pairs), so pre-RoPE keys have rank <= K_RANK and post-RoPE keys
         rank <= 2 * K_RANK.
Layer 1: KV head 2's k_proj and v_proj rows are MIX[0] * head 0 + MIX[1] * head 1,
         so each KV head is an exact linear combination of the other two.
Layer 2: k_proj and v_proj weights are zero and their biases random: every
         token's key (value) is the same vector.
"""

from __future__ import annotations

import json

import pytest
import torch

HEAD_DIM, HEADS, KV_HEADS, LAYERS, HIDDEN = 32, 6, 3, 3, 192
K_RANK = 4
MIX = (0.7, -1.3)
CTX, MAX_TOKENS = 64, 1024


def build_constructed(out):
    from transformers import LlamaForCausalLM

    from tests.tiny import build_tiny_llama

    build_tiny_llama(out, head_dim=HEAD_DIM, num_heads=HEADS, num_kv_heads=KV_HEADS, num_layers=LAYERS, hidden_size=HIDDEN)
    model = LlamaForCausalLM.from_pretrained(out, attention_bias=True)
    g = torch.Generator().manual_seed(1)
    d = HEAD_DIM
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.bias.zero_()
        k0 = model.model.layers[0].self_attn.k_proj.weight
        k0.zero_()
        for h in range(KV_HEADS):
            basis, _ = torch.linalg.qr(torch.randn(HIDDEN, K_RANK, generator=g))  # orthonormal columns
            k0[h * d : h * d + K_RANK] = 0.5 * basis.T
        for proj in (model.model.layers[1].self_attn.k_proj, model.model.layers[1].self_attn.v_proj):
            w = proj.weight
            w[2 * d : 3 * d] = MIX[0] * w[0:d] + MIX[1] * w[d : 2 * d]
        attn2 = model.model.layers[2].self_attn
        for proj in (attn2.k_proj, attn2.v_proj):
            proj.weight.zero_()
            proj.bias.copy_(torch.randn(KV_HEADS * d, generator=g))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def constructed_llama(tmp_path_factory):
    return build_constructed(tmp_path_factory.mktemp("constructed-llama"))


@pytest.fixture(scope="session")
def analysis_dir(constructed_llama, tmp_path_factory):
    """`thinkv analyze` run once, end to end, on the constructed model (packaged text)."""
    from vllm_thinkv.cli import main

    out = tmp_path_factory.mktemp("analysis")
    rc = main(["analyze", str(constructed_llama), "--out", str(out), "--ctx", str(CTX), "--max-tokens", str(MAX_TOKENS)])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def analysis(analysis_dir):
    return json.loads((analysis_dir / "analysis.json").read_text())
