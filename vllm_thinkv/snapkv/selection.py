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
    """window_q [w, H, r] (prompt positions P-w..P-1), keys [P, Hkv, r] -> scores [Hkv, P - w] (fp32)."""
    w, num_heads, r = window_q.shape
    prompt_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    q = window_q.float().view(w, num_kv_heads, group, r).permute(1, 2, 0, 3).reshape(num_kv_heads, group * w, r)
    logits = torch.bmm(q, keys.float().permute(1, 2, 0)).view(num_kv_heads, group, w, prompt_len) * scale
    # Window query j sits at position P - w + j and sees keys 0 .. P - w + j.
    positions = torch.arange(prompt_len, device=keys.device)
    query_pos = torch.arange(prompt_len - w, prompt_len, device=keys.device)
    logits.masked_fill_(positions[None, :] > query_pos[:, None], float("-inf"))
    votes = logits.softmax(dim=-1)[..., : prompt_len - w].sum(dim=2)  # [Hkv, g, P - w]
    pool = F.max_pool1d if config.pooling == "max" else F.avg_pool1d
    pooled = pool(votes.reshape(-1, 1, prompt_len - w), config.kernel_size, stride=1, padding=config.kernel_size // 2)
    return pooled.view(num_kv_heads, group, prompt_len - w).mean(dim=1)


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
