"""Merge (KVSlimmer-style): SnapKV's kept tokens, with every evicted token folded into one of them.

KVSlimmer (arXiv 2603.00907) merges keys by a closed-form weighted average, sums values and
weighs a merged slot by its count l in the softmax (Σ l·exp(s)). Here, per KV head, each
evicted prompt token e (outside the window) joins its nearest kept non-sink token t in
position (ties to the earlier one); a kept token and the tokens joining it form a group S.
With A_j the attention mass token j received (summed over the window queries and the query
heads of the KV head, `PromptKV.window_attention`) and weights w_j = A_j / Σ_S A:

    key   k̄ = Σ_S w_j k_j,     value v̄ = Σ_S w_j v_j,
    count c = Σ_S A_j / Σ_{i,q} exp(Σ_S w_j ln a_iqj)     (stored as ln c; 0 for a group of one)

Why this is exact where it can be. The cache is post-RoPE, so a logit is linear in the cached
key: for any query at any position, q·k̄ = Σ w_j q·k_j exactly, and the slot's softmax weight
c·exp(q·k̄)/Z, in window query q of head i, equals c·Π_j a_iqj^{w_j}. The count above makes
the group's total attention over the window queries exactly what its tokens received; the
mass-weighted value then makes the group's summed contribution to those outputs exact
(Σ_q Σ_j a_qj v_j = Σ_S A_j · v̄). What remains approximate is the spread of the tokens'
logits across queries (Jensen: exp of the mean logit vs the mean of exp), which grows with
how differently the merged keys score across queries; merging neighbours in position keeps
their RoPE phases close, which is why groups are formed by position, not by key similarity.
KVSlimmer stores pre-RoPE keys and re-applies RoPE at the merged count's position; with
post-RoPE keys no position needs inventing. Integer counts (KVSlimmer's l) would over-weigh
a high-attention kept token that absorbs low-attention neighbours; the mass count does not
(c = |S| when all tokens of S score alike). Sinks are kept as they are and absorb nothing:
they carry the attention sink, which averaging would blur. The counts reach the kernels as a
per-slot log-count bias (`kernels.attention.paged_attention`, `log_counts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_thinkv.snapkv.policies.base import PromptKV, Selection, real_dtype
from vllm_thinkv.snapkv.policies.snapkv import SnapKVPolicy


@dataclass(frozen=True)
class MergePolicy(SnapKVPolicy):
    name = "merge"
    merges: ClassVar[bool] = True

    def select(self, prompt: PromptKV, budget: int) -> Selection:
        kept = super().select(prompt, budget).indices  # [Hkv, budget], position order
        heads = [merge_head(prompt.window_attention(h), prompt.keys[:, h], prompt.values[:, h], kept[h],
                            min(self.sinks, budget), self.window) for h in range(kept.shape[0])]
        keys, values, log_counts = (torch.stack(parts) for parts in zip(*heads))
        return Selection(kept, keys=keys, values=values, log_counts=log_counts)


def nearest_targets(kept: torch.Tensor, sinks: int, n: int) -> torch.Tensor:
    """For each of the n positions outside the window, the index into `kept` of the slot it goes to: its
    own slot if kept, else the nearest kept non-sink position (ties to the earlier); -1 when every kept
    position is a sink (the token is dropped)."""
    slot = torch.full((n,), -1, dtype=torch.long, device=kept.device)
    targets = kept[sinks:]
    if len(targets):
        pos = torch.arange(n, device=kept.device)
        right = torch.searchsorted(targets, pos).clamp(max=len(targets) - 1)
        left = (right - 1).clamp(min=0)
        go_left = (pos - targets[left]).abs() <= (targets[right] - pos).abs()
        slot = torch.where(go_left, left, right) + sinks
    slot[kept] = torch.arange(len(kept), device=kept.device)
    return slot


def merge_head(attention: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor,
               sinks: int, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One KV head: attention [g, w, P] (window probabilities), keys [P, r], values [P, d], kept [budget] ->
    the merged keys [budget, r], values [budget, d] and ln counts [budget], in the scoring dtype
    (float64 for float64 input, else float32)."""
    dtype = real_dtype(attention)
    n = keys.shape[0] - window
    budget = kept.shape[0]
    slot = nearest_targets(kept, sinks, n)
    member = slot >= 0
    slot, tokens = slot[member], member.nonzero().flatten()
    tiny = torch.finfo(dtype).tiny  # an underflowed probability stays finite in the logs below
    log_a = attention[..., :n].to(dtype).clamp(min=tiny).log()[..., tokens].flatten(0, 1)  # [g·w, m]
    mass = log_a.exp().sum(dim=0)  # A_j [m]
    group_mass = torch.zeros(budget, dtype=dtype, device=keys.device).index_add_(0, slot, mass)
    weight = mass / group_mass[slot]  # w_j

    def average(x: torch.Tensor) -> torch.Tensor:
        x = x[tokens].to(dtype)
        return torch.zeros(budget, x.shape[-1], dtype=dtype, device=x.device).index_add_(0, slot, weight[:, None] * x)

    # Σ_S w_j ln a_iqj for every window query row and group, then the log of its sum over the rows.
    mean_log = torch.zeros(log_a.shape[0], budget, dtype=dtype, device=keys.device).index_add_(
        1, slot, log_a * weight)
    log_counts = group_mass.log() - mean_log.logsumexp(dim=0)
    sizes = torch.zeros(budget, dtype=torch.long, device=keys.device).index_add_(0, slot, torch.ones_like(slot))
    log_counts = torch.where(sizes > 1, log_counts, 0.0)  # a group of one is the token itself: count 1 exactly
    return average(keys), average(values), log_counts
