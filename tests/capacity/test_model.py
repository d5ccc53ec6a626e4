"""The capacity model against independent computations: the issue's formulas written
out by hand, transformers' own parameter count, and the Thin Keys paper's MHA claim."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vllm_thinkv.capacity.model import (
    GiB,
    kv_cache_groups,
    load_shape,
    max_sequences,
    num_blocks,
    sequence_blocks,
    shape_from_config,
    shipped_models,
)
from vllm_thinkv.cli import main
from vllm_thinkv.config import allocated_ranks, padded_pages_warning, sliding_layers
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


GEMMA3_270M = {  # Gemma-3-270m's public config values: 18 layers, every 6th global, window 512, MQA, d = 256
    "model_type": "gemma3_text", "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "hidden_size": 640, "intermediate_size": 2048, "vocab_size": 262144, "torch_dtype": "bfloat16",
    "tie_word_embeddings": True, "max_position_embeddings": 32768, "sliding_window": 512,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
}


def test_hybrid_model_only_full_layers_grow():
    """Gemma-3-270m, bf16, block 16: vLLM's groups are 3 layers each (the 3 global layers; 15 sliding ->
    5 groups), a block = 3 pages of 16 × 1 × (r + 256) × 2 B; a request of n tokens takes ceil(n/16) blocks
    in the full group and ceil(min(511 + in-flight tokens, n) / 16) + 1 in each sliding group."""
    shape = shape_from_config(GEMMA3_270M, "gemma-3-270m")
    assert sum(shape.sliding) == 15 and shape.sliding_window == 512
    for r in (256, 64):
        ranks = None if r == 256 else shape.layer_ranks(r)
        groups = kv_cache_groups(shape, ranks, 16)
        page = 16 * 1 * (r + 256) * 2
        assert (groups.group_layers, groups.full_groups, groups.sliding_groups) == (3, 1, 5)
        assert groups.block_bytes == 3 * page
        assert groups.blocks(GiB) == GiB // (3 * page)
        for n, in_flight in ((100, 16384), (4096, 128), (32768, 128), (32768, 16384)):
            window_tokens = min(511 + in_flight, n)
            assert groups.request_blocks(n, 16, in_flight) == -(-n // 16) + 5 * (-(-window_tokens // 16) + 1)
        # bytes per token of the layers that grow (3 full) and one long request: full layers hold every token
        assert shape.kv_bytes_per_token(ranks, sliding=False) == 3 * (r + 256) * 2
        assert shape.request_bytes(32768, ranks) == 32768 * 3 * (r + 256) * 2 + 512 * 15 * (r + 256) * 2
        assert shape.request_bytes(300, ranks) == 300 * 18 * (r + 256) * 2
    # thin keys at r = 64: 320 / 512 of the bytes, the same blocks per request -> 1.6x the blocks
    assert kv_cache_groups(shape, shape.layer_ranks(64), 16).blocks(GiB) == GiB // (3 * 16 * 320 * 2)
    # max_sequences counts whole requests of these blocks (one pool block is vLLM's null block)
    groups = kv_cache_groups(shape, None, 16)
    blocks = groups.blocks(GiB)
    assert max_sequences(blocks, 4000, 96, 16, groups=groups, in_flight_tokens=128) == (blocks - 1) // (256 + 5 * 41)
    # a 4:3 pattern is grouped by the larger count (vLLM: max < 1.5 × min): 4-layer groups, the full one padded
    c = {**GEMMA3_270M, "num_hidden_layers": 7, "layer_types": ["sliding_attention"] * 4 + ["full_attention"] * 3}
    g = kv_cache_groups(shape_from_config(c, "4-3"), None, 16)
    assert (g.group_layers, g.full_groups, g.sliding_groups, g.block_bytes) == (4, 1, 1, 4 * 16 * 512 * 2)


def test_hybrid_model_in_the_cli_table(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_270M))
    code = main(["capacity", str(tmp_path), "--rank", "64", "--kv-mem", "1", "--context", "4096",
                 "--output-tokens", "96", "--in-flight-tokens", "128", "--json"])
    assert code == 0
    m = json.loads(capsys.readouterr().out)["models"][0]
    assert m["kv_bytes_per_token"] == {"stock": 3 * 512 * 2, "thin": 3 * 320 * 2}  # the full layers only
    row = m["contexts"][0]
    assert set(row["max_sequences"]) == {"stock", "thin"}  # no SnapKV on sliding-window models
    per_request = 256 + 5 * 41
    assert row["max_sequences"] == {"stock": (GiB // (3 * 16 * 512 * 2) - 1) // per_request,
                                    "thin": (GiB // (3 * 16 * 320 * 2) - 1) // per_request}
    assert row["vllm_cache_tokens"]["thin"] == GiB // (3 * 16 * 320 * 2) * 4096 // per_request


def test_sliding_window_configs():
    base = public("mistral-7b")
    with pytest.raises(ThinKVError, match="without `layer_types`"):
        shape_from_config({**base, "sliding_window": 4096}, "mistral-7b-v0.1")
    assert not shape_from_config({**base, "sliding_window": 4096, "use_sliding_window": False}, "qwen2-like").hybrid
    # an older Gemma 3 config: sliding_window_pattern instead of layer_types (every 6th layer global)
    old = {k: v for k, v in GEMMA3_270M.items() if k != "layer_types"} | {"sliding_window_pattern": 6}
    assert shape_from_config(old, "old").layer_types == tuple(GEMMA3_270M["layer_types"])
    with pytest.raises(ThinKVError, match="layer_types must name each of the 18 layers"):
        shape_from_config({**GEMMA3_270M, "layer_types": ["chunked_attention"] * 18}, "chunked")
    with pytest.raises(ThinKVError, match="positive sliding_window"):
        shape_from_config({**GEMMA3_270M, "sliding_window": None}, "no-window")
    # all full: an ordinary model
    full = shape_from_config({**GEMMA3_270M, "layer_types": ["full_attention"] * 18}, "full")
    assert not full.hybrid and kv_cache_groups(full, None, 16).block_bytes == 18 * 16 * 512 * 2
    # per-layer ranks on a hybrid model: vLLM pads every page to the widest (measured in
    # tests/vllm/test_thin_models.py), so the cache is that of the widest rank everywhere
    shape = shape_from_config(GEMMA3_270M, "gemma-3-270m")
    assert kv_cache_groups(shape, [64] * 17 + [128], 16) == kv_cache_groups(shape, [128] * 18, 16)
    assert kv_cache_groups(shape, [64] * 18, 16).block_bytes < kv_cache_groups(shape, [128] * 18, 16).block_bytes
    # ... and only there: a full-attention model's layers keep their own pages
    assert allocated_ranks([64, 128], [False, False]) == (64, 128)
    assert allocated_ranks([64, 128], [True, True]) == (64, 128)
    assert allocated_ranks([64, 128, 32], [True, False, True]) == (128, 128, 128)
    # ... which `thinkv compress` and engine start-up say, naming each layer type's ranks
    assert padded_pages_warning([64, 128], [False, False]) is None
    assert padded_pages_warning([64, 64], [True, False]) is None
    warning = padded_pages_warning([64, 128, 32], [True, False, True])
    assert "(sliding layers: [32, 64]; full-attention layers: [128])" in warning and "r = 128 in every layer" in warning
    types = GEMMA3_270M["layer_types"]
    assert sliding_layers(AutoConfig.for_model("gemma3_text", num_hidden_layers=len(types), layer_types=types)) == tuple(t != "full_attention" for t in types)
    assert sliding_layers(AutoConfig.for_model("llama")) == ()


def test_gemma3_parameter_count_matches_transformers():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(**{k: v for k, v in GEMMA3_270M.items() if k not in ("model_type", "torch_dtype")})
    with torch.device("meta"):
        model = Gemma3ForCausalLM(cfg)
    assert shape_from_config(GEMMA3_270M, "g").param_count() == sum(p.numel() for p in model.parameters())


def test_configs_thinkv_cannot_serve_are_refused():
    base = public("mistral-7b")
    with pytest.raises(ThinKVError, match="lacks 'num_hidden_layers'"):
        shape_from_config({k: v for k, v in base.items() if k != "num_hidden_layers"}, "broken")
    with pytest.raises(ThinKVError, match="dtype"):
        shape_from_config({**base, "torch_dtype": "float8"}, "fp8")
