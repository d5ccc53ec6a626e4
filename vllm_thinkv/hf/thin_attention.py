"""Thin-key attention: the math in one place, and a drop-in HF attention module.

This is the reference the vLLM model classes mirror. Two forms (see
`vllm_thinkv.config`), both caching k [*, Hkv, r] and v [*, Hkv, d] and keeping
the original softmax scale d**-0.5:

* ``rope_subspace`` (pairs, svd): ``q = q_proj(x)`` [H·r], ``k = k_proj(x)`` [Hkv·r],
  then RoPE *inside the r dims* with the layer's ``rope_inv_freq [Hkv, r/2]``
  (query head h uses row h // g, g = H / Hkv). Layout within a thin head: HF
  "neox"/rotate_half, i.e. thin pair j is dims (j, j + r/2) rotating at
  ``rope_inv_freq[kv, j] · position``. Angles are computed in fp32.
* ``post_rope_projection`` (pca; pairs on Qwen3 and Gemma 3): the original q/k (with
  Qwen3's or Gemma 3's q/k norms) and the original RoPE at full d, then
  ``q̃_h = q_hᵀ · q_basis[h // g]`` and ``k̃ = kᵀ · k_basis[kv]`` with
  ``q_basis``/``k_basis [Hkv, d, r]``.
* ``shared_projection`` (joint): as above, but one latent per group of S KV
  heads, ``z_s = k_basis[s]ᵀ [k_{sS}; …; k_{sS+S-1}]`` (``k_basis [Hkv/S, S·d, S·r]``),
  cached as the group's S slots of r dims; query head h (KV head g = h // g)
  scores ``q_basis[g]ᵀ q_h`` (``[Hkv, d, S·r]``) against the concatenated slots
  of its group (`shared_keys`).

Everything else (v_proj, o_proj, masks, sliding windows, the attention kernel
chosen by transformers) is the original module's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vllm_thinkv.hf.capture import rotate_half
from vllm_thinkv.kernels.torch_ops import equal_widths


def thin_rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, repeats: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, n·repeats, T, r] (fp32) for positions [B, T] and inv_freq [n, r/2].

    `repeats` = g expands per-KV-head frequencies to the query heads of each group
    (query head h uses KV head h // g, HF's `repeat_kv` order).
    """
    freqs = position_ids[:, None, :, None].float() * inv_freq.float()[None, :, None, :]  # [B, n, T, r/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    if repeats > 1:
        emb = emb.repeat_interleave(repeats, dim=1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox/rotate_half RoPE on x [B, n, T, r] with cos/sin broadcastable to it."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def project_heads(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv·g, T, d] · basis [Hkv, d, r] -> [B, Hkv·g, T, r]; heads of a group share their KV head's basis."""
    b, n, t, d = x.shape
    hkv = basis.shape[0]
    y = torch.einsum("bgjtd,gdr->bgjtr", x.view(b, hkv, n // hkv, t, d), basis.to(x.dtype))
    return y.reshape(b, n, t, basis.shape[-1])


def shared_keys(k: torch.Tensor, share: int) -> torch.Tensor:
    """Cached key slots [B, Hkv, T, r] -> each KV head's shared key [B, Hkv, T, S·r]: the
    concatenated slots of its group of S heads (what the kernels' key_share mode reads)."""
    if share == 1:
        return k
    b, hkv, t, r = k.shape
    z = k.view(b, hkv // share, share, t, r).transpose(2, 3).reshape(b, hkv // share, t, share * r)
    return z.repeat_interleave(share, dim=1)


def project_shared_keys(k: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Post-RoPE keys [B, Hkv, T, d] · basis [Hkv/S, S·d, S·r] -> latent slots [B, Hkv, T, r]."""
    b, hkv, t, d = k.shape
    groups, _, width = basis.shape
    share = hkv // groups
    stacked = k.view(b, groups, share, t, d).transpose(2, 3).reshape(b, groups, t, share * d)
    z = stacked @ basis.to(k.dtype)[None]  # [B, Hkv/S, T, S·r]
    return z.view(b, groups, t, share, width // share).transpose(2, 3).reshape(b, hkv, t, width // share)


class ThinKVAttention(nn.Module):
    """Replaces one Llama-family `self_attn` module with its thin-key version.

    Built from the original module (whose v_proj/o_proj, norms, config and
    sliding window it keeps); the q/k-side tensors are created empty at the
    given rank and filled by `load_thin_tensors` or `compress_model`'s output.
    """

    def __init__(self, orig: nn.Module, form: str, rank: int, share_group: int = 1):
        super().__init__()
        cfg = orig.config
        self.config = cfg
        self.layer_idx = orig.layer_idx
        self.head_dim = orig.head_dim  # d: the value head size (and the original q/k size)
        self.rank = rank
        self.form = form
        self.share_group = share_group  # KV heads per key latent (shared_projection), else 1
        self.num_key_value_groups = orig.num_key_value_groups
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.scaling = orig.scaling  # the original d ** -0.5
        self.attention_dropout = orig.attention_dropout
        self.is_causal = True
        if hasattr(orig, "sliding_window"):
            self.sliding_window = orig.sliding_window
        else:  # Mistral reads it from the config at call time
            self.sliding_window = getattr(cfg, "sliding_window", None)
        self.v_proj = orig.v_proj
        self.o_proj = orig.o_proj
        dtype, device = orig.q_proj.weight.dtype, orig.q_proj.weight.device
        if form == "rope_subspace":
            has_bias = orig.q_proj.bias is not None
            hidden = orig.q_proj.in_features
            self.q_proj = nn.Linear(hidden, self.num_heads * rank, bias=has_bias, dtype=dtype, device=device)
            self.k_proj = nn.Linear(hidden, self.num_kv_heads * rank, bias=has_bias, dtype=dtype, device=device)
            self.register_buffer("rope_inv_freq", torch.zeros(self.num_kv_heads, rank // 2, device=device))
        elif form == "post_rope_projection":
            self.q_proj, self.k_proj = orig.q_proj, orig.k_proj
            self.q_norm = getattr(orig, "q_norm", None)
            self.k_norm = getattr(orig, "k_norm", None)
            shape = (self.num_kv_heads, self.head_dim, rank)
            self.q_basis = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
            self.k_basis = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        elif form == "shared_projection":
            self.q_proj, self.k_proj = orig.q_proj, orig.k_proj
            self.q_norm = getattr(orig, "q_norm", None)
            self.k_norm = getattr(orig, "k_norm", None)
            s, d = share_group, self.head_dim
            self.q_basis = nn.Parameter(torch.zeros(self.num_kv_heads, d, s * rank, dtype=dtype, device=device))
            self.k_basis = nn.Parameter(torch.zeros(self.num_kv_heads // s, s * d, s * rank, dtype=dtype, device=device))
        else:
            raise ValueError(f"unknown thin form {form!r}")

    def _apply(self, fn, recurse: bool = True):
        # Keep the rotary frequencies in fp32 through `.to(bfloat16)`: bf16 angles are off by whole radians at long context.
        inv = getattr(self, "rope_inv_freq", None)
        super()._apply(fn, recurse)
        if inv is not None:
            device = fn(torch.empty(0, device=inv.device)).device
            self.rope_inv_freq = inv.to(device=device, dtype=torch.float32)
        return self

    def thin_qk(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, hidden] -> RoPE'd thin q [B, H, T, S·r] (S = 1 unless shared), k slots [B, Hkv, T, r]."""
        b, t, _ = hidden_states.shape
        if self.form == "rope_subspace":
            if position_ids is None:
                raise ValueError("ThinKVAttention (rope_subspace) needs position_ids from the decoder layer")
            if position_ids.shape[0] != b:
                position_ids = position_ids.expand(b, -1)
            q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.rank).transpose(1, 2)
            k = self.k_proj(hidden_states).view(b, t, self.num_kv_heads, self.rank).transpose(1, 2)
            cos_k, sin_k = thin_rope_cos_sin(position_ids, self.rope_inv_freq)
            cos_q = cos_k.repeat_interleave(self.num_key_value_groups, dim=1)
            sin_q = sin_k.repeat_interleave(self.num_key_value_groups, dim=1)
            return apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings  # [B, T, d]
        q = apply_rotary(q.transpose(1, 2), cos[:, None], sin[:, None])
        k = apply_rotary(k.transpose(1, 2), cos[:, None], sin[:, None])
        if self.form == "shared_projection":
            return project_heads(q, self.q_basis), project_shared_keys(k, self.k_basis)
        return project_heads(q, self.q_basis), project_heads(k, self.k_basis)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        b, t, _ = hidden_states.shape
        q, k = self.thin_qk(hidden_states, kwargs.get("position_ids"), position_embeddings)
        v = self.v_proj(hidden_states).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        k = shared_keys(k, self.share_group)
        # One head width for q/k and v (the padded output lanes are dropped): torch's fused CPU attention
        # needs equal widths and otherwise materialises every score (3x slower on a 4k-token passkey prompt).
        dv = v.shape[-1]
        q, k, v = equal_widths(q, k, v)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        out = out[..., :dv].reshape(b, t, -1).contiguous()
        return self.o_proj(out), weights
