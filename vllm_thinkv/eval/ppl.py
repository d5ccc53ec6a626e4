"""Perplexity over independent, non-overlapping token windows (no BOS, no overlap).

PPL = exp(total NLL / total predicted tokens); each window of ctx tokens
predicts its last ctx - 1 tokens. Per-window sums are kept so a sweep can cache
the original model's numbers and report per-window ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PplResult:
    nll: list[float]  # summed NLL per window
    tokens: list[int]  # predicted tokens per window

    @property
    def ppl(self) -> float:
        return math.exp(sum(self.nll) / sum(self.tokens))

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "windows": len(self.nll), "tokens": sum(self.tokens), "window_nll": self.nll}


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Summed next-token NLL of one window ids [T] (fp32 log-softmax)."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
    return float(F.cross_entropy(logits, ids[1:], reduction="sum"))


def perplexity(model: torch.nn.Module, windows: torch.Tensor, progress: bool = True, desc: str = "ppl") -> PplResult:
    """Evaluate `model` on windows [N, ctx]."""
    model.eval()
    nll = [window_nll(model, w) for w in tqdm(windows, desc=desc, unit="window", disable=not progress)]
    return PplResult(nll=nll, tokens=[windows.shape[1] - 1] * windows.shape[0])
