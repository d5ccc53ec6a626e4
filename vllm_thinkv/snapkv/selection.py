"""SnapKV token selection for one layer of one request (torch, any device).

Scores follow the SnapKV paper's code: the last `window` prompt queries attend
(softmax over the whole prompt, causal inside the window); each prompt token
outside the window gets the sum of the attention it receives; the votes are
pooled along the sequence so neighbours of a hit survive together; the query
heads of a GQA group are averaged so each KV head keeps exactly one token set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_thinkv.snapkv.config import SnapKVConfig


def snapkv_scores(window_q: torch.Tensor, keys: torch.Tensor, scale: float, config: SnapKVConfig) -> torch.Tensor:
    """window_q [w, H, r] (prompt positions P-w..P-1), keys [P, Hkv, r] -> scores [Hkv, P - w] (fp32).

    One KV head at a time, so the transient fp32 attention is [g, w, P], not [H, w, P]."""
    w, num_heads, r = window_q.shape
    prompt_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    # Window query j sits at position P - w + j and sees keys 0 .. P - w + j.
    positions = torch.arange(prompt_len, device=keys.device)
    query_pos = torch.arange(prompt_len - w, prompt_len, device=keys.device)
    future = positions[None, :] > query_pos[:, None]  # [w, P]
    pool = F.max_pool1d if config.pooling == "max" else F.avg_pool1d
    scores = torch.empty(num_kv_heads, prompt_len - w, dtype=torch.float32, device=keys.device)
    for h in range(num_kv_heads):
        q = window_q[:, h * group:(h + 1) * group].float().transpose(0, 1)  # [g, w, r]
        logits = (q @ keys[:, h].float().T) * scale  # [g, w, P]
        votes = logits.masked_fill_(future, float("-inf")).softmax(dim=-1)[..., : prompt_len - w].sum(dim=1)
        pooled = pool(votes[:, None, :], config.kernel_size, stride=1, padding=config.kernel_size // 2)
        scores[h] = pooled[:, 0].mean(dim=0)
    return scores


def select_tokens(window_q: torch.Tensor, keys: torch.Tensor, scale: float, config: SnapKVConfig,
                  budget: int) -> torch.Tensor:
    """The kept prompt tokens outside the window, [Hkv, budget] in position order."""
    prompt_len, num_kv_heads, _ = keys.shape
    if config.policy == "recent":
        end = prompt_len - config.window
        return torch.arange(end - budget, end, device=keys.device).expand(num_kv_heads, budget)
    return top_tokens(snapkv_scores(window_q, keys, scale, config), budget)


def top_tokens(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """scores [Hkv, N] -> the `budget` best token indices per KV head [Hkv, budget], in
    position order. Equal scores (max-pooling makes plateaus) go to the earlier token."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :budget]
    return order.sort(dim=-1).values
