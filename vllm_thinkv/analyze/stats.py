"""Per-layer sufficient statistics, accumulated one window at a time.

Storing every activation of every layer would take gigabytes, so each window
is reduced on the fly to, per activation kind and split:

- the Gram matrix of [x_head0 | x_head1 | ... | 1] (all heads side by side plus
  a constant column), in float64. Its diagonal blocks give each head's
  (uncentred and centred) spectrum; its off-diagonal blocks are exactly what a
  least-squares fit of one head from others needs (`predict`);
- sums of cosine similarities between a token and the token `o` positions
  later, for a few offsets o, within a window (never across windows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_thinkv.hf.capture import LayerAttention

SPLITS = ("fit", "heldout")


def kind_tensors(att: LayerAttention) -> dict[str, torch.Tensor]:
    """The measured activations of one layer: name -> [T, heads, d] (see `config.KINDS`)."""
    return {"k_pre": att.k, "k_rope": att.k_rope, "v": att.v, "q_pre": att.q, "q_rope": att.q_rope}


class LayerStats:
    """Gram matrices and offset cosines of one layer, per activation kind."""

    def __init__(self, offsets: tuple[int, ...]):
        self.offsets = offsets
        self.gram: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SPLITS}
        self.cos_sum: dict[str, torch.Tensor] = {}  # kind -> [heads, len(offsets)]
        self.cos_pairs = torch.zeros(len(offsets), dtype=torch.float64)  # token pairs per offset
        self.head_dim = 0

    def add(self, tensors: dict[str, torch.Tensor], split: str) -> None:
        for kind, x in tensors.items():
            t, h, d = x.shape
            self.head_dim = d
            z = torch.cat([x.reshape(t, h * d).double(), x.new_ones(t, 1, dtype=torch.float64)], dim=1)
            g = z.T @ z
            grams = self.gram[split]
            grams[kind] = grams[kind] + g if kind in grams else g
            xn = F.normalize(x.float(), dim=-1)
            cos = torch.stack(
                [(xn[o:] * xn[:-o]).sum(-1).sum(0) if o < t else xn.new_zeros(h) for o in self.offsets], dim=-1
            ).double()
            self.cos_sum[kind] = self.cos_sum[kind] + cos if kind in self.cos_sum else cos
        t = next(iter(tensors.values())).shape[0]
        self.cos_pairs += torch.tensor([max(t - o, 0) for o in self.offsets], dtype=torch.float64)

    def to_cpu(self) -> None:
        """Move the accumulated statistics off the accelerator once all windows are in."""
        self.gram = {s: {k: g.cpu() for k, g in grams.items()} for s, grams in self.gram.items()}
        self.cos_sum = {k: c.cpu() for k, c in self.cos_sum.items()}

    def full_gram(self, kind: str, split: str | None = None) -> torch.Tensor:
        """Gram of [all heads | 1] for one split, or summed over both when `split` is None."""
        if split is not None:
            return self.gram[split][kind]
        return sum(self.gram[s][kind] for s in SPLITS if kind in self.gram[s])

    def head_moments(self, kind: str, head: int, split: str | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(X^T X [d, d], column sums [d], token count) of one head."""
        g, d = self.full_gram(kind, split), self.head_dim
        s = slice(head * d, (head + 1) * d)
        return g[s, s], g[-1, s], float(g[-1, -1])

    def mean_cosine(self, kind: str) -> torch.Tensor:
        """Mean cosine similarity per head and offset [heads, len(offsets)] (NaN where no pairs)."""
        pairs = self.cos_pairs.clone()
        pairs[pairs == 0] = float("nan")
        return self.cos_sum[kind] / pairs
