"""Passkey retrieval: prompt construction and scoring (engine-agnostic), and an HF runner.

Recipe (research/eval-data.md §4.3): a seeded 5-digit key, the needle
``" The secret passkey is {key}. Remember it: the secret passkey is {key}. "``
inserted at token depth `depth` of a haystack drawn from a novel, the question
appended, one user message through the chat template with the generation
prompt; greedy decoding of 24 tokens; success when the key appears in the answer.
`ctx` is the target length of the whole templated prompt in tokens; the
haystack fills what the template, needle and question leave.

A base model (no chat template, e.g. Gemma-3-270m) gets the completion-style
prompt instead (style "completion", the Landmark-attention wording): the
tokenizer's prefix tokens (`<bos>`), the haystack with the needle
``" The pass key is {key}. Remember it. {key} is the pass key. "`` and a text
that ends in "The pass key is", which the model completes.

`build_cases` is all a vLLM runner needs (`case.prompt_ids`, `score`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from vllm_thinkv.errors import ThinKVError

NEEDLE = " The secret passkey is {key}. Remember it: the secret passkey is {key}. "
QUESTION = "\n\nWhat is the secret passkey mentioned in the text above? Answer with the number only."
COMPLETION_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
COMPLETION_QUESTION = "\n\nWhat is the pass key? The pass key is"
STYLES = ("chat", "completion")


@dataclass(frozen=True)
class PasskeyCase:
    key: str
    depth: float  # requested depth in [0, 1]
    needle_token: int  # haystack tokens before the needle
    haystack_tokens: int
    haystack_offset: int  # first haystack token's index in the source token stream
    message: str  # the user message (haystack with needle + question)
    prompt_ids: list[int]  # the templated prompt, ready for generation
    style: str = "chat"  # "chat" (user message, chat template) or "completion" (prefix tokens + text)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("prompt_ids")
        d.pop("message")
        d["prompt_tokens"] = len(self.prompt_ids)
        return d


def chat_prompt_ids(tokenizer, message: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ThinKVError("the tokenizer has no chat template; passkey prompts are chat messages")
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_prompt_ids(tokenizer, text: str) -> list[int]:
    """The tokenizer's prefix tokens (e.g. `<bos>`) + the text: what a base model reads."""
    from vllm_thinkv.hf.text import text_prefix

    return text_prefix(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_style(tokenizer, style: str = "auto") -> str:
    """"chat" for a tokenizer with a chat template, "completion" for one without (a base model);
    an explicit style is checked: a chat prompt needs a template."""
    if style == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "completion"
    if style not in STYLES:
        raise ThinKVError(f"passkey prompt style {style!r} is not supported; supported: auto, {', '.join(STYLES)}")
    if style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ThinKVError("the tokenizer has no chat template; passkey prompts are chat messages (use style completion)")
    return style


def build_case(tokenizer, haystack_ids: list[int], ctx: int, depth: float, seed: int, style: str = "auto") -> PasskeyCase:
    """One prompt of about `ctx` tokens with the needle at `depth` of a seeded haystack window."""
    if not 0.0 <= depth <= 1.0:
        raise ThinKVError(f"needle depth {depth} must be in [0, 1]")
    style = prompt_style(tokenizer, style)
    needle, question, to_ids = ((NEEDLE, QUESTION, chat_prompt_ids) if style == "chat"
                                else (COMPLETION_NEEDLE, COMPLETION_QUESTION, completion_prompt_ids))
    rng = random.Random(seed)
    key = str(rng.randrange(10000, 100000))
    overhead = len(to_ids(tokenizer, needle.format(key=key) + question))
    n = ctx - overhead
    if n < 16:
        raise ThinKVError(f"passkey ctx {ctx} leaves no room for a haystack (template, needle and question take {overhead} tokens)")
    if len(haystack_ids) < n:
        raise ThinKVError(f"haystack too short: {len(haystack_ids)} tokens, a ctx-{ctx} prompt needs {n}")
    offset = rng.randrange(0, len(haystack_ids) - n + 1)
    hay = haystack_ids[offset : offset + n]
    cut = round(n * depth)
    message = tokenizer.decode(hay[:cut]) + needle.format(key=key) + tokenizer.decode(hay[cut:]) + question
    return PasskeyCase(key, depth, cut, n, offset, message, to_ids(tokenizer, message), style)


def depths(trials: int) -> list[float]:
    """Evenly spread needle depths in [0.1, 0.9] (0.5 for a single trial)."""
    return [0.5] if trials == 1 else [round(0.1 + 0.8 * i / (trials - 1), 4) for i in range(trials)]


def build_cases(
    tokenizer, haystack_text: str, ctx: int, trials: int, seed: int = 0, at: Sequence[float] | None = None,
    style: str = "auto",
) -> list[PasskeyCase]:
    """`trials` prompts with depths `depths(trials)`, or, with `at`, `trials` prompts at
    each depth of `at` (depth-major); prompt i is seeded with `seed + i`. `style`: see `prompt_style`."""
    if trials < 1:
        raise ThinKVError(f"trials must be >= 1, got {trials}")
    ids = tokenizer(haystack_text, add_special_tokens=False)["input_ids"]
    spread = depths(trials) if at is None else [d for d in at for _ in range(trials)]
    return [build_case(tokenizer, ids, ctx, dep, seed + i, style) for i, dep in enumerate(spread)]


def score(answer: str, key: str) -> bool:
    return key in answer


@torch.no_grad()
def run_hf(model, tokenizer, cases: list[PasskeyCase], max_new_tokens: int = 24, progress: bool = True) -> list[dict]:
    """Greedy generation on a transformers model; one dict per case with answer and success."""
    device = next(model.parameters()).device
    out = []
    for case in tqdm(cases, desc="passkey", unit="trial", disable=not progress):
        ids = torch.tensor([case.prompt_ids], device=device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        answer = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        out.append({**case.to_dict(), "answer": answer, "correct": score(answer, case.key)})
    return out
