"""SnapKV (Li et al. 2024): keep the tokens the last `window` prompt queries attend to.

Following the paper's code: each token outside the window gets the attention it
receives, summed over the window queries; the votes are pooled along the sequence
so the neighbours of a hit survive together; the query heads of a GQA group are
averaged so each KV head keeps exactly one token set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vllm_thinkv.snapkv.policies.base import Policy, PromptKV

if TYPE_CHECKING:
    from vllm_thinkv.snapkv.config import SnapKVConfig


@dataclass(frozen=True)
class SnapKVPolicy(Policy):
    kernel_size: int = 7
    pooling: str = "max"

    name = "snapkv"

    @classmethod
    def from_config(cls, config: SnapKVConfig) -> SnapKVPolicy:
        return cls(window=config.window, sinks=config.sinks, kernel_size=config.kernel_size, pooling=config.pooling)

    def scores(self, prompt: PromptKV, budget: int) -> torch.Tensor:
        """One KV head at a time, so the transient attention is [g, w, P], not [H, w, P]."""
        return torch.stack([self.head_scores(prompt.window_attention(h), self.window)
                            for h in range(prompt.keys.shape[1])])

    def head_scores(self, attention: torch.Tensor, window: int) -> torch.Tensor:
        """attention [g, w, P] -> pooled votes averaged over the group [P - window]."""
        votes = attention[..., : attention.shape[-1] - window].sum(dim=1)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(votes[:, None, :], self.kernel_size, stride=1, padding=self.kernel_size // 2)
        return pooled[:, 0].mean(dim=0)
