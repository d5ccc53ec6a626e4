"""KeyDiff (Park et al. 2025): keep the keys least like the average key. Query-agnostic.

Score = −cos(k_t, ā), ā the mean of the prompt's normalised keys of that KV head.
It reads only the cached keys, never the current question's queries, so the kept
set does not depend on which question follows: the property a cache reused by
several questions needs (multi-turn chat, a shared document). It was chosen over
Expected Attention (which needs query statistics and the model's RoPE to
extrapolate future queries) because it works unchanged on the post-RoPE thin keys
of our cache, costs one pass over the keys, and is the scorer of the only open
vLLM eviction PR (#56673). Keys carry their RoPE, as cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_thinkv.snapkv.policies.base import Policy, PromptKV, real_dtype


@dataclass(frozen=True)
class KeyDiffPolicy(Policy):
    name = "keydiff"
    uses_queries = False

    def scores(self, prompt: PromptKV, budget: int) -> torch.Tensor:
        keys = prompt.keys.to(real_dtype(prompt.keys)).transpose(0, 1)  # [Hkv, P, r]
        anchor = F.normalize(keys, dim=-1).mean(dim=1, keepdim=True)  # [Hkv, 1, r]
        return -F.cosine_similarity(keys[:, : keys.shape[1] - self.window], anchor, dim=-1)
