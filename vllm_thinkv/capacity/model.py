"""The KV-cache capacity model: bytes per token, cache tokens and concurrent
sequences from a model's HF config alone (no weights, no vLLM).

It mirrors vLLM's allocator (`vllm.v1.core.kv_cache_utils`): a block holds
`block_size` tokens of every attention layer, a page per layer is
`block_size × H_kv × (r + d) × dtype bytes` (DiffKV layout; stock r = d),
`num_blocks = kv_bytes // (block bytes summed over layers)`, and one block is
the pool's permanently reserved null block. The throughput benchmark and the
tests compare these predictions with the engine's own KV cache config.

Hybrid models (Gemma 3: sliding-window and full-attention layers, `layer_types`)
follow vLLM's hybrid allocator (`KVCacheGroups`): the layers are split into KV
cache groups of equal size, one pool block is one page of each layer of a
group, a full-attention group takes ceil(n / block_size) blocks of a request of
n tokens and a sliding group at most ceil(min(W − 1 + in-flight tokens, n) /
block_size) + 1 (`SlidingWindowSpec.max_admission_blocks_per_request`): only the
full-attention layers grow with the context.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from vllm_thinkv.config import ThinKVConfig, allocated_ranks, check_rank
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels.checks import BLOCK_SIZE_MULTIPLE, SUPPORTED_DTYPES
from vllm_thinkv.snapkv.config import SnapKVConfig

GiB = 1024**3
FULL, SLIDING = "full_attention", "sliding_attention"
# Tokens scheduled but not yet settled, which a sliding-window layer holds on top of its window
# (`VllmConfig.max_in_flight_tokens`): concurrent batches (2 with async scheduling, vLLM's default on
# GPUs) × --max-num-batched-tokens (8192, vLLM's default for online serving on a GPU).
DEFAULT_IN_FLIGHT_TOKENS = 2 * 8192
# The dtypes the kernels serve, by config name: a model in any other dtype is not servable.
DTYPE_BYTES: dict[str, int] = {str(t).removeprefix("torch."): t.itemsize for t in SUPPORTED_DTYPES}
REQUIRED_KEYS = ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size")


def shipped_models() -> dict[str, Path]:
    """Configs shipped in the package (public config.json values): name -> path."""
    folder = files("vllm_thinkv").joinpath("data/configs")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ModelShape:
    """What capacity depends on, read from a config.json."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    dtype: str
    attention_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2  # RMSNorms of a layer (Gemma 3: 4, around attention and MLP)
    ranks: tuple[int, ...] | None = None  # a thin-key checkpoint's per-layer QK ranks
    layer_types: tuple[str, ...] | None = None  # per layer: "full_attention" / "sliding_attention"; None: all full
    sliding_window: int | None = None  # W of the sliding layers

    @property
    def attention(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else f"GQA ({self.num_heads // self.num_kv_heads} q/kv)"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def param_count(self) -> int:
        """Parameters of the original dense decoder (Llama/Mistral/Qwen2/Qwen3/Gemma 3 text layout): only
        used to subtract the weights from the GPU memory."""
        h, d, hq, hkv = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads
        attn = h * hq * d + 2 * h * hkv * d + hq * d * h
        if self.attention_bias:
            attn += hq * d + 2 * hkv * d
        if self.qk_norm:
            attn += 2 * d
        layer = attn + 3 * h * self.intermediate_size + self.norms_per_layer * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + h

    def layer_ranks(self, rank: int | None) -> tuple[int, ...]:
        """QK ranks per layer: `rank` for every layer, else the checkpoint's own ranks, else d/4
        (the Thin Keys paper's setting)."""
        if rank is not None:
            if self.ranks is not None:
                raise ThinKVError(
                    f"{self.name} is a thin-key checkpoint with its own per-layer ranks; drop --rank "
                    "(or point at the original model's config)"
                )
            check_rank(rank, self.head_dim, "pca", what="--rank")
            return (rank,) * self.num_layers
        if self.ranks is not None:
            return self.ranks
        return (self.head_dim // 4,) * self.num_layers

    @property
    def sliding(self) -> tuple[bool, ...]:
        """Per layer: does it attend over a sliding window (its cache holds only the window)?"""
        if self.layer_types is None:
            return (False,) * self.num_layers
        return tuple(t == SLIDING for t in self.layer_types)

    @property
    def hybrid(self) -> bool:
        return any(self.sliding)

    def kv_bytes_per_token(self, ranks: Sequence[int] | None = None, dtype_bytes: int | None = None,
                           sliding: bool | None = None) -> int:
        """Bytes one token occupies in all layers: H_kv·(r + d)·dtype summed over layers (stock: r = d);
        with `sliding` False / True: over the full-attention / sliding-window layers only."""
        b = dtype_bytes or self.dtype_bytes
        rs = ranks if ranks is not None else (self.head_dim,) * self.num_layers
        return sum(self.num_kv_heads * (r + self.head_dim) * b for r, sw in zip(rs, self.sliding)
                   if sliding is None or sw == sliding)

    def key_bytes_per_token(self, ranks: Sequence[int] | None = None, dtype_bytes: int | None = None,
                            sliding: bool | None = None) -> int:
        b = dtype_bytes or self.dtype_bytes
        rs = ranks if ranks is not None else (self.head_dim,) * self.num_layers
        return sum(self.num_kv_heads * r * b for r, sw in zip(rs, self.sliding) if sliding is None or sw == sliding)

    def request_bytes(self, tokens: int, ranks: Sequence[int] | None = None, keys_only: bool = False) -> int:
        """KV bytes one request of `tokens` tokens holds: every token in a full-attention layer, the
        last min(tokens, W) in a sliding-window layer (vLLM frees the blocks that slid out)."""
        per_token = self.key_bytes_per_token if keys_only else self.kv_bytes_per_token
        if not self.hybrid:
            return tokens * per_token(ranks)
        return tokens * per_token(ranks, sliding=False) + min(tokens, self.sliding_window) * per_token(ranks, sliding=True)


def layer_types_of(cfg: Mapping[str, Any], name: str, layers: int) -> tuple[tuple[str, ...] | None, int | None]:
    """(per-layer attention types, window) of a config; (None, None) for a model of full-attention layers.

    `layer_types` (Gemma 3, recent transformers configs) names each layer; an older Gemma 3 config gives
    `sliding_window_pattern` (every n-th layer global, transformers' rule). A `sliding_window` without
    layer types (Mistral-7B-v0.1, Qwen2's `max_window_layers`) is refused: which layers slide is not
    written in the config."""
    types = cfg.get("layer_types")
    pattern = cfg.get("sliding_window_pattern")
    if types is None and pattern and str(cfg.get("model_type", "")).startswith("gemma3"):
        types = [SLIDING if (i + 1) % int(pattern) else FULL for i in range(layers)]
    if types is None:
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
            raise ThinKVError(
                f"{name}: sliding-window attention (window {cfg['sliding_window']}) without `layer_types`: which "
                "layers slide is not in the config, so the capacity model cannot model vLLM's hybrid allocator; "
                "add `layer_types` (\"full_attention\" / \"sliding_attention\" per layer)"
            )
        return None, None
    if len(types) != layers or not set(types) <= {FULL, SLIDING}:
        raise ThinKVError(f"{name}: layer_types must name each of the {layers} layers {FULL!r} or {SLIDING!r}; "
                          f"got {sorted(set(map(str, types)))} for {len(types)} layers")
    if SLIDING not in types:
        return None, None
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or window <= 0:
        raise ThinKVError(f"{name}: sliding_attention layers need a positive sliding_window, got {window!r}")
    return tuple(types), window


def _get(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ThinKVError(f"{where} lacks {key!r}; a decoder config needs {', '.join(REQUIRED_KEYS)}")
    return cfg[key]


def shape_from_config(cfg: Mapping[str, Any], name: str) -> ModelShape:
    """A ModelShape from config.json contents; raises ThinKVError on what thinkv cannot serve."""
    if not isinstance(cfg, Mapping):
        raise ThinKVError(f"{name}: config must be a JSON object")
    for key in ("kv_lora_rank", "q_lora_rank"):
        if cfg.get(key):
            raise ThinKVError(f"{name}: MLA models (DeepSeek-style {key}) are not supported; thinkv supports MHA/GQA decoders")
    layers, heads = int(_get(cfg, "num_hidden_layers", name)), int(_get(cfg, "num_attention_heads", name))
    layer_types, window = layer_types_of(cfg, name, layers)
    hidden = int(_get(cfg, "hidden_size", name))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if min(layers, heads, kv_heads, head_dim, hidden) <= 0 or heads % kv_heads:
        raise ThinKVError(f"{name}: inconsistent attention shape (layers {layers}, heads {heads}, KV heads {kv_heads}, head_dim {head_dim})")
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise ThinKVError(f"{name}: dtype {dtype!r} is not supported; supported: {', '.join(DTYPE_BYTES)}")
    ranks = None
    if "thinkv" in cfg:
        section = ThinKVConfig.from_dict(cfg["thinkv"])
        if section.num_layers != layers or section.head_dim != head_dim:
            raise ThinKVError(
                f"{name}: its thinkv section ({section.num_layers} ranks, head_dim {section.head_dim}) does not "
                f"match the model ({layers} layers, head_dim {head_dim})"
            )
        ranks = section.ranks
    return ModelShape(
        name=name,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
        vocab_size=int(_get(cfg, "vocab_size", name)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings"),
        dtype=dtype,
        attention_bias=bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2",
        qk_norm=cfg.get("model_type") in ("qwen3", "gemma3_text"),
        norms_per_layer=4 if cfg.get("model_type") == "gemma3_text" else 2,
        ranks=ranks,
        layer_types=layer_types,
        sliding_window=window,
    )


def load_shape(model: str | Path) -> ModelShape:
    """A shipped model name (e.g. `llama-3.1-8b`), an HF folder or a config.json path."""
    shipped = shipped_models()
    key = str(model).lower()
    if key in shipped:
        path, name = shipped[key], key
    else:
        path = Path(model).expanduser()
        name = path.name if path.name != "config.json" else path.parent.name
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ThinKVError(
                f"unknown model {str(model)!r}: not a shipped config ({', '.join(sorted(shipped))}) "
                "and no such HF folder or config.json"
            )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ThinKVError(f"cannot read {path} as a JSON config: {e}") from None
    return shape_from_config(cfg, name)


@dataclass(frozen=True)
class MemoryBudget:
    kv_bytes: int
    weights_bytes: int | None
    assumption: str


def memory_budget(shape: ModelShape, gpu_mem_gib: float, gpus: int = 1, utilization: float = 0.9,
                  kv_mem_gib: float | None = None) -> MemoryBudget:
    """KV bytes available: `kv_mem_gib` if given, else gpus × gpu_mem × utilization − weights
    (parameter count × dtype). Activations, CUDA graphs and non-torch memory are not subtracted;
    vLLM profiles them, so its real budget is a few GiB lower."""
    if kv_mem_gib is not None:
        if kv_mem_gib <= 0:
            raise ThinKVError(f"--kv-mem must be positive GiB, got {kv_mem_gib}")
        return MemoryBudget(int(kv_mem_gib * GiB), None, f"KV budget given: {kv_mem_gib:g} GiB")
    if gpu_mem_gib <= 0 or gpus < 1 or not 0 < utilization <= 1:
        raise ThinKVError(
            f"need --gpu-mem > 0 GiB, --gpus >= 1 and --gpu-util in (0, 1]; got {gpu_mem_gib}, {gpus}, {utilization}"
        )
    weights = shape.param_count() * shape.dtype_bytes
    kv = int(gpus * gpu_mem_gib * utilization * GiB) - weights
    text = (f"KV budget = {gpus} × {gpu_mem_gib:g} GiB × {utilization:g} − {weights / GiB:.1f} GiB weights "
            f"({shape.param_count() / 1e9:.2f} B params × {shape.dtype_bytes} B)")
    if kv <= 0:
        raise ThinKVError(
            f"{shape.name}: the weights ({weights / GiB:.1f} GiB) leave no KV memory on {gpus} × {gpu_mem_gib:g} GiB "
            f"at utilization {utilization:g}; use more --gpus or set --kv-mem"
        )
    return MemoryBudget(kv, weights, text)


def check_block_size(block_size: int) -> None:
    """vLLM's block size must be one the kernels tile (whole BLOCK_SIZE_MULTIPLE-token tiles)."""
    if block_size <= 0 or block_size % BLOCK_SIZE_MULTIPLE:
        raise ThinKVError(
            f"--block-size must be a positive multiple of {BLOCK_SIZE_MULTIPLE} (what thinkv supports), got {block_size}"
        )


@dataclass(frozen=True)
class KVCacheGroups:
    """vLLM's KV cache groups of a model (`get_kv_cache_groups`): a pool block is one page of each layer
    of a group; every group draws its blocks from the one pool.

    Full-attention models: one group of all layers. Hybrid models (vLLM's
    `_get_kv_cache_groups_uniform_page_size`): the layers of each type are split into groups of
    `group_layers` layers, the smaller type's count (the larger one's if it is below 1.5 times it),
    a type's last group padded; every page is padded to the widest layer's (`config.allocated_ranks`)."""

    group_layers: int
    full_groups: int
    sliding_groups: int
    block_bytes: int  # bytes of one pool block: the pages of the widest group
    sliding_window: int | None = None

    def blocks(self, kv_bytes: int) -> int:
        """Blocks vLLM allocates for this many bytes."""
        return kv_bytes // self.block_bytes

    def request_blocks(self, tokens: int, block_size: int, in_flight_tokens: int = DEFAULT_IN_FLIGHT_TOKENS) -> int:
        """Blocks a request of `tokens` tokens may hold, summed over groups: what vLLM reserves at admission
        (`max_admission_blocks_per_request`) and counts in its maximum concurrency. A sliding group
        holds its last W − 1 tokens plus the tokens in flight (`in_flight_tokens`), never more
        than the request, and one more block as the window need not start at a block boundary."""
        full = self.full_groups * cdiv(tokens, block_size)
        if not self.sliding_groups:
            return full
        held = min(self.sliding_window - 1 + in_flight_tokens, tokens)
        return full + self.sliding_groups * (cdiv(held, block_size) + 1)


def kv_cache_groups(shape: ModelShape, ranks: Sequence[int] | None, block_size: int,
                    dtype_bytes: int | None = None, row_extra_bytes: int = 0) -> KVCacheGroups:
    """The groups vLLM makes of `shape`'s layers at these QK ranks (None: stock, r = d); row_extra_bytes:
    what each cached (token, KV head) row holds besides its r + d values (a merging SnapKV policy's count,
    `snapkv.policies.row_extra_bytes`)."""
    b = dtype_bytes or shape.dtype_bytes
    rs = allocated_ranks(ranks if ranks is not None else (shape.head_dim,) * shape.num_layers, shape.sliding)
    pages = [block_size * shape.num_kv_heads * ((r + shape.head_dim) * b + row_extra_bytes) for r in rs]
    n_sliding = sum(shape.sliding)
    if n_sliding in (0, shape.num_layers):  # one attention type: one group of every layer
        return KVCacheGroups(shape.num_layers, int(n_sliding == 0), int(n_sliding > 0), sum(pages),
                             shape.sliding_window if n_sliding else None)
    n_full = shape.num_layers - n_sliding
    group = min(n_full, n_sliding)
    if max(n_full, n_sliding) < 1.5 * group:
        group = max(n_full, n_sliding)
    return KVCacheGroups(group, cdiv(n_full, group), cdiv(n_sliding, group), group * pages[0], shape.sliding_window)


def num_blocks(kv_bytes: int, bytes_per_token: int, block_size: int) -> int:
    """Blocks vLLM allocates for this many bytes (each block: block_size tokens × all layers)."""
    return kv_bytes // (bytes_per_token * block_size)


def sequence_blocks(prompt: int, output: int, block_size: int, snapkv: SnapKVConfig | None = None) -> int:
    """Blocks one request holds at its end (prompt + output tokens). With SnapKV the prompt is
    compacted to budget + window tokens once its first decode step has run: the blocks of the gap
    [ceil(kept/bs), prompt // bs) are given back (see `vllm_thinkv.snapkv.kv_cache`)."""
    full = cdiv(prompt + output, block_size)
    kept = snapkv.kept_len(prompt) if snapkv is not None else None
    if kept is None:
        return full
    return cdiv(kept, block_size) + full - prompt // block_size


def max_sequences(blocks: int, prompt: int, output: int, block_size: int, snapkv: SnapKVConfig | None = None,
                  groups: KVCacheGroups | None = None, in_flight_tokens: int = DEFAULT_IN_FLIGHT_TOKENS) -> int:
    """Concurrent requests of prompt + output tokens that fit in `blocks` (one is the null block).

    SnapKV does not lower the prefill peak: a request holds its whole prompt until it is compacted.
    The model lets one request at a time be in prefill (vLLM prefills one long prompt at a time) and
    the others hold their compacted prompt plus all their output. A hybrid model's `groups`: each
    request takes `groups.request_blocks` (thinkv serves no SnapKV on sliding-window models)."""
    usable = blocks - 1
    if groups is not None and groups.sliding_groups:
        if snapkv is not None:
            raise ThinKVError("SnapKV is not served on models with sliding-window layers")
        return max(usable // groups.request_blocks(prompt + output, block_size, in_flight_tokens), 0)
    per_seq = sequence_blocks(prompt, output, block_size, snapkv)
    if snapkv is None or snapkv.kept_len(prompt) is None:
        return max(usable // per_seq, 0)
    prefill = cdiv(prompt + 1, block_size)
    return 0 if usable < prefill else 1 + (usable - prefill) // per_seq
