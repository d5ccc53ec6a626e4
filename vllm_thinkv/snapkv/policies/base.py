"""What a compaction policy sees, what it returns, and the steps every policy shares.

A policy scores the prompt tokens outside the window, per KV head; the shared
`Policy.select` keeps the first `sinks` positions (StreamingLLM's attention sinks),
then the best-scored tokens, in position order. The window (the last `window`
prompt tokens) is always kept by the caller. Both the vLLM backend
(`backend.snapkv_layer`) and the Hugging Face reference (`hf.snapkv`) call
`select`; they differ only in where the window attention comes from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from vllm_thinkv.snapkv.config import SnapKVConfig


@dataclass(frozen=True)
class PromptKV:
    """One request's prompt in one layer, as cached.

    `window_attention(h)` gives KV head h's window attention: the softmax
    probabilities [g, w, P] of the last w prompt queries of its g query heads over
    the prompt (causal inside the window). None when no window queries exist: only
    a policy with `uses_queries = False` can run then."""

    keys: torch.Tensor  # [P, Hkv, r], post-RoPE as cached
    values: torch.Tensor  # [P, Hkv, d]
    window_attention: Callable[[int], torch.Tensor] | None


@dataclass(frozen=True)
class Selection:
    """A policy's result: per KV head, the kept prompt tokens outside the window.

    Dropping policies return indices only: the kept slots hold those tokens' cached keys and
    values. A merging policy (`merge`) also returns what each kept slot holds instead (the
    merged key and value, in the scoring dtype) and the natural log of how many tokens it
    stands for, which the attention kernels add to its logit (`log_counts`); the window's
    slots always hold themselves with count 1."""

    indices: torch.Tensor  # [Hkv, budget], position order
    keys: torch.Tensor | None = None  # [Hkv, budget, r]
    values: torch.Tensor | None = None  # [Hkv, budget, d]
    log_counts: torch.Tensor | None = None  # [Hkv, budget]


@dataclass(frozen=True)
class Policy(ABC):
    """A compaction policy's settings (a frozen dataclass) and its scores."""

    window: int
    sinks: int = 0

    name: ClassVar[str]
    # Whether `scores` reads the window attention (the current prompt's last queries).
    uses_queries: ClassVar[bool] = True
    # Whether `select` returns merged keys, values and log-counts (the cache then holds a count per slot).
    merges: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: SnapKVConfig) -> Policy:
        return cls(window=config.window, sinks=config.sinks)

    @abstractmethod
    def scores(self, prompt: PromptKV, budget: int) -> torch.Tensor:
        """[Hkv, P - window], higher = keep; `budget` tokens will be kept from them."""

    def select(self, prompt: PromptKV, budget: int) -> Selection:
        """The first min(sinks, budget) positions, then the best-scored `budget - sinks` others."""
        sinks = min(self.sinks, budget)
        num_kv_heads = prompt.keys.shape[1]
        best = top_tokens(self.scores(prompt, budget)[:, sinks:], budget - sinks) + sinks
        if sinks:
            first = torch.arange(sinks, device=best.device).expand(num_kv_heads, sinks)
            best = torch.cat([first, best], dim=1)
        return Selection(best)


def top_tokens(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """scores [Hkv, N] -> the `budget` best token indices per KV head [Hkv, budget], in
    position order. Equal scores (max-pooling makes plateaus) go to the earlier token."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :budget]
    return order.sort(dim=-1).values


def real_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (the HF reference); anything else is scored in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
