"""Keep the `budget` tokens just before the window (with sinks: StreamingLLM).

A naive baseline for measuring what the other policies' scores buy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_thinkv.snapkv.policies.base import Policy, PromptKV


@dataclass(frozen=True)
class RecentPolicy(Policy):
    name = "recent"
    uses_queries = False

    def scores(self, prompt: PromptKV, budget: int) -> torch.Tensor:
        """The position itself: the latest tokens score highest."""
        prompt_len, num_kv_heads, _ = prompt.keys.shape
        positions = torch.arange(prompt_len - self.window, device=prompt.keys.device, dtype=torch.float64)
        return positions.expand(num_kv_heads, -1)
