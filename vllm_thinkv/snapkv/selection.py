"""Token selection for one layer of one request in the backend (torch, any device).

The backend has the cached prompt keys and values and the saved last `window`
prompt queries; it recomputes the window attention from them (one KV head at a
time) and hands everything to the deployment's policy (`snapkv.policies`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_thinkv.snapkv.policies import Policy, PromptKV, Selection


def window_attention(window_q: torch.Tensor, keys: torch.Tensor, scale: float) -> Callable[[int], torch.Tensor]:
    """window_q [w, H, r] (prompt positions P-w..P-1), keys [P, Hkv, r] -> KV head h ->
    the fp32 softmax probabilities [g, w, P] of its query heads' window queries."""
    w, num_heads, _ = window_q.shape
    prompt_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    # Window query j sits at position P - w + j and sees keys 0 .. P - w + j.
    positions = torch.arange(prompt_len, device=keys.device)
    query_pos = torch.arange(prompt_len - w, prompt_len, device=keys.device)
    future = positions[None, :] > query_pos[:, None]  # [w, P]

    def attention(h: int) -> torch.Tensor:
        q = window_q[:, h * group:(h + 1) * group].float().transpose(0, 1)  # [g, w, r]
        logits = (q @ keys[:, h].float().T) * scale  # [g, w, P]
        return logits.masked_fill_(future, float("-inf")).softmax(dim=-1)

    return attention


def select(policy: Policy, window_q: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
           scale: float, budget: int) -> Selection:
    """The policy's selection of the prompt tokens outside the window (with `merge`, what the kept slots hold).
    `window_q` may be None only for a policy that does not use queries."""
    attention = None if window_q is None else window_attention(window_q, keys, scale)
    return policy.select(PromptKV(keys, values, attention), budget)


def select_tokens(policy: Policy, window_q: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                  scale: float, budget: int) -> torch.Tensor:
    """The kept prompt tokens outside the window, [Hkv, budget] in position order."""
    return select(policy, window_q, keys, values, scale, budget).indices
