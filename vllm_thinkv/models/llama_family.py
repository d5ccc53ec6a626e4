"""`ThinKVForCausalLM`: the Llama family (Llama/SmolLM, Mistral, Qwen2, Qwen3) with thin keys.

vLLM's Llama model with every attention layer replaced by `ThinKVAttention`;
the family's differences live in the attention layer (Qwen2's q/k/v bias,
Qwen3's per-head q/k norms). One class, registered under each thin name.

Two ways in, one class:
* a thin checkpoint (`thinkv compress`): config.json names this architecture and
  has a versioned `thinkv` section; the q/k tensors are already thin;
* load-time compression of an original checkpoint:
  `--hf-overrides '{"architectures": ["ThinKVLlamaForCausalLM"], "thinkv": {"method": "pca", "rank": 48}}'`
  (the thin name of the original architecture: see `vllm_thinkv.config.ARCHITECTURES`)
  calibrates the original model (loaded with transformers) on the packaged
  public-domain text (or `"calib": [files]`) before the vLLM layers are built,
  then swaps the thin tensors into the weight stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from vllm.logger import init_logger
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from vllm_thinkv.backend.deployment import thin_model_backend
from vllm_thinkv.config import (
    CompressRequest,
    ThinKVConfig,
    check_architecture,
    check_load_time_parallel,
    check_tensor_parallel,
    expected_shapes,
    padded_pages_warning,
    parse_thinkv_section,
    sliding_layers,
)
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.models.attention import ThinKVAttention

logger = init_logger(f"vllm.{__name__}")



def thin_section(vllm_config) -> ThinKVConfig | CompressRequest:
    """The checkpoint's thin section, or the compression request it carries (validated)."""
    hf_config = vllm_config.model_config.hf_config
    section = getattr(hf_config, "thinkv", None)
    check_architecture(list(getattr(hf_config, "architectures", None) or []), section is not None)
    return parse_thinkv_section(section)


def _compress_at_load(vllm_config, request: CompressRequest):
    from vllm_thinkv.compress.pretrained import compress_pretrained

    parallel = vllm_config.parallel_config
    # Under TP every rank calibrates the whole original model on its own device (`check_load_time_parallel`).
    check_load_time_parallel(request, parallel.tensor_parallel_size, parallel.pipeline_parallel_size)
    kv_heads = vllm_config.model_config.hf_config.num_key_value_heads
    check_tensor_parallel(kv_heads, parallel.tensor_parallel_size, request.share_group_for(kv_heads))  # before calibrating
    model_dir = vllm_config.model_config.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logger.info("thinkv: compressing %s at load time (%s) on %s", model_dir, request.to_dict(), device)
    # calibrate at the serving length (vLLM's max_model_len), up to DEFAULT_CALIB_CTX, unless the request names one
    request = request.for_serving(vllm_config.model_config.max_model_len)
    cfg, tensors, original = compress_pretrained(model_dir, request, device=device, progress=False)
    del original
    if device == "cuda":
        torch.cuda.empty_cache()
    logger.info("thinkv: load-time compression done: %s ranks %s", cfg.method, list(cfg.ranks))
    return cfg, {name: t.cpu() for name, t in tensors.items()}


def warn_beyond_fitted_positions(thin: ThinKVConfig, max_model_len: int) -> None:
    """A checkpoint that will serve positions it was not calibrated on: say so at start-up
    (a warning, not a refusal: the default max_model_len is usually far longer than
    any calibration window, and short requests are unaffected)."""
    fitted = thin.fitted_positions
    if fitted is not None and max_model_len > fitted:
        logger.warning(
            "thinkv: this %s checkpoint was calibrated on %d-token windows but max_model_len is %d; its thin "
            "q·k was fitted on positions < %d and measured to lose quality beyond them. Compress with "
            "--calib-ctx %d (load time: \"calib_ctx\": %d; measured to fix pca and joint) or serve with --max-model-len %d.",
            thin.method, fitted, max_model_len, fitted, max_model_len, max_model_len, fitted,
        )


def prepare_thin(vllm_config) -> tuple[ThinKVConfig, type, dict | None]:
    """The thin section (compressing the original checkpoint first for a load-time request),
    the backend class every thin layer uses, and the load-time tensors (None for a thin checkpoint)."""
    section = thin_section(vllm_config)
    # vLLM's selector never sees a layer built with an explicit backend: check the
    # deployment here, once, and before a load-time compression spends minutes.
    if isinstance(section, ThinKVConfig):
        ranks, share = section.ranks, section.share_group
    else:
        hf_config = vllm_config.model_config.hf_config
        ranks = [section.rank or section.rank_budget]
        share = section.share_group_for(hf_config.num_key_value_heads)
    backend = thin_model_backend(vllm_config, ranks, share)
    thin, thin_tensors = ((section, None) if isinstance(section, ThinKVConfig)
                          else _compress_at_load(vllm_config, section))
    warn_beyond_fitted_positions(thin, vllm_config.model_config.max_model_len)
    padded = padded_pages_warning(thin.ranks, sliding_layers(vllm_config.model_config.hf_config))
    if padded:
        logger.warning(padded)
    return thin, backend, thin_tensors


class ThinWeights:
    """Mixin for a thin model class (before the vLLM model class it extends): its weights are checked
    against the thin section (or replaced by the load-time compression's tensors) before the base
    class loads them. The constructor sets `thin` and `_load_time_tensors` (`prepare_thin`)."""

    thin: ThinKVConfig
    _load_time_tensors: dict[str, torch.Tensor] | None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights = checked_weights(self.thin, self.config, weights, self._load_time_tensors)
        self._load_time_tensors = None
        return super().load_weights(weights)


class ThinKVForCausalLM(ThinWeights, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        thin, backend, thin_tensors = prepare_thin(vllm_config)
        layer_type = partial(LlamaDecoderLayer, attn_layer_type=partial(ThinKVAttention, thin=thin, backend=backend))
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.thin = thin
        self._load_time_tensors = thin_tensors


def checked_weights(thin: ThinKVConfig, hf_config, weights, replacements):
    """The weight stream with load-time replacements applied and every q/k-side
    tensor's shape checked against the thin section as it arrives, so a malformed
    checkpoint is rejected naming the tensor (not deep inside a weight loader)."""
    expected = expected_shapes(thin, hf_config)
    pending = dict(replacements or {})
    missing = set(expected)

    def check(name: str, tensor: torch.Tensor) -> None:
        want = expected.get(name)
        if want is not None and tuple(tensor.shape) != want:
            layer = int(name.split(".")[2])
            raise ThinKVError(f"layer {layer}: {name} has shape {tuple(tensor.shape)} but the thinkv section "
                              f"(rank {thin.ranks[layer]}, form {thin.form}) implies {want}")
        missing.discard(name)

    for name, tensor in weights:
        tensor = pending.pop(name, tensor)
        check(name, tensor)
        yield name, tensor
    for name, tensor in pending.items():  # tensors load-time compression adds (bases, inverse frequencies)
        check(name, tensor)
        yield name, tensor
    if missing:
        raise ThinKVError(f"the checkpoint lacks {sorted(missing)[0]} (and {len(missing) - 1} more) required by "
                          f"its thinkv section ({thin.method}, {thin.form})")
