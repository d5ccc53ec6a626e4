"""An independent eager attention for the untouched model, with a pluggable score function.

It shares no code with `vllm_thinkv.hf.thin_attention`: q/k/v come from the
original projections (+ Qwen3 norms), RoPE from the model's own cos/sin, and
the score function decides what q·k is (masked dims, projections, complex
math). Softmax scale: the original d**-0.5; causal; values and o_proj untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch


def _rot(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


ScoreFn = Callable[[int, dict], torch.Tensor]  # (layer, tensors) -> unscaled scores [B, H, T, T]


def reference_model(model: torch.nn.Module, score_fn: ScoreFn) -> torch.nn.Module:
    """A deep copy of `model` whose attention scores are `score_fn(layer, t)`, where t holds
    q_pre [B,H,T,d], k_pre [B,Hkv,T,d], q_rope, k_rope and positions [T]."""
    ref = copy.deepcopy(model)
    for idx, layer in enumerate(ref.model.layers):
        attn = layer.self_attn

        def forward(hidden_states, position_embeddings=None, attention_mask=None, attn=attn, idx=idx, **kw):
            b, t, _ = hidden_states.shape
            d, hkv = attn.head_dim, attn.config.num_key_value_heads
            q = attn.q_proj(hidden_states).view(b, t, -1, d)
            k = attn.k_proj(hidden_states).view(b, t, -1, d)
            v = attn.v_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)
            if getattr(attn, "q_norm", None) is not None:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            cos, sin = (x[:, None] for x in position_embeddings)
            tensors = {
                "q_pre": q,
                "k_pre": k,
                "q_rope": q * cos + _rot(q) * sin,
                "k_rope": k * cos + _rot(k) * sin,
                "positions": torch.arange(t),
            }
            scores = score_fn(idx, tensors) * d**-0.5
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out = probs @ v.repeat_interleave(q.shape[1] // hkv, dim=1)
            return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None

        attn.forward = forward
    return ref


def expand_groups(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, ...] -> [B, H, ...], query head h using KV head h // g."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)
