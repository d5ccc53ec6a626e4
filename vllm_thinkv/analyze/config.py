"""Settings of one analysis run, and the model families it understands."""

from __future__ import annotations

from dataclasses import dataclass

# model_type values whose attention `vllm_thinkv.hf.capture` reproduces exactly.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

# Activation kinds measured per head. Queries have one entry per query head;
# the others one per KV head.
KINDS: dict[str, str] = {
    "k_pre": "keys before RoPE",
    "k_rope": "keys after RoPE (what the KV cache stores)",
    "v": "values",
    "q_pre": "queries before RoPE (per query head)",
    "q_rope": "queries after RoPE (per query head)",
}
KV_KINDS = ("k_pre", "k_rope", "v")
WEIGHTS = ("k_proj", "v_proj", "q_proj")


@dataclass(frozen=True)
class AnalyzeConfig:
    """What to measure and on how much text.

    The text is cut into `ctx`-token windows; the first `fit_fraction` of them
    fit the least-squares predictors and thin-key projections, the rest are
    held out to score them. Spectra and cosines use every window.
    """

    ctx: int = 1024
    max_tokens: int = 16384  # spread evenly over the text files, `ctx` at a time
    skip_chars: int = 5000  # front matter skipped in each text file
    fit_fraction: float = 0.5
    energies: tuple[float, ...] = (0.90, 0.95, 0.99)
    max_refs: int = 5
    logit_errors: tuple[float, ...] = (0.01, 0.05, 0.10, 0.20)
    rank_step: int = 8
    # The logit error runs every method's thin projection at every rank over whole
    # windows: score `logit_windows` held-out windows (evenly spaced), `logit_queries`
    # query positions each (all their keys).
    logit_windows: int = 4
    logit_queries: int = 128
    offsets: tuple[int, ...] = (1, 2, 4, 16, 64, 256)
    device: str = "cpu"
    dtype: str = "float32"

    def ranks(self, head_dim: int) -> list[int]:
        """Thin-key ranks tried: multiples of `rank_step` below d (what the kernels support), then d."""
        return [r for r in range(self.rank_step, head_dim, self.rank_step)] + [head_dim]
