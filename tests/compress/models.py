"""Tiny in-memory Llama-family models with sharp attention, for exactness tests.

Random init gives near-uniform attention (q·k ≈ 0), under which a wrong thin
model could still match the original to 1e-4. The q/k projections are scaled
so attention logits are O(10): every test also checks that a *lossy* thin model
differs clearly, which proves the comparison is sensitive.
"""

from __future__ import annotations

import functools

import torch

ARCHS = ("llama", "llama-g3", "mistral", "qwen2", "qwen3", "gemma3")
QK_NORM_ARCHS = ("qwen3", "gemma3")  # per-head q/k RMSNorm before RoPE: no svd


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str, seed: int = 0, num_layers: int = 2) -> torch.nn.Module:
    """Cached: callers must not modify it (thin models are built on deep copies)."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=num_layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if arch == "llama":
        cls, cfg = LlamaForCausalLM, LlamaConfig(**common, rope_parameters=rope)
    elif arch == "llama-g3":
        cls, cfg = LlamaForCausalLM, LlamaConfig(**{**common, "num_attention_heads": 6, "hidden_size": 384}, rope_parameters=rope)
    elif arch == "mistral":
        cls, cfg = MistralForCausalLM, MistralConfig(**common, rope_parameters=rope, sliding_window=None)
    elif arch == "qwen2":
        cls, cfg = Qwen2ForCausalLM, Qwen2Config(**common, rope_parameters=rope, use_sliding_window=False)
    elif arch == "qwen3":
        cls, cfg = Qwen3ForCausalLM, Qwen3Config(**common, rope_parameters=rope, use_sliding_window=False)
    elif arch == "gemma3":
        # layer 0 slides over 32 tokens (local RoPE base), layer 1 is global; a softmax scale that is not
        # d**-0.5 (query_pre_attn_scalar 40), so keeping the original scale is tested too
        types = ["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"] * (num_layers % 2)
        cls, cfg = Gemma3ForCausalLM, Gemma3TextConfig(
            **common, query_pre_attn_scalar=40, sliding_window=32, layer_types=types,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    sharpen(model)
    return model


@torch.no_grad()
def sharpen(model: torch.nn.Module, factor: float = 8.0) -> torch.nn.Module:
    """Scale q/k projections (and Qwen2's biases) so attention is far from uniform."""
    for layer in model.model.layers:
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.mul_(factor)
            if proj.bias is not None:
                proj.bias.normal_(0, 0.5)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3, Gemma 3: norms fix the scale; sharpen via the gains
            attn.q_norm.weight.fill_(3.0)
            attn.k_norm.weight.fill_(3.0)
    return model


def calib_windows(model: torch.nn.Module, n: int = 2, ctx: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, ctx), generator=g)


def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())
