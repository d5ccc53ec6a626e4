"""The one abstraction behind every compression method.

A `Method` turns one layer's calibration statistics into a `LayerFit`; a fit
knows the logit error it predicts at each rank (for per-layer rank allocation)
and produces that layer's thin tensors at a given rank. Methods work per KV
head; query heads of a GQA group share their KV head's basis.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vllm_thinkv.compress.calibrate import LayerStats
from vllm_thinkv.config import ARCHITECTURES, STATIC_ROPE_TYPES, rope_type
from vllm_thinkv.errors import ThinKVError


@dataclass(frozen=True)
class ModelInfo:
    """What methods need to know about the model being compressed."""

    architecture: str
    head_dim: int
    num_heads: int
    num_kv_heads: int
    inv_freq: torch.Tensor | None  # fp32 [d/2], the model's rotary frequencies (incl. scaling); None: per layer type (Gemma 3)
    rope_type: str
    max_positions: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, model: nn.Module) -> ModelInfo:
        """Read and validate a transformers Llama-family or Gemma 3 causal LM."""
        arch = type(model).__name__
        if arch not in ARCHITECTURES:
            raise ThinKVError(f"unsupported architecture {arch!r}; thinkv supports {', '.join(ARCHITECTURES)}")
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rotary = model.model.rotary_emb
        if getattr(cfg, "partial_rotary_factor", 1.0) not in (1, 1.0, None):
            raise ThinKVError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            raise ThinKVError(f"attention logit soft-capping ({cfg.attn_logit_softcapping}) is not supported: the thin "
                              "attention and the thinkv kernels compute plain softmax(q·k·scale)")
        return cls(
            architecture=arch,
            head_dim=head_dim,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            inv_freq=rotary.inv_freq.detach().float().cpu().clone() if hasattr(rotary, "inv_freq") else None,
            rope_type=rope_type(cfg),
            max_positions=int(getattr(cfg, "max_position_embeddings", 4096)),
        )

    def check_rope_subspace(self, model: nn.Module) -> None:
        """rope_subspace stores plain per-pair frequencies: the RoPE must be static and unscaled."""
        scaling = float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))
        if self.rope_type not in STATIC_ROPE_TYPES or scaling != 1.0:
            raise ThinKVError(
                f"RoPE type {self.rope_type!r} (attention scaling {scaling}) cannot be carried into a thin r-dim RoPE; "
                f"methods 'pairs'/'svd' support RoPE types {', '.join(STATIC_ROPE_TYPES)}; use --method pca"
            )


class LayerFit(ABC):
    """A method's fit of one layer (all its KV heads)."""

    @abstractmethod
    def error(self, rank: int) -> float:
        """Predicted logit mean-squared error at `rank`, summed over the layer's heads."""

    @abstractmethod
    def tensors(self, attn: nn.Module, rank: int) -> dict[str, torch.Tensor]:
        """Thin q/k-side tensors at `rank`, named relative to the layer's `self_attn`
        (e.g. "q_proj.weight", "rope_inv_freq", "k_basis")."""


class Method(ABC):
    """A compression method: statistics of one layer -> `LayerFit`."""

    name: ClassVar[str]

    @abstractmethod
    def fit(self, stats: LayerStats, info: ModelInfo, form: str) -> LayerFit:
        ...

    def params(self) -> dict:
        """Method parameters recorded in the checkpoint's provenance."""
        return {}


def head_rows(head: int, head_dim: int, dims: torch.Tensor) -> torch.Tensor:
    """Row indices of `dims` (within a head) in a [heads·d, hidden] projection."""
    return head * head_dim + dims


def selection_basis(kept_pairs: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[d, r] 0/1 basis selecting rotary pairs in thin neox layout: column j < r/2 is
    dim kept[j] (the "x" half), column j + r/2 is dim kept[j] + d/2 (the "y" half)."""
    m = head_dim // 2
    dims = torch.cat([kept_pairs, kept_pairs + m])
    basis = torch.zeros(head_dim, dims.numel(), dtype=dtype)
    basis[dims, torch.arange(dims.numel())] = 1
    return basis
