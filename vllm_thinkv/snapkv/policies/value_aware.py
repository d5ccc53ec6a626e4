"""Value-aware SnapKV (CriticalKV-style, with VATP's value norm).

CriticalKV (Feng et al.) bounds a dropped token's effect on the attention output
by its attention times the norm of its value's contribution, ‖v W_o‖₁, and
selects in two stages: a share (`first_stage`, 0.5 in the paper and kvpress) of
the budget by attention alone, the rest by attention × that norm. The attention
backend sees q, k, v but not the model's output projection W_o (stock vLLM model
classes own it; only thin checkpoints have our model class), so the norm here is
‖v‖₁ (VATP, Guo et al. 2024): the same bound with W_o taken as the identity, and
it needs nothing beyond the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_thinkv.snapkv.policies.base import PromptKV, real_dtype
from vllm_thinkv.snapkv.policies.snapkv import SnapKVPolicy


@dataclass(frozen=True)
class ValueAwarePolicy(SnapKVPolicy):
    first_stage: float = 0.5  # share of the budget chosen by attention alone
    epsilon: float = 1e-4  # keeps a small-attention token's product from vanishing

    name = "value_aware"

    def scores(self, prompt: PromptKV, budget: int) -> torch.Tensor:
        attention = super().scores(prompt, budget)  # [Hkv, N]
        n = attention.shape[1]
        values = prompt.values[:n]
        norms = values.to(real_dtype(values)).abs().sum(dim=-1).T.to(attention.dtype)  # [Hkv, N]
        scores = (attention + self.epsilon) * norms
        # The first stage's share is of what the sinks leave (`Policy.select` keeps them anyway).
        sinks = min(self.sinks, budget)
        rest = attention[:, sinks:]
        first = torch.sort(rest, dim=-1, descending=True, stable=True).indices[:, : int(self.first_stage * (budget - sinks))]
        return scores.scatter_(1, first + sinks, float("inf"))
