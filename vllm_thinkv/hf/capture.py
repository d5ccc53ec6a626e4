"""Capture what each attention layer of a Llama-family HF model computes.

Calibration (`compress`), analysis (`analyze`) and tests all need per-layer,
per-head queries, keys and values, before and after RoPE. Rather than copying
each architecture's attention forward, a pre-hook on every `self_attn` module
re-runs the module's own projections (and Qwen3's / Gemma 3's q/k norms) on the layer input,
so the captured tensors are exactly what the model attends with.

Consumers receive one layer at a time through a callback and accumulate
statistics, so memory stays at one layer's activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF "neox" rotary convention: rotary pair i is dims (i, i + d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, d], cos/sin [T, d] -> RoPE(x)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


@dataclass
class LayerAttention:
    """One layer's attention inputs for one sequence (batch size 1).

    q [T, H, d], k [T, Hkv, d], v [T, Hkv, d] are pre-RoPE (after Qwen3's
    or Gemma 3's q/k norm, if any); cos/sin [T, d] are the layer's rotary tables; hidden
    [T, hidden_size] is the attention input (to run other q/k projections on it).
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    hidden: torch.Tensor | None = None
    scaling: float | None = None  # the layer's softmax scale (Gemma: query_pre_attn_scalar**-0.5); None: d**-0.5

    @property
    def q_rope(self) -> torch.Tensor:
        return apply_rope(self.q, self.cos, self.sin)

    @property
    def k_rope(self) -> torch.Tensor:
        return apply_rope(self.k, self.cos, self.sin)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The `self_attn` module of every decoder layer, in order."""
    layers = model.model.layers if hasattr(model, "model") else model.layers
    return [layer.self_attn for layer in layers]


def _project(attn: torch.nn.Module, hidden: torch.Tensor, proj: str, norm: str) -> torch.Tensor:
    x = getattr(attn, proj)(hidden)
    x = x.view(*hidden.shape[:-1], -1, attn.head_dim)
    if getattr(attn, norm, None) is not None:
        x = getattr(attn, norm)(x)
    return x


@torch.no_grad()
def capture(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    on_layer: Callable[[LayerAttention], None],
    *,
    stop_after: int | None = None,
) -> None:
    """Run `model` on `input_ids` [1, T] and call `on_layer` for each attention layer.

    `stop_after`: skip the rest of the forward pass after this layer index (the
    logits are not needed for calibration).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"capture expects input_ids of shape [1, T], got {tuple(input_ids.shape)}")

    class _Stop(Exception):
        pass

    handles = []
    for idx, attn in enumerate(attention_modules(model)):

        def hook(module, args, kwargs, idx=idx):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            h = hidden[0]
            on_layer(
                LayerAttention(
                    layer=idx,
                    q=_project(module, h, "q_proj", "q_norm"),
                    k=_project(module, h, "k_proj", "k_norm"),
                    v=_project(module, h, "v_proj", "_no_norm"),
                    cos=cos[0].to(h.dtype),
                    sin=sin[0].to(h.dtype),
                    hidden=h,
                    scaling=getattr(module, "scaling", None),
                )
            )
            if stop_after is not None and idx >= stop_after:
                raise _Stop

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
