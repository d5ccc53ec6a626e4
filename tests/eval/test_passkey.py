"""Passkey prompts: needle at the requested depth, prompt length, seeding, scoring, runners."""

from __future__ import annotations

import copy
import json

import pytest
from transformers import AutoTokenizer

from vllm_thinkv.cli import main
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.eval.passkey import (
    COMPLETION_NEEDLE,
    COMPLETION_QUESTION,
    NEEDLE,
    QUESTION,
    build_case,
    build_cases,
    depths,
    run_hf,
    score,
)
from vllm_thinkv.hf import load
from vllm_thinkv.hf.text import packaged_text, text_prefix


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_at_requested_depth(tok, depth):
    ids = tok(packaged_text()[:40000], add_special_tokens=False)["input_ids"]
    case = build_case(tok, ids, ctx=512, depth=depth, seed=3)
    needle = NEEDLE.format(key=case.key)
    hay = ids[case.haystack_offset : case.haystack_offset + case.haystack_tokens]
    assert case.needle_token == round(case.haystack_tokens * depth)
    assert case.message.index(needle) == len(tok.decode(hay[: case.needle_token]))
    assert case.message.endswith(QUESTION) and case.message.count(case.key) == 2
    assert len(case.key) == 5 and case.key.isdigit()
    assert abs(len(case.prompt_ids) - 512) <= 8  # boundary re-tokenisation moves it by a few tokens


@pytest.mark.parametrize("depth", [0.1, 0.9])
def test_completion_prompt_for_a_base_model(tok, depth):
    """No chat template (a base model): the prefix tokens, the haystack with the needle, and a text that
    ends in "The pass key is"; auto picks it, and a chat prompt is refused by name."""
    base = copy.deepcopy(tok)
    base.chat_template = None
    ids = tok(packaged_text()[:40000], add_special_tokens=False)["input_ids"]
    case = build_case(base, ids, ctx=512, depth=depth, seed=3)
    assert case.style == "completion" and case.to_dict()["style"] == "completion"
    needle = COMPLETION_NEEDLE.format(key=case.key)
    hay = ids[case.haystack_offset : case.haystack_offset + case.haystack_tokens]
    assert case.message.index(needle) == len(tok.decode(hay[: case.needle_token]))
    assert case.message.endswith(COMPLETION_QUESTION) and case.message.endswith("The pass key is")
    prefix = text_prefix(tok)
    assert case.prompt_ids == prefix + tok(case.message, add_special_tokens=False)["input_ids"]
    assert abs(len(case.prompt_ids) - 512) <= 8
    # the same case, asked for explicitly on a tokenizer that has a template
    assert build_case(tok, ids, ctx=512, depth=depth, seed=3, style="completion").prompt_ids == case.prompt_ids
    with pytest.raises(ThinKVError, match="no chat template"):
        build_case(base, ids, ctx=512, depth=depth, seed=3, style="chat")
    with pytest.raises(ThinKVError, match="style 'plain' is not supported"):
        build_case(tok, ids, ctx=512, depth=depth, seed=3, style="plain")


def test_cases_are_seeded_and_spread(tok):
    a = build_cases(tok, packaged_text()[:60000], ctx=256, trials=5, seed=11)
    b = build_cases(tok, packaged_text()[:60000], ctx=256, trials=5, seed=11)
    assert [c.prompt_ids for c in a] == [c.prompt_ids for c in b]
    assert [c.depth for c in a] == depths(5) == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert len({c.key for c in a}) == 5


def test_score():
    assert score("The secret passkey is 40317.", "40317")
    assert not score("The secret passkey is 40318.", "40317")
    assert not score("", "40317")


def test_bad_passkey_requests(tok):
    with pytest.raises(ThinKVError, match="leaves no room for a haystack"):
        build_cases(tok, packaged_text(), ctx=40, trials=1)
    with pytest.raises(ThinKVError, match="haystack too short"):
        build_cases(tok, packaged_text()[:500], ctx=1024, trials=1)


def test_run_hf_and_cli(tiny_llama_dir, tok, tmp_path):
    model = load(tiny_llama_dir)
    res = run_hf(model, tok, build_cases(tok, packaged_text()[:60000], ctx=200, trials=2), max_new_tokens=4, progress=False)
    assert len(res) == 2 and all(isinstance(r["correct"], bool) and r["prompt_tokens"] > 190 for r in res)
    text = tmp_path / "hay.txt"
    text.write_text(packaged_text()[:60000])
    out = tmp_path / "pk.json"
    args = ["eval", "passkey", str(tiny_llama_dir), "--haystack", str(text), "--ctx", "200", "--trials", "2",
            "--max-new-tokens", "4", "--skip-chars", "0", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert len(data["trials"]) == 2 and 0.0 <= data["accuracy"] <= 1.0
