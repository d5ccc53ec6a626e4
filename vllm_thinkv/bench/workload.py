"""The benchmark workload: token-id prompts cut from text, all submitted at once."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from vllm_thinkv.errors import ThinKVError


@dataclass(frozen=True)
class Workload:
    num_requests: int = 64
    min_prompt: int = 2048
    max_prompt: int = 4096
    output_tokens: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.output_tokens < 1:
            raise ThinKVError(f"need at least 1 request and 1 output token, got {self.num_requests} and {self.output_tokens}")
        if not 1 <= self.min_prompt <= self.max_prompt:
            raise ThinKVError(f"prompt lengths must satisfy 1 <= min <= max, got {self.min_prompt}..{self.max_prompt}")

    @property
    def max_model_len(self) -> int:
        return self.max_prompt + self.output_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_prompts(token_ids: list[int], workload: Workload) -> list[list[int]]:
    """`num_requests` prompts with lengths uniform in [min_prompt, max_prompt], each a slice of
    `token_ids` at a random offset (seeded: every configuration gets the same prompts)."""
    if len(token_ids) < workload.max_prompt:
        raise ThinKVError(f"the text has {len(token_ids)} tokens; prompts of up to {workload.max_prompt} need more text")
    rng = random.Random(workload.seed)
    prompts = []
    for _ in range(workload.num_requests):
        n = rng.randint(workload.min_prompt, workload.max_prompt)
        start = rng.randrange(0, len(token_ids) - n + 1)
        prompts.append(token_ids[start : start + n])
    return prompts
