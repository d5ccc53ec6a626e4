"""KV-cache capacity measured by vLLM itself vs the capacity model: stock attention, thinkv at r = d
and thin-key checkpoints, all given the same KV memory.

    python benchmarks/capacity_engine.py --model DIR --thin-model DIR... --kv-cache-gib 1 --max-model-len 4096

One engine per configuration (fresh process, `vllm_thinkv.bench.engine` mode "trace", a one-token
prompt): vLLM's pool blocks, its KV cache groups and its maximum concurrency at max_model_len
(what it logs as "Maximum concurrency for N tokens per request"; times N, its "KV cache size" in
tokens) are read from the engine, and the capacity model's prediction is written next to them.
Tokens per GiB = vLLM's KV cache size in tokens / the KV memory: for a hybrid model (sliding-window
layers) it depends on max_model_len, as a sliding layer holds its window per request. JSON and
markdown go to `--out` (a path prefix).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from vllm_thinkv import results
from vllm_thinkv.bench import engine
from vllm_thinkv.capacity.model import GiB, kv_cache_groups, load_shape

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the original HF folder (stock and thinkv r = d)")
    p.add_argument("--thin-model", nargs="*", default=[], help="thin-key checkpoints of --model (`thinkv compress`)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV memory of every engine (default 1)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=32, help="default 32 (stock CPU attention needs multiples of 32)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-stock", action="store_true", help="skip the stock-attention engine")
    p.add_argument("--out", required=True, help="path prefix of the .json and .md results")
    return p.parse_args(argv)


def measure(model: str, args: argparse.Namespace, thinkv: bool) -> dict[str, Any]:
    kv_bytes = int(args.kv_cache_gib * GiB)
    eng = {"dtype": args.dtype, "max_model_len": args.max_model_len, "block_size": args.block_size,
           "max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": 8, "enforce_eager": True,
           "seed": 0, "kv_cache_memory_bytes": kv_bytes, **({"attention_backend": "thinkv"} if thinkv else {})}
    trace = engine.run_in_subprocess({"model": model, "engine": eng, "batches": [["Hello"]], "max_tokens": 1,
                                      "mode": "trace", "probes": {}},
                                     env={**os.environ, **engine.OFFLINE_ENV}, cwd=REPO)
    shape = load_shape(model)
    ranks = shape.layer_ranks(None) if shape.ranks is not None else None
    groups = kv_cache_groups(shape, ranks, trace["block_size"])
    blocks = groups.blocks(kv_bytes)
    per_request = groups.request_blocks(trace["max_model_len"], trace["block_size"], trace["max_in_flight_tokens"])
    tokens = trace["kv_cache_max_concurrency"] * trace["max_model_len"]
    return {
        "model": model,
        "attention_backend": trace["attention_backend"],
        "ranks": sorted(set(ranks)) if ranks else [shape.head_dim],
        "kv_cache_groups": [g["type"] for g in trace["kv_cache_specs"]],
        "max_in_flight_tokens": trace["max_in_flight_tokens"],
        "num_gpu_blocks": trace["num_gpu_blocks"],
        "max_concurrency": trace["kv_cache_max_concurrency"],
        "kv_cache_tokens": int(tokens),
        "tokens_per_gib": tokens / args.kv_cache_gib,
        "predicted": {"num_gpu_blocks": blocks, "max_concurrency": blocks / per_request,
                      "blocks_per_request": per_request, "layers_per_group": groups.group_layers,
                      "full_groups": groups.full_groups, "sliding_groups": groups.sliding_groups},
        "init_s": trace["init_s"],
    }


def markdown(data: dict[str, Any]) -> str:
    runs = data["runs"]
    base = next((r for r in runs if r["name"] == "stock"), runs[0])
    backend = {"None": "vLLM's default (CPU attention)", "AttentionBackendEnum.CUSTOM": "thinkv"}
    rows = [[r["name"], backend.get(r["attention_backend"], r["attention_backend"]), "/".join(map(str, r["ranks"])),
             r["num_gpu_blocks"],
             r["predicted"]["num_gpu_blocks"], f"{r['max_concurrency']:.3f}", f"{r['predicted']['max_concurrency']:.3f}",
             r["kv_cache_tokens"], f"{r['tokens_per_gib']:.0f}", f"{r['tokens_per_gib'] / base['tokens_per_gib']:.3f}×"]
            for r in runs]
    s = data["settings"]
    g = runs[0]["predicted"]
    return "\n".join([
        f"# KV capacity measured by vLLM: {data['model']}",
        "",
        f"{data['date']} · {data['device']} · vLLM {data['vllm']} · vllm-thinkv {data['vllm_thinkv']}",
        "",
        f"Command: `{data['command']}`",
        "",
        f"KV memory {s['kv_cache_gib']:g} GiB per engine, max_model_len {s['max_model_len']}, block size "
        f"{s['block_size']}, max_num_batched_tokens {s['max_num_batched_tokens']} (vLLM's max_in_flight_tokens "
        f"{runs[0]['max_in_flight_tokens']}), {s['dtype']}. KV cache groups "
        f"(vLLM): {g['full_groups']} full + {g['sliding_groups']} sliding of {g['layers_per_group']} layers each. "
        "\"max concurrency\" is vLLM's own count of max_model_len-token requests that fit; KV cache tokens = it × "
        "max_model_len (what vLLM logs as its KV cache size); predicted = the capacity model "
        "(`vllm_thinkv.capacity`).",
        "",
        results.markdown_table(["configuration", "backend", "QK rank", "blocks", "predicted", "max concurrency",
                                "predicted", "KV cache tokens", "tokens / GiB", "vs " + base["name"]], rows),
        "",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    configs = ([] if args.no_stock else [("stock", args.model, False)]) + [("thinkv r=d", args.model, True)]
    configs += [(f"thin {Path(m).name}", m, True) for m in args.thin_model]
    runs = []
    for name, model, thinkv in configs:
        print(f"{name}: starting an engine on {model}", flush=True)
        runs.append({"name": name, **measure(model, args, thinkv)})
        r = runs[-1]
        print(f"  blocks {r['num_gpu_blocks']} (predicted {r['predicted']['num_gpu_blocks']}), max concurrency "
              f"{r['max_concurrency']:.3f} (predicted {r['predicted']['max_concurrency']:.3f})", flush=True)
    import vllm

    data = {**results.environment("cpu"), "vllm": vllm.__version__, "model": Path(args.model).name,
            "command": "python " + shlex.join(sys.argv), "settings": {
                "kv_cache_gib": args.kv_cache_gib, "max_model_len": args.max_model_len, "block_size": args.block_size,
                "max_num_batched_tokens": args.max_num_batched_tokens, "dtype": args.dtype}, "runs": runs}
    results.write_json(Path(args.out + ".json"), data)
    Path(args.out + ".md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
