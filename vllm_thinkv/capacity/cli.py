"""`thinkv capacity MODEL_OR_CONFIG... [--rank R] [--snapkv-budget B] [--snapkv-policy P] [--context N...] [--gpu-mem GiB]`

How many tokens and concurrent long-context requests fit in the KV cache, stock
vs thin keys (r < d) vs SnapKV vs both, computed from the HF config alone (no
weights, no vLLM): the model in `vllm_thinkv.capacity.model`. MODEL is a
shipped config name (`llama-3.1-8b`, `mistral-7b`, ...), an HF folder or a
config.json path; a thin-key checkpoint's per-layer ranks are used as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

from vllm_thinkv.capacity.model import (
    DEFAULT_IN_FLIGHT_TOKENS,
    DTYPE_BYTES,
    GiB,
    ModelShape,
    check_block_size,
    kv_cache_groups,
    load_shape,
    max_sequences,
    memory_budget,
    num_blocks,
    shipped_models,
)
from vllm_thinkv.config import allocated_ranks
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.results import markdown_table, today, write_json
from vllm_thinkv.snapkv.config import POLICIES, SnapKVConfig
from vllm_thinkv.snapkv.policies import row_extra_bytes

CONFIGS = ("stock", "thin", "snapkv", "thin_snapkv")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL_OR_CONFIG",
                   help=f"shipped config ({', '.join(sorted(shipped_models()))}), HF folder or config.json")
    p.add_argument("--rank", type=int, help="QK rank r of every layer (default: the checkpoint's ranks, else head_dim/4)")
    p.add_argument("--snapkv-budget", type=int, default=1024, help="SnapKV tokens kept per prompt besides the window (default 1024)")
    p.add_argument("--snapkv-window", type=int, default=32, help="SnapKV observation window, also kept (default 32)")
    p.add_argument("--snapkv-policy", choices=POLICIES, default="snapkv",
                   help="SnapKV compaction policy (default snapkv): `merge` caches a count per token and KV head "
                   "(+16 bytes), which the SnapKV columns then count")
    p.add_argument("--context", type=int, nargs="+", default=[8192, 32768, 131072], metavar="N",
                   help="sequence lengths, prompt + output tokens (default 8192 32768 131072)")
    p.add_argument("--output-tokens", type=int, default=512, help="generated tokens per request, part of the context (default 512)")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GiB", help="memory per GPU (default 80)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1], metavar="N",
                   help="GPUs the model is sharded over (tensor parallel; default 1): one value for every model, "
                   "or one per model in order (e.g. `llama-3.1-8b llama-3.1-70b --gpus 1 4`)")
    p.add_argument("--gpu-util", type=float, default=0.9, help="vLLM --gpu-memory-utilization (default 0.9)")
    p.add_argument("--kv-mem", type=float, metavar="GiB", help="KV-cache memory in total; replaces the GPU-memory-minus-weights estimate")
    p.add_argument("--dtype", choices=["auto", *DTYPE_BYTES], default="auto", help="weights and KV dtype (default: the config's)")
    p.add_argument("--block-size", type=int, default=16, help="vLLM KV block size in tokens (default 16)")
    p.add_argument("--in-flight-tokens", type=int, default=DEFAULT_IN_FLIGHT_TOKENS, metavar="N",
                   help="vLLM's max_in_flight_tokens: a sliding-window layer also holds the tokens scheduled but not "
                   "settled, concurrent batches (2 with async scheduling) × --max-num-batched-tokens (default "
                   f"{DEFAULT_IN_FLIGHT_TOKENS} = 2 × 8192; only for models with sliding-window layers)")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.add_argument("--out", type=Path, metavar="PREFIX", help="also write PREFIX.json and PREFIX.md")


def snapkv_config(budget: int, window: int, policy: str = "snapkv") -> SnapKVConfig:
    if isinstance(budget, bool) or budget <= 0:
        raise ThinKVError(f"--snapkv-budget must be a positive number of tokens, got {budget}")
    if window <= 0 or window >= budget:
        raise ThinKVError(f"--snapkv-window must be in [1, budget) = [1, {budget}), got {window}")
    return SnapKVConfig(budget=budget, window=window, policy=policy)


def gpus_per_model(gpus: list[int], models: list[str]) -> list[int]:
    if len(gpus) not in (1, len(models)):
        raise ThinKVError(f"--gpus takes one value or one per model ({len(models)}), got {len(gpus)}")
    return gpus * len(models) if len(gpus) == 1 else list(gpus)


def analyse(shape: ModelShape, args: argparse.Namespace, gpus: int = 1) -> dict[str, Any]:
    """Everything the report shows for one model on `gpus` GPUs, as plain data."""
    if args.dtype != "auto":
        shape = dataclasses.replace(shape, dtype=args.dtype)
    snap = snapkv_config(args.snapkv_budget, args.snapkv_window, args.snapkv_policy)
    check_block_size(args.block_size)
    own_ranks = shape.layer_ranks(args.rank)
    ranks = allocated_ranks(own_ranks, shape.sliding)  # what vLLM allocates (a hybrid model pads to the widest)
    budget = memory_budget(shape, args.gpu_mem, gpus, args.gpu_util, args.kv_mem)
    if args.in_flight_tokens <= 0:
        raise ThinKVError(f"--in-flight-tokens must be positive, got {args.in_flight_tokens}")
    # Hybrid models: only the full-attention layers grow with the context (bytes per token: theirs); a
    # sliding layer holds its window per request, counted in the per-user bytes and vLLM's per-request blocks.
    growing = False if shape.hybrid else None
    per_token = {"stock": shape.kv_bytes_per_token(sliding=growing), "thin": shape.kv_bytes_per_token(ranks, sliding=growing)}
    groups = {"stock": kv_cache_groups(shape, None, args.block_size), "thin": kv_cache_groups(shape, ranks, args.block_size)}
    blocks = {k: g.blocks(budget.kv_bytes) for k, g in groups.items()}
    # SnapKV's cache: the same pages, plus the policy's per-row bytes (a merge count)
    snap_blocks = {k: kv_cache_groups(shape, r, args.block_size, row_extra_bytes=row_extra_bytes(snap))
                   .blocks(budget.kv_bytes) if not shape.hybrid else None for k, r in (("stock", None), ("thin", ranks))}
    rows = []
    for n in args.context:
        g = args.output_tokens
        if n <= g or g < 0:
            raise ThinKVError(f"--context {n} must exceed --output-tokens {g} (context = prompt + output tokens)")
        prompt = n - g
        seqs = {k: max_sequences(blocks[k], prompt, g, args.block_size, groups=groups[k],
                                 in_flight_tokens=args.in_flight_tokens) for k in ("stock", "thin")}
        if not shape.hybrid:  # thinkv serves no SnapKV on sliding-window models
            seqs.update(snapkv=max_sequences(snap_blocks["stock"], prompt, g, args.block_size, snap),
                        thin_snapkv=max_sequences(snap_blocks["thin"], prompt, g, args.block_size, snap))
        user = {"stock": shape.request_bytes(n), "thin": shape.request_bytes(n, ranks)}
        rows.append({
            "context": n,
            "prompt": prompt,
            "beyond_native_context": bool(shape.max_position_embeddings and n > shape.max_position_embeddings),
            "max_sequences": seqs,
            # vLLM's "KV cache size" in tokens: its maximum concurrency at max_model_len = n, times n
            "vllm_cache_tokens": {k: blocks[k] * n // groups[k].request_blocks(n, args.block_size, args.in_flight_tokens)
                                  for k in ("stock", "thin")},
            "per_user_gib": {
                "kv_stock": user["stock"] / GiB,
                "keys_stock": shape.request_bytes(n, keys_only=True) / GiB,
                "kv_thin": user["thin"] / GiB,
                "saved_by_thin_keys": (user["stock"] - user["thin"]) / GiB,
            },
        })
    return {
        "model": shape.name,
        "attention": shape.attention,
        "sliding": None if not shape.hybrid else {
            "window": shape.sliding_window, "sliding_layers": sum(shape.sliding),
            "full_layers": shape.num_layers - sum(shape.sliding), "in_flight_tokens": args.in_flight_tokens,
            "kv_cache_groups": {k: {"layers_per_group": v.group_layers, "full": v.full_groups, "sliding": v.sliding_groups,
                                    "block_bytes": v.block_bytes} for k, v in groups.items()},
        },
        "layers": shape.num_layers,
        "heads": shape.num_heads,
        "kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "dtype": shape.dtype,
        "max_position_embeddings": shape.max_position_embeddings,
        "ranks": list(ranks),
        "rank_label": rank_label(ranks, shape.head_dim) + (
            f" (checkpoint: {rank_label(own_ranks, shape.head_dim)}, pages padded to the widest by vLLM's hybrid "
            "allocator)" if ranks != own_ranks else ""),
        "gpus": None if args.kv_mem is not None else gpus,
        "params": shape.param_count(),
        "weights_gib": None if budget.weights_bytes is None else budget.weights_bytes / GiB,
        "kv_budget_gib": budget.kv_bytes / GiB,
        "kv_budget_assumption": budget.assumption,
        "kv_bytes_per_token": per_token,
        "tokens_per_gib": {k: GiB // v for k, v in per_token.items()},
        "cache_blocks": blocks,
        "snapkv_cache_blocks": snap_blocks,
        "cache_tokens": {k: v * args.block_size for k, v in blocks.items()},
        "contexts": rows,
    }


def rank_label(ranks: list[int] | tuple[int, ...], head_dim: int) -> str:
    if len(set(ranks)) == 1:
        return f"r={ranks[0]} (d={head_dim})"
    return f"r=mean {sum(ranks) / len(ranks):.1f} per layer (d={head_dim})"


def _ratio(x: int | None, base: int) -> str:
    if x is None:
        return "–"
    return f"{x}" if not base else f"{x} ({x / base:.2f}×)"


def _layers(m: dict[str, Any]) -> str:
    sw = m.get("sliding")
    layers = m["layers"] if sw is None else f"{m['layers']} ({sw['sliding_layers']} sliding W={sw['window']}, {sw['full_layers']} full)"
    return f"{layers} × {m['kv_heads']} × {m['head_dim']}"


def _per_user_summary(models: list[dict[str, Any]]) -> list[str]:
    """One line per model at its longest context: what thin keys save per user, in GB."""
    lines = []
    for m in models:
        c = max(m["contexts"], key=lambda c: c["context"])
        u = c["per_user_gib"]
        lines.append(f"- {m['model']} ({m['attention']}), {c['context']} tokens: stock {u['kv_stock']:.1f} GiB per user, "
                     f"thin keys {u['kv_thin']:.1f} GiB, saved {u['saved_by_thin_keys'] * GiB / 1e9:.1f} GB")
    return [*lines, ""] if lines else []


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    models = result["models"]
    out = [
        "# KV-cache capacity model (thinkv)",
        "",
        f"Analytic: HF config values only, no weights, no device. {result['date']} · vllm-thinkv {result['vllm_thinkv']}",
        "",
        f"Command: `{result['command']}`",
        "",
        "Assumptions:",
        "- KV bytes per token per layer: stock 2·d·H_kv·dtype, thin keys (r + d)·H_kv·dtype (vLLM's DiffKV page).",
        f"- {s['budget_rule']}. Activations, CUDA graphs and non-torch memory are not subtracted "
        "(vLLM profiles them; its real budget is a few GiB lower).",
        f"- Block size {s['block_size']}; blocks = KV bytes // (block_size × bytes per token); one block is vLLM's null block.",
        f"- Context = prompt + {s['output_tokens']} output tokens; a request holds all of them at its end.",
        f"- SnapKV (policy `{s.get('snapkv_policy', 'snapkv')}`): a compacted prompt keeps budget {s['snapkv_budget']} + "
        f"window {s['snapkv_window']} tokens. Prefill peak is unchanged: one request at a time holds its whole prompt "
        "while it is prefilled."
        + (" `merge` caches one float32 count per token and KV head, padded to 16 bytes, so its cache holds fewer "
           "blocks for the same bytes." if s.get("snapkv_policy") == "merge" else ""),
        "- † context beyond the model's max_position_embeddings (needs RoPE scaling such as YaRN).",
        *(["- ‡ Sliding-window models (vLLM's hybrid allocator): bytes and tokens per GiB count the full-attention "
           "layers only, the ones that grow with the context; a sliding layer holds at most its window per request. "
           "Layers are split into KV cache groups of equal size, a block is one page of each layer of a group, and a "
           "request of n tokens takes ceil(n / block_size) blocks per full group and ceil(min(W − 1 + "
           f"{models_sliding[0]['sliding']['in_flight_tokens']} in-flight tokens, n) / block_size) + 1 per sliding group "
           "(vLLM's admission reservation). SnapKV is not served on these models (–). \"vLLM cache tokens\" is what "
           "vLLM logs as its KV cache size: its maximum concurrency at max_model_len = context, times the context."]
          if (models_sliding := [m for m in models if m.get("sliding")]) else []),
        "",
        "## Models",
        "",
        markdown_table(
            ["model", "attention", "layers × KV heads × d", "thin r", "params", "GPUs", "weights GiB", "KV budget GiB",
             "KV KiB/token stock", "thin", "tokens/GiB stock", "thin", "cache tokens stock", "thin"],
            [[m["model"] + (" ‡" if m.get("sliding") else ""), m["attention"], _layers(m), m["rank_label"],
              f"{m['params'] / 1e9:.2f} B", "–" if m["gpus"] is None else f"{m['gpus']} × {s['gpu_mem']:g} GiB",
              "given" if m["weights_gib"] is None else f"{m['weights_gib']:.1f}",
              f"{m['kv_budget_gib']:.1f}", m["kv_bytes_per_token"]["stock"] / 1024, m["kv_bytes_per_token"]["thin"] / 1024,
              m["tokens_per_gib"]["stock"], m["tokens_per_gib"]["thin"], m["cache_tokens"]["stock"], m["cache_tokens"]["thin"]]
             for m in models],
        ),
        "",
        "## Maximum concurrent sequences (ratio to stock)",
        "",
        markdown_table(
            ["model", "context", "stock", "thin keys", f"SnapKV {s['snapkv_budget']}", "thin + SnapKV",
             "vLLM cache tokens stock", "thin"],
            [[m["model"], f"{c['context']}{' †' if c['beyond_native_context'] else ''}", c["max_sequences"]["stock"],
              *(_ratio(c["max_sequences"].get(k), c["max_sequences"]["stock"]) for k in CONFIGS[1:]),
              c["vllm_cache_tokens"]["stock"], c["vllm_cache_tokens"]["thin"]]
             for m in models for c in m["contexts"]],
        ),
        "",
        "## KV cache per user (GiB)",
        "",
        "One user's KV cache = context × layers × H_kv × (key dims + value dims) × dtype bytes; thin keys "
        "shrink only the key dims, d → r, so at r = d/4 they save 3/8 of it. The Thin Keys paper's \"25 GB saved "
        "per user at 128K\" (a 7B model, r = d/4) is the MHA case, every query head with its own KV head: "
        "Llama-2-7B at 131072 tokens holds 131072 × 32 layers × 32 heads × 128 × 2 (K, V) × 2 B = 64 GiB, "
        "of which keys 32 GiB; r = 32 keeps 8 GiB of keys and saves 24 GiB = 25.8 GB. It does not hold for "
        "GQA models, where a group of query heads already shares one KV head: the cache and the saving are "
        "the group size times smaller (Llama-3.1-8B, Mistral-7B: 8 KV heads for 32 query heads, 16 GiB per "
        "128k user, 6 GiB = 6.4 GB saved; Llama-3.1-70B, 80 layers: 40 GiB, 15 GiB = 16.1 GB saved). The "
        "relative gain, 1.6× tokens per GiB, is the same for both.",
        "",
        *_per_user_summary(models),
        markdown_table(
            ["model", "attention", "context", "stock KV", "of which keys", "thin-key KV", "saved by thin keys",
             "saved (GB = 1e9 B)"],
            [[m["model"], m["attention"], f"{c['context']}{' †' if c['beyond_native_context'] else ''}",
              *(f"{c['per_user_gib'][k]:.2f}" for k in ("kv_stock", "keys_stock", "kv_thin", "saved_by_thin_keys")),
              f"{c['per_user_gib']['saved_by_thin_keys'] * GiB / 1e9:.1f}"]
             for m in models for c in m["contexts"]],
        ),
        "",
    ]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    import vllm_thinkv

    gpus = gpus_per_model(args.gpus, args.models)
    models = [analyse(load_shape(m), args, g) for m, g in zip(args.models, gpus)]
    result = {
        "date": today(),
        "vllm_thinkv": vllm_thinkv.__version__,
        "device": "analytic (no device)",
        "command": "thinkv " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["capacity"] else "thinkv capacity " + shlex.join(args.models),
        "settings": {
            "block_size": args.block_size,
            "in_flight_tokens": args.in_flight_tokens,
            "output_tokens": args.output_tokens,
            "snapkv_budget": args.snapkv_budget,
            "snapkv_window": args.snapkv_window,
            "snapkv_policy": args.snapkv_policy,
            "gpu_mem": args.gpu_mem,
            "budget_rule": models[0]["kv_budget_assumption"] if args.kv_mem is not None else
            f"KV budget = GPUs ({'column GPUs' if len(set(gpus)) > 1 else gpus[0]}) × GPU memory ({args.gpu_mem:g} GiB) "
            f"× utilization ({args.gpu_util:g}) − weights (parameter count × dtype bytes); with N > 1 GPUs (tensor "
            "parallel) each GPU holds 1/N of the weights and of the KV heads, so the total is what counts",
        },
        "models": models,
    }
    text = markdown(result)
    if args.out is not None:
        write_json(args.out.with_name(args.out.name + ".json"), result)
        args.out.with_name(args.out.name + ".md").write_text(text)
    if args.json:
        import json

        print(json.dumps(result, indent=2))
    else:
        print(text)
    return 0
