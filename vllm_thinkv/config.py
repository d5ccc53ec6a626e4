"""The `thinkv` section of a checkpoint's config.json, and the compression request.

Two dataclasses, one module, because both arrive through the same key:

* `ThinKVConfig` describes a *compressed* checkpoint (weights already thin):
  ``{"version": 1, "method": "pca", "form": "post_rope_projection", "ranks": [48, ...],
  "head_dim": 64, "finetuned": false, "calibration": {...}}``.
* `CompressRequest` asks for compression of an *original* checkpoint, at load
  time (``--hf-overrides '{"thinkv": {"method": "pca", "rank": 48}}'``) or from
  the CLI: ``{"method": "pca", "rank": 48 | "rank_budget": 32, "calib": path}``.

`parse_thinkv_section` tells them apart (a checkpoint section has "version").
Both validate on construction and raise `ThinKVError` naming the problem and
what is supported, so bad input fails at start-up, not mid-way.

Thin forms (how the thin model computes q·k; see `vllm_thinkv.hf.thin_attention`):

* ``rope_subspace`` (pairs, svd): thin q_proj/k_proj rows and RoPE applied in
  the r-dim space with per-KV-head inverse frequencies ``rope_inv_freq [Hkv, r/2]``.
* ``post_rope_projection`` (pca; pairs on Qwen3 and Gemma 3): original q/k and RoPE at
  full d, then per-KV-head bases ``q_basis``/``k_basis [Hkv, d, r]``.
* ``shared_projection`` (joint): original q/k and RoPE at full d, then one key
  latent per group of `share_group` (S) KV heads, ``z = k_basis[s]ᵀ [k_{sS}; …; k_{sS+S-1}]``
  with ``k_basis [Hkv/S, S·d, S·r]``, cached split across the group's S KV-head
  slots (r dims each: the same bytes as per-head rank r); query head h scores
  with ``q̃_h = q_basis[h // g]ᵀ q_h``, ``q_basis [Hkv, d, S·r]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels.checks import MAX_HEAD_DIM, QK_MULTIPLE

THINKV_VERSION = 1
# Calibration window when the request names none: the serving length (vLLM's
# max_model_len at load time, the model's max_position_embeddings offline), up to
# this many tokens. Measured on SmolLM2 (joint r = 32): calibrated on 1024-token
# windows, PPL per 512 positions rises from +6% to x3.5 by position 4096;
# calibrated on 4096-token windows it stays within +11-17% all the way.
DEFAULT_CALIB_CTX = 4096
METHODS = ("pairs", "pca", "svd", "joint")
FORMS = ("rope_subspace", "post_rope_projection", "shared_projection")
SHARED_METHODS = ("joint",)  # methods whose key latent is shared by groups of KV heads

# original HF architecture -> thin architecture registered by the plugin
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "ThinKVLlamaForCausalLM",
    "MistralForCausalLM": "ThinKVMistralForCausalLM",
    "Qwen2ForCausalLM": "ThinKVQwen2ForCausalLM",
    "Qwen3ForCausalLM": "ThinKVQwen3ForCausalLM",
    "Gemma3ForCausalLM": "ThinKVGemma3ForCausalLM",
}
ORIGINAL_ARCHITECTURES: dict[str, str] = {v: k for k, v in ARCHITECTURES.items()}
# architectures that RMS-normalise each q/k head over all d dims before RoPE
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Gemma3ForCausalLM")
# RoPE types whose frequencies are static and unscaled, so a thin head can carry
# its kept frequencies as a plain inverse-frequency tensor (rope_subspace form).
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


def form_for(method: str, architecture: str) -> str:
    """The thin form a method produces on an (original) architecture.

    Qwen3 and Gemma 3 normalise each q/k head (RMSNorm over all d dims) before
    RoPE, so their q/k cannot be sliced or projected inside q_proj/k_proj (the
    norm of r rows is not the norm of d): `pairs` becomes a selection basis
    after RoPE (exact), and `svd` (which folds a pre-RoPE basis into k_proj) is
    refused.
    """
    _check_method(method)
    _check_architecture(architecture)
    if method == "pca":
        return "post_rope_projection"
    if method == "joint":
        return "shared_projection"
    if architecture in QK_NORM_ARCHITECTURES:
        name = architecture.removesuffix("ForCausalLM")
        if method == "svd":
            raise ThinKVError(
                f"method 'svd' folds a pre-RoPE key basis into k_proj, which {name}'s per-head k_norm "
                f"(RMSNorm over the full head) prevents; use --method pca or pairs for {name}"
            )
        return "post_rope_projection"
    return "rope_subspace"


def check_rank(rank: int, head_dim: int, method: str, what: str = "rank") -> None:
    """Raise ThinKVError unless `rank` is a QK head size this method and the kernels support."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ThinKVError(f"{what} must be an integer, got {rank!r}")
    # One rule, one message: the kernels' QK head sizes (`kernels.checks.check_qk_head_dim`),
    # up to the model's head size. (Multiples of 8 are even, as `pairs` needs: whole rotary pairs.)
    top = min(head_dim, MAX_HEAD_DIM)
    if rank % QK_MULTIPLE or not QK_MULTIPLE <= rank <= top:
        limit = "the model's head_dim" if top == head_dim else f"the thinkv kernels' limit (head_dim {head_dim})"
        raise ThinKVError(f"{what} {rank} is not supported: it must be a multiple of {QK_MULTIPLE} from "
                          f"{QK_MULTIPLE} to {top} ({limit})")


def sliding_layers(hf_config: Any) -> tuple[bool, ...]:
    """Per layer: does it attend over a sliding window (the HF config's `layer_types`; empty without)?"""
    return tuple(t == "sliding_attention" for t in getattr(hf_config, "layer_types", None) or ())


def allocated_ranks(ranks: Sequence[int], sliding: Sequence[bool]) -> tuple[int, ...]:
    """The QK rank each layer's KV page is allocated for, given which layers slide.

    A model with both sliding-window and full-attention layers goes through vLLM's hybrid
    allocator, which unifies page sizes (`unify_kv_cache_spec_page_size`, vLLM 0.32 and 0.33):
    a page of r + d rows never divides a wider one (r_max + d < 2(r + d)), so every page is
    padded to the widest. Per-layer ranks there save only what the widest rank saves (measured:
    a tiny Gemma 3 at ranks 64/16/64/16 gets the blocks of r = d = 64). Elsewhere each layer's
    page is its own."""
    if 0 < sum(map(bool, sliding)) < len(sliding):
        return (max(ranks),) * len(ranks)
    return tuple(ranks)


def padded_pages_warning(ranks: Sequence[int], sliding: Sequence[bool]) -> str | None:
    """What `thinkv compress` and engine start-up say when `allocated_ranks` pads these ranks (None if not):
    the checkpoint serves correctly, so a warning with the fix rather than a refusal."""
    if allocated_ranks(ranks, sliding) == tuple(ranks):
        return None
    return (
        "thinkv: this checkpoint's QK ranks differ across the layers of a model with sliding-window and "
        f"full-attention layers (sliding layers: {sorted({r for r, s in zip(ranks, sliding) if s})}; "
        f"full-attention layers: {sorted({r for r, s in zip(ranks, sliding) if not s})}). vLLM's hybrid "
        "allocator pads every layer's KV page to the widest, so the cache holds as many tokens as with "
        f"r = {max(ranks)} in every layer: the smaller ranks save no memory. Compress with one --rank for "
        "every layer to shrink the cache."
    )


def check_share_group(share_group: Any, ranks: tuple[int, ...] | list[int], method: str) -> None:
    """A shared key is S·r wide per query head: S a positive integer, S·r within the kernels' limit."""
    if isinstance(share_group, bool) or not isinstance(share_group, int) or share_group < 1:
        raise ThinKVError(f"share_group must be a positive integer (KV heads per shared key latent), got {share_group!r}")
    if method not in SHARED_METHODS:
        if share_group != 1:
            raise ThinKVError(f"share_group {share_group} needs a shared-key method ({', '.join(SHARED_METHODS)}); "
                              f"method {method!r} keeps one key basis per KV head")
        return
    wide = [r for r in ranks if share_group * r > MAX_HEAD_DIM]
    if wide:
        raise ThinKVError(
            f"share_group {share_group} x rank {max(wide)} = {share_group * max(wide)} is wider than the thinkv kernels' "
            f"{MAX_HEAD_DIM}-dim query/key limit: use a share group of at most {max(1, MAX_HEAD_DIM // max(wide))} "
            f"KV heads, or a lower rank"
        )


def check_share_divides(share_group: int, num_kv_heads: int) -> None:
    """Share groups hold whole KV heads: S must divide the model's KV heads."""
    if num_kv_heads % share_group:
        divisors = [s for s in range(1, num_kv_heads + 1) if num_kv_heads % s == 0]
        raise ThinKVError(f"share_group {share_group} does not divide the model's {num_kv_heads} KV heads; "
                          f"supported: {', '.join(map(str, divisors))}")


def check_tensor_parallel(num_kv_heads: int, tp_size: int, share_group: int = 1) -> None:
    """A thin checkpoint under tensor parallelism: each rank must hold whole KV heads with
    their bases (and whole share groups). vLLM replicates KV heads when the TP size
    exceeds them; a thin model's per-KV-head tensors are not replicated, so that is refused."""
    if num_kv_heads % tp_size:
        raise ThinKVError(
            f"thin-key models need the tensor-parallel size ({tp_size}) to divide the number of KV heads "
            f"({num_kv_heads}): each rank holds whole KV heads with their bases (supported: "
            f"{', '.join(str(t) for t in range(1, num_kv_heads + 1) if num_kv_heads % t == 0)}; the same "
            "model at r = d on the thinkv backend runs at any TP size, with vLLM replicating its KV heads)"
        )
    if (num_kv_heads // tp_size) % share_group:
        raise ThinKVError(
            f"this thin checkpoint shares one key latent among {share_group} KV heads, which tensor parallelism "
            f"{tp_size} splits ({num_kv_heads} KV heads, {num_kv_heads // tp_size} per rank): use a "
            f"tensor-parallel size that keeps each share group on one rank"
        )


def check_load_time_parallel(request: CompressRequest, tensor_parallel: int, pipeline_parallel: int = 1) -> None:
    """Load-time compression calibrates the whole original model with transformers before
    vLLM loads anything. Under tensor parallelism each rank calibrates it on its own device
    (the original model in fp32 on every GPU) and keeps its own KV heads' tensors, so every
    rank must choose the same ranks: a uniform `rank` (per-layer ranks chosen from statistics
    could differ between ranks)."""
    if pipeline_parallel > 1:
        raise ThinKVError("load-time compression does not support pipeline parallelism; compress offline "
                          "(`thinkv compress`) and serve the thin checkpoint")
    if tensor_parallel > 1 and request.rank is None:
        raise ThinKVError("load-time compression under tensor parallelism needs a uniform `rank`: each rank "
                          "calibrates on its own, and per-layer ranks chosen from statistics (rank_budget, targets) "
                          "must be the same on every rank; compress offline (`thinkv compress`) for those")


def _check_method(method: Any) -> None:
    if method not in METHODS:
        raise ThinKVError(f"unknown thinkv method {method!r}; supported: {', '.join(METHODS)}")


def _check_architecture(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise ThinKVError(
            f"unsupported architecture {architecture!r}; thinkv supports {', '.join(ARCHITECTURES)}"
        )


def check_architecture(architectures: list[str], has_section: bool) -> None:
    """A `thinkv` section needs a thinkv architecture to read it, and a thinkv
    architecture needs the section (one rule for the engine, `thinkv serve`'s
    preflight and the thin model)."""
    thin = any(a in ARCHITECTURES.values() for a in architectures)
    if has_section and not thin:
        name = ARCHITECTURES.get(architectures[0] if architectures else "", "ThinKVLlamaForCausalLM")
        raise ThinKVError(
            f"the model config has a `thinkv` section but architecture {architectures} would ignore it; for load-time "
            f'compression also override the architecture: --hf-overrides \'{{"architectures": ["{name}"], "thinkv": ...}}\''
        )
    if thin and not has_section:
        raise ThinKVError(
            "the model config has no `thinkv` section: thinkv architectures serve checkpoints written by "
            "`thinkv compress`, or compress at load time with --hf-overrides "
            '\'{"architectures": ["ThinKVLlamaForCausalLM"], "thinkv": {"method": "pca", "rank": 48}}\''
        )


def _check_keys(d: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ThinKVError(f"unknown key(s) in {what}: {sorted(unknown)}; allowed: {sorted(allowed)}")


@dataclass(frozen=True)
class ThinKVConfig:
    """The `thinkv` section of a compressed checkpoint (see module docstring)."""

    method: str
    form: str
    ranks: tuple[int, ...]
    head_dim: int
    finetuned: bool = False
    calibration: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    version: int = THINKV_VERSION
    share_group: int = 1  # KV heads per shared key latent (form shared_projection); 1 otherwise

    def __post_init__(self) -> None:
        if self.version != THINKV_VERSION:
            raise ThinKVError(
                f"thinkv section version {self.version!r} is not supported; this vllm-thinkv reads version {THINKV_VERSION}"
            )
        _check_method(self.method)
        if self.form not in FORMS:
            raise ThinKVError(f"unknown thinkv form {self.form!r}; supported: {', '.join(FORMS)}")
        allowed = {"pairs": ("rope_subspace", "post_rope_projection"), "pca": ("post_rope_projection",),
                   "svd": ("rope_subspace",), "joint": ("shared_projection",)}[self.method]
        if self.form not in allowed:
            raise ThinKVError(f"method {self.method!r} cannot produce form {self.form!r}; it produces {' or '.join(allowed)}")
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ThinKVError(f"head_dim must be a positive even integer, got {self.head_dim!r}")
        object.__setattr__(self, "ranks", tuple(self.ranks))
        if not self.ranks:
            raise ThinKVError("thinkv section has an empty 'ranks' list; it needs one rank per layer")
        for i, r in enumerate(self.ranks):
            check_rank(r, self.head_dim, self.method, what=f"rank of layer {i}")
        check_share_group(self.share_group, self.ranks, self.method)
        if not isinstance(self.finetuned, bool):
            raise ThinKVError(f"'finetuned' must be true or false, got {self.finetuned!r}")

    @property
    def num_layers(self) -> int:
        return len(self.ranks)

    @property
    def mean_rank(self) -> float:
        return sum(self.ranks) / len(self.ranks)

    @property
    def fitted_positions(self) -> int | None:
        """How many positions the thin q·k was fitted on, where quality was measured
        to depend on it: the calibration window, for `pca` (bases from post-RoPE
        statistics of positions 0..ctx-1) and `svd` (attention-weighted statistics,
        merged slow frequencies). SmolLM2 r = 32 calibrated at 1024, PPL at positions
        1536-2048: pca 54 and svd 71 against 37.8 for pca calibrated at 2048 and 60
        for `pairs`, whose selection is exact under RoPE (None here). Also None when
        the checkpoint does not record its calibration window."""
        ctx = self.calibration.get("ctx")
        if self.method not in ("pca", "svd", "joint") or isinstance(ctx, bool) or not isinstance(ctx, int):
            return None
        return ctx

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ThinKVConfig:
        if not isinstance(d, Mapping):
            raise ThinKVError(f"the thinkv section must be a JSON object, got {type(d).__name__}")
        _check_keys(d, {"version", "method", "form", "ranks", "head_dim", "finetuned", "calibration", "share_group"},
                    "the thinkv section")
        for key in ("version", "method", "form", "ranks", "head_dim"):
            if key not in d:
                raise ThinKVError(f"the thinkv section lacks {key!r}")
        if not isinstance(d["ranks"], (list, tuple)):
            raise ThinKVError(f"'ranks' must be a list of per-layer ranks, got {d['ranks']!r}")
        return cls(
            method=d["method"],
            form=d["form"],
            ranks=tuple(d["ranks"]),
            head_dim=d["head_dim"],
            finetuned=d.get("finetuned", False),
            calibration=dict(d.get("calibration", {})),
            version=d["version"],
            share_group=d.get("share_group", 1),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "version": self.version,
            "method": self.method,
            "form": self.form,
            "ranks": list(self.ranks),
            "head_dim": self.head_dim,
            "finetuned": self.finetuned,
            "calibration": dict(self.calibration),
        }
        if self.method in SHARED_METHODS:
            out["share_group"] = self.share_group
        return out


@dataclass(frozen=True)
class CompressRequest:
    """What to compress into: a method and either a uniform `rank` or a `rank_budget`
    (mean rank, allocated per layer from calibration statistics).

    `calib`: text files to calibrate on; empty = the public-domain text shipped
    in the package (what load-time compression uses by default).
    `calib_tokens`/`calib_ctx`: how much text, in windows of how many tokens;
    calib_ctx None = the serving length up to DEFAULT_CALIB_CTX (`for_serving`).
    `share_group` (method joint): KV heads per shared key latent; None = as many
    as the kernels' query/key width allows (`share_group_for`).
    Instead of a rank, a quality target (`compress.target`): `target_logit_error`
    (predicted relative logit error, e.g. 0.05) or `target_ppl_increase` (held-out
    perplexity over the original's, e.g. 0.05 for +5%): per-layer ranks with the
    fewest cache bytes that meet it.
    """

    method: str
    rank: int | None = None
    rank_budget: int | None = None
    calib: tuple[str, ...] = ()
    calib_tokens: int = 16384
    calib_ctx: int | None = None
    share_group: int | None = None
    target_logit_error: float | None = None
    target_ppl_increase: float | None = None

    def __post_init__(self) -> None:
        _check_method(self.method)
        given = [x is not None for x in (self.rank, self.rank_budget, self.target_logit_error, self.target_ppl_increase)]
        if sum(given) != 1:
            raise ThinKVError("give exactly one of 'rank' (uniform), 'rank_budget' (mean rank, allocated per layer), "
                              "'target_logit_error' or 'target_ppl_increase' (per-layer ranks for a quality target)")
        for name in ("target_logit_error", "target_ppl_increase"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1):
                raise ThinKVError(f"{name} must be a number between 0 and 1 (e.g. 0.05), got {v!r}")
        if isinstance(self.calib, str):
            object.__setattr__(self, "calib", (self.calib,))
        object.__setattr__(self, "calib", tuple(str(p) for p in self.calib))
        for name in ("calib_tokens", "calib_ctx"):
            v = getattr(self, name)
            if name == "calib_ctx" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 1:
                raise ThinKVError(f"{name} must be an integer > 1, got {v!r}")
        if self.share_group is not None:
            check_share_group(self.share_group, [self.nominal_rank], self.method)

    def for_serving(self, max_len: int) -> CompressRequest:
        """The request with its calibration window set: as given, or the serving length
        `max_len` up to DEFAULT_CALIB_CTX (and no longer than the calibration tokens)."""
        if self.calib_ctx is not None:
            return self
        return dataclasses.replace(self, calib_ctx=max(2, min(max_len, DEFAULT_CALIB_CTX, self.calib_tokens)))

    @property
    def nominal_rank(self) -> int:
        """The rank the request names: uniform, mean, or (for a target) the smallest, 8."""
        return self.rank or self.rank_budget or QK_MULTIPLE

    @property
    def target(self) -> tuple[str, float] | None:
        if self.target_logit_error is not None:
            return "logit_error", self.target_logit_error
        if self.target_ppl_increase is not None:
            return "ppl_increase", self.target_ppl_increase
        return None

    def share_group_for(self, num_kv_heads: int) -> int:
        """KV heads per key latent on a model with `num_kv_heads`: 1 for per-head methods;
        for `joint` the requested group (it must divide the KV heads), else the largest
        divisor of num_kv_heads whose shared key (S × rank) fits the kernels' 256 dims
        (all of a layer's KV heads on models with few of them)."""
        if self.method not in SHARED_METHODS:
            return 1
        if self.share_group is not None:
            check_share_divides(self.share_group, num_kv_heads)
            return self.share_group
        nominal = self.nominal_rank
        return max(s for s in range(1, num_kv_heads + 1) if num_kv_heads % s == 0 and s * nominal <= MAX_HEAD_DIM)

    def check_head_dim(self, head_dim: int) -> None:
        """Validate the requested rank against the model's head size (known once its config is read)."""
        if self.rank is not None:
            check_rank(self.rank, head_dim, self.method)
        elif self.rank_budget is not None:
            check_rank(self.rank_budget, head_dim, self.method, what="rank budget")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompressRequest:
        if not isinstance(d, Mapping):
            raise ThinKVError(f"the thinkv request must be a JSON object, got {type(d).__name__}")
        _check_keys(d, {"method", "rank", "rank_budget", "calib", "calib_tokens", "calib_ctx", "share_group",
                        "target_logit_error", "target_ppl_increase"}, "the thinkv request")
        if "method" not in d:
            raise ThinKVError(f"the thinkv request lacks 'method' (one of {', '.join(METHODS)})")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for name in ("rank", "rank_budget", "target_logit_error", "target_ppl_increase"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update(calib=list(self.calib), calib_tokens=self.calib_tokens)
        if self.calib_ctx is not None:
            out["calib_ctx"] = self.calib_ctx
        if self.share_group is not None:
            out["share_group"] = self.share_group
        return out


def parse_thinkv_section(d: Mapping[str, Any]) -> ThinKVConfig | CompressRequest:
    """A checkpoint's section (has "version") or a compression request (has "rank"/"rank_budget")."""
    if isinstance(d, Mapping) and "version" in d:
        return ThinKVConfig.from_dict(d)
    return CompressRequest.from_dict(d)


def rope_type(hf_config: Any) -> str:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, Mapping) else "default"


def check_model_sizes(cfg: ThinKVConfig, num_layers: int, head_dim: int, num_kv_heads: int | None = None) -> None:
    """The section's per-layer ranks, head_dim and share group against the model config's."""
    if cfg.num_layers != num_layers:
        raise ThinKVError(f"the thinkv section lists {cfg.num_layers} layer ranks but the model has {num_layers} layers")
    if cfg.head_dim != head_dim:
        raise ThinKVError(f"the thinkv section says head_dim {cfg.head_dim} but the model config has {head_dim}")
    if num_kv_heads is not None:
        check_share_divides(cfg.share_group, num_kv_heads)


def expected_shapes(cfg: ThinKVConfig, hf_config: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of the q/k-side tensors a thin checkpoint must hold, by HF name.

    Shared by `hf.load` and the vLLM loader so that both reject a checkpoint
    whose `thinkv` section disagrees with its weights in the same words.
    """
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    h, hkv, hidden = hf_config.num_attention_heads, hf_config.num_key_value_heads, hf_config.hidden_size
    check_model_sizes(cfg, hf_config.num_hidden_layers, head_dim, hkv)
    s = cfg.share_group
    bias = bool(getattr(hf_config, "attention_bias", False)) or hf_config.model_type == "qwen2"
    shapes: dict[str, tuple[int, ...]] = {}
    for i, r in enumerate(cfg.ranks):
        p = f"model.layers.{i}.self_attn."
        qk = r if cfg.form == "rope_subspace" else head_dim  # q/k projection rows per head
        shapes[p + "q_proj.weight"] = (h * qk, hidden)
        shapes[p + "k_proj.weight"] = (hkv * qk, hidden)
        if bias:
            shapes[p + "q_proj.bias"] = (h * qk,)
            shapes[p + "k_proj.bias"] = (hkv * qk,)
        if cfg.form == "rope_subspace":
            shapes[p + "rope_inv_freq"] = (hkv, r // 2)
        else:  # post_rope_projection (s = 1) or shared_projection
            shapes[p + "q_basis"] = (hkv, head_dim, s * r)
            shapes[p + "k_basis"] = (hkv // s, s * head_dim, s * r)
    return shapes


def check_shapes(
    cfg: ThinKVConfig, hf_config: Any, shapes: Mapping[str, tuple[int, ...]], only_thin: bool = False
) -> None:
    """Raise ThinKVError naming the layer and the mismatch if `shapes` (tensor name ->
    shape, as found in the checkpoint) disagree with the thinkv section.

    `only_thin`: check just the tensors compression changes or adds (what
    `compress_model` returns), not the original q/k projections of the
    post_rope_projection form."""
    for name, want in expected_shapes(cfg, hf_config).items():
        if only_thin and cfg.form != "rope_subspace" and "_proj." in name:
            continue
        got = shapes.get(name)
        if got is None:
            raise ThinKVError(f"checkpoint lacks {name} required by its thinkv section ({cfg.method}, {cfg.form})")
        if tuple(got) != want:
            layer = name.split(".")[2]
            raise ThinKVError(
                f"layer {layer}: {name} has shape {tuple(got)} but the thinkv section (rank {cfg.ranks[int(layer)]}, "
                f"form {cfg.form}) implies {want}"
            )
