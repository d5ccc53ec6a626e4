"""The capacity model against independent computations: the issue's formulas written
out by hand, transformers' own parameter count, and the Thin Keys paper's MHA claim."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vllm_thinkv.capacity.model import (
    GiB,
    load_shape,
    max_sequences,
    num_blocks,
    sequence_blocks,
    shape_from_config,
    shipped_models,
)
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.snapkv import SnapKVConfig

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
FOUR_MODELS = ("llama-3.1-8b", "mistral-7b", "qwen3-8b", "llama-3.1-70b")


def public(name: str) -> dict:
    return json.loads(shipped_models()[name].read_text())


def test_the_issues_models_are_shipped():
    assert set(FOUR_MODELS) <= set(shipped_models())


@pytest.mark.parametrize("name", sorted(shipped_models()))
def test_bytes_per_token_follow_the_formulas(name):
    c = public(name)
    layers, hkv, d, b = c["num_hidden_layers"], c["num_key_value_heads"], c["head_dim"], BYTES[c["torch_dtype"]]
    shape = load_shape(name)
    assert shape.kv_bytes_per_token() == layers * 2 * d * hkv * b
    r = d // 4
    assert shape.kv_bytes_per_token(shape.layer_ranks(None)) == layers * (r + d) * hkv * b
    assert shape.kv_bytes_per_token(shape.layer_ranks(None)) / shape.kv_bytes_per_token() == pytest.approx(0.625)


@pytest.mark.parametrize("name", sorted(shipped_models()))
def test_parameter_count_matches_transformers(name):
    cfg = {k: v for k, v in public(name).items() if not k.startswith("_")}
    hf_config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    assert load_shape(name).param_count() == sum(p.numel() for p in model.parameters())


def test_per_layer_ranks_of_a_thin_checkpoint(tmp_path):
    c = {"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "hidden_size": 256, "vocab_size": 100, "torch_dtype": "float16",
         "thinkv": {"version": 1, "method": "pca", "form": "post_rope_projection", "ranks": [16, 32, 64], "head_dim": 64}}
    (tmp_path / "config.json").write_text(json.dumps(c))
    shape = load_shape(tmp_path)
    assert shape.layer_ranks(None) == (16, 32, 64)
    assert shape.kv_bytes_per_token(shape.layer_ranks(None)) == 2 * 2 * ((16 + 64) + (32 + 64) + (64 + 64))
    with pytest.raises(ThinKVError, match="own per-layer ranks"):
        shape.layer_ranks(16)


def test_blocks_and_stock_sequences():
    # 1 GiB, 46080 B/token (SmolLM2 fp32), block 32: floor(2^30 / (46080 * 32)) blocks
    blocks = num_blocks(GiB, 46080, 32)
    assert blocks == 2**30 // (46080 * 32)
    # a 3000 + 100 token request holds ceil(3100 / 32) = 97 blocks; one block is the null block
    assert max_sequences(blocks, 3000, 100, 32) == (blocks - 1) // 97


def test_snapkv_blocks_match_the_freed_gap():
    """P = 4096, budget 1024 + window 32, block 16: the kept 1056 tokens need 66 blocks, the
    prompt's gap blocks [66, 256) are freed, the output starts in block 256."""
    snap = SnapKVConfig(budget=1024, window=32)
    for out in (1, 16, 40, 512):
        assert sequence_blocks(4096, out, 16, snap) == 66 + -(-(4096 + out) // 16) - 256
    assert sequence_blocks(1000, 10, 16, snap) == -(-1010 // 16)  # too short to compact
    # one request in prefill holds its whole prompt (257 blocks incl. its first decode token), the rest 66 + 2
    blocks = 1 + 257 + 5 * 68
    assert max_sequences(blocks, 4096, 32, 16, snap) == 6
    assert max_sequences(256, 4096, 32, 16, snap) == 0  # the prompt itself does not fit: SnapKV cannot help


def test_paper_25_gb_per_user_holds_for_mha_not_gqa():
    """Thin Keys: '25 GB of KV saved per user at 128K' for a 7B at r = d/4."""
    n = 131072
    mha, gqa = load_shape("llama-2-7b"), load_shape("mistral-7b")
    saved = {s.name: n * (s.kv_bytes_per_token() - s.kv_bytes_per_token(s.layer_ranks(None))) for s in (mha, gqa)}
    assert saved["llama-2-7b"] == n * 32 * 32 * (128 - 32) * 2  # 32 layers x 32 KV heads x 96 dims x 2 B
    assert saved["llama-2-7b"] / 1e9 == pytest.approx(25.8, abs=0.1)
    assert saved["mistral-7b"] * 4 == saved["llama-2-7b"]  # 8 KV heads instead of 32


def test_configs_thinkv_cannot_serve_are_refused():
    base = public("mistral-7b")
    with pytest.raises(ThinKVError, match="sliding-window.*does not model vLLM's hybrid allocator"):
        shape_from_config({**base, "sliding_window": 4096}, "mistral-7b-v0.1")
    with pytest.raises(ThinKVError, match="lacks 'num_hidden_layers'"):
        shape_from_config({k: v for k, v in base.items() if k != "num_hidden_layers"}, "broken")
    with pytest.raises(ThinKVError, match="dtype"):
        shape_from_config({**base, "torch_dtype": "float8"}, "fp8")
