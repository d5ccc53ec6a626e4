"""The HF reference's building blocks on a tiny random Llama: one forward pass seen as
its prefixes equals prefilling each prefix alone, and generation with the question
appended after the (here uncompacted) cache equals plain greedy generation."""

import torch
from transformers import AutoModelForCausalLM

from vllm_thinkv.hf.snapkv import generate, prefill, prefill_prefixes, select
from vllm_thinkv.snapkv import SnapKVConfig
from vllm_thinkv.snapkv.config import POLICIES
from vllm_thinkv.snapkv.policies import make_policy


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
