"""The HF reference's building blocks on a tiny random Llama: one forward pass seen as
its prefixes equals prefilling each prefix alone, generation with the question
appended after the (here uncompacted) cache equals plain greedy generation, and a
slot's count (`merge`) weighs like that many copies of it."""

import math

import torch
from transformers import AutoModelForCausalLM

from vllm_thinkv.hf.snapkv import generate, prefill, prefill_prefixes, select, snapkv_generate, snapkv_reference
from vllm_thinkv.snapkv import SnapKVConfig
from vllm_thinkv.snapkv.config import POLICIES
from vllm_thinkv.snapkv.policies import Selection, make_policy


def test_prefixes_equal_separate_prefills(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (1, 200))
    both = prefill_prefixes(model, ids, 8, [150, 200])
    for pre, alone in zip(both, (prefill(model, ids[:, :150], 8), prefill(model, ids, 8))):
        assert pre.prompt_len == alone.prompt_len
        for a, b in zip(pre.window_probs, alone.window_probs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for (ka, va), (kb, vb) in zip(pre.kv, alone.kv):
            torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pre.logits, alone.logits, rtol=1e-4, atol=1e-4)
        for policy in POLICIES:
            p = make_policy(SnapKVConfig(budget=40, window=8, policy=policy, sinks=2))
            assert all(torch.equal(x, y) for x, y in zip(select(pre, p, 40), select(alone, p, 40)))


def test_question_after_the_cache_equals_plain_generation(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    torch.manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (1, 120))
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          min_new_tokens=12)[0, 120:].tolist()
    document = prefill(model, ids[:, :100], 8)
    tokens, logprobs = generate(model, document, None, 12, question_ids=ids[0, 100:].tolist())
    assert tokens == want and len(logprobs) == 12
    # and a compacted document changes the answer's log-probabilities (the selection is used)
    kept = select(document, make_policy(SnapKVConfig(budget=16, window=8, policy="keydiff")), 16)
    _, compacted = generate(model, document, kept, 12, question_ids=ids[0, 100:].tolist())
    assert (compacted[0] - logprobs[0]).abs().max() > 1e-3


def test_a_slot_count_equals_that_many_copies_in_the_model(tiny_llama_dir):
    """The HF reference's counted attention (log-count bias, `merge`) checked against duplication: a slot
    with count 2 gives the same generation as that token cached twice with count 1."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    torch.manual_seed(2)
    ids = torch.randint(10, model.config.vocab_size, (1, 100))
    prefilled = prefill(model, ids, 8)
    kept = select(prefilled, make_policy(SnapKVConfig(budget=16, window=8)), 16)
    doubled, counted = [], []
    for indices, (keys, values) in zip(kept, prefilled.kv):
        doubled.append(torch.cat([indices[:, :5], indices[:, 4:]], dim=1))  # slot 4 twice
        gather = indices.to(keys.device)[:, :, None]
        log_counts = torch.zeros(indices.shape, dtype=torch.float64)
        log_counts[:, 4] = math.log(2.0)
        counted.append(Selection(indices, keys[0].gather(1, gather.expand(-1, -1, keys.shape[-1])),
                                 values[0].gather(1, gather.expand(-1, -1, values.shape[-1])), log_counts))
    tokens, want = generate(model, prefilled, doubled, 8, question_ids=ids[0, 90:].tolist())
    got_tokens, got = generate(model, prefilled, counted, 8, question_ids=ids[0, 90:].tolist())
    assert got_tokens == tokens
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    _, plain = generate(model, prefilled, kept, 8, question_ids=ids[0, 90:].tolist())
    assert (plain[0] - want[0]).abs().max() > 1e-4  # the count matters


def test_merge_generates_from_merged_slots(tiny_llama_dir):
    """snapkv_generate with `merge` runs the merged cache (its log-probabilities differ from SnapKV's, whose
    kept tokens it shares)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    torch.manual_seed(3)
    ids = torch.randint(10, model.config.vocab_size, (1, 120))
    settings = dict(budget=24, window=8, sinks=2)
    merged = snapkv_reference(model, ids, SnapKVConfig(**settings, policy="merge"))
    assert all(torch.equal(a, b) for a, b in zip(merged, snapkv_reference(model, ids, SnapKVConfig(**settings))))
    _, with_merge = snapkv_generate(model, ids, SnapKVConfig(**settings, policy="merge"), 4)
    _, with_snapkv = snapkv_generate(model, ids, SnapKVConfig(**settings), 4)
    assert (with_merge[1] - with_snapkv[1]).abs().max() > 1e-4
