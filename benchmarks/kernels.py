"""Benchmark the thin-key paged-attention kernels; writes JSON + markdown + PNG.

On a CUDA device it (a) checks correctness in bf16 against the float64 reference (and that a
CUDA graph captured on one batch and replayed on another equals the eager call, padding untouched),
(b) measures device-to-device copy bandwidth as the roof, (c) times decode (batch 1..256,
context 1k..32k, 32 query / 8 KV heads, d = 128, r in {16, 32, 64, 128}) and prefill,
reporting microseconds, GB/s of KV actually read, fraction of the roof, the speedup of
r < d over r = d with the same kernel, and the speedup over
`torch.nn.functional.scaled_dot_product_attention` (flash backend) on equivalent dense
KV at r = d (flash needs equal q/k and v dims; it is the practical baseline).
Shared-key decode (key_share = S: one key latent per token shared by S KV heads, r dims
per slot, so each query head dots an S·r-dim key over the cache bytes of r-dim keys)
is timed at a few batch × context points next to per-head r and r = d, to measure
the extra QK cost of sharing.
On a CPU it times the torch path (`paged_attention_torch`, the CPU serving path) per
layer call at SmolLM2-135M shapes (9 query / 3 KV heads, d = 64, block size 16).

    python benchmarks/kernels.py                          # full run, results in benchmarks/results/
    python benchmarks/kernels.py --dry-run --out /tmp/x   # tiny end-to-end run of every section

GPU times are CUDA-graph replays (`triton.testing.do_bench_cudagraph`: kernel time
without Python launch overhead, median). KV that fits in L2 (50 MB on H100) can exceed
the HBM roof at the smallest sizes; the targets are evaluated at batch 64 x 4k (>= 600 MB
of KV). In a CPU dry run the Triton kernels run in the interpreter: those times mean
nothing. Does not import vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from vllm_thinkv.kernels import paged_attention, paged_attention_torch, reference  # noqa: E402
from vllm_thinkv.kernels.testing import PagedBatch, StepBuffers, packed_kv_cache, random_paged_batch  # noqa: E402
from vllm_thinkv.results import markdown_table, write_json  # noqa: E402
from vllm_thinkv.results import environment as stamp  # noqa: E402

TARGETS = {
    "decode_roof_fraction_b64_4k": 0.80,
    "decode_speedup_r32_over_r128_b64_4k": 1.45,
    "decode_r128_vs_sdpa_b64_4k": 1.0,
}
BF16_TOLERANCE = 1e-2  # as tests/kernels/helpers.py


@dataclass(frozen=True)
class Sizes:
    num_heads: int
    num_kv_heads: int
    d: int
    ranks: tuple[int, ...]
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    max_tokens: int  # cap on batch x context (memory: KV plus SDPA's dense copy)
    prefill: tuple[tuple[int, int, int], ...]  # (sequences, new tokens, cached tokens)
    block_size: int
    copy_bytes: int
    dtype: torch.dtype
    shared: tuple[tuple[int, int], ...] = ()  # shared-key decode cases: (r per slot, key_share)
    shared_points: tuple[tuple[int, int], ...] = ()  # (batch, context) where they are timed


@dataclass(frozen=True)
class CpuSizes:
    """The torch path at SmolLM2-135M attention shapes."""

    num_heads: int = 9
    num_kv_heads: int = 3
    d: int = 64
    ranks: tuple[int, ...] = (64, 32)
    cases: tuple[tuple[str, int, int, int], ...] = (("prefill", 1, 4096, 4096), ("decode", 32, 1, 2048))
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    block_size: int = 16


GPU_FULL = Sizes(32, 8, 128, (16, 32, 64, 128), (1, 4, 16, 64, 256), (1024, 4096, 16384, 32768), 1 << 21,
                 ((1, 4096, 0), (1, 16384, 0), (4, 2048, 2048)), 16, 1 << 30, torch.bfloat16,
                 shared=((32, 8), (32, 4), (32, 2)), shared_points=((64, 4096), (256, 4096), (4, 32768)))
GPU_DRY = Sizes(4, 2, 64, (16, 64), (1, 2), (32, 80), 1 << 10, ((1, 40, 0), (2, 16, 24)), 16, 1 << 16, torch.bfloat16,
                shared=((16, 2),), shared_points=((2, 80),))
CPU_FULL = CpuSizes()
CPU_DRY = CpuSizes(ranks=(64,), cases=(("prefill", 1, 64, 64), ("decode", 4, 1, 100)), dtypes=(torch.bfloat16,))


def environment(device: torch.device) -> dict:
    """The shared stamp, plus what bounds a kernel's speed: the GPU's SMs and memory, or the CPU's load."""
    info = stamp(device.type, packages=("torch", "triton"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(load_average=round(os.getloadavg()[0], 2))
    return info


def time_us(fn, device: torch.device, repeats: int) -> float:
    """Median microseconds per call: CUDA-graph replay on a GPU, wall clock otherwise."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e6


def uniform_batch(num_seqs: int, new: int, total: int, r: int, d: int, num_heads: int, num_kv_heads: int,
                  block_size: int, dtype: torch.dtype, device: torch.device, key_share: int = 1) -> PagedBatch:
    """num_seqs sequences of `total` positions whose last `new` are queried, over shuffled physical
    blocks; drawn on the device (the tests' random_paged_batch draws on the CPU: too slow at this size).
    key_share: shared keys, q gets key_share * r dims per head (pass batch.key_share to the op)."""
    blocks_per_seq = -(-total // block_size)
    num_blocks = num_seqs * blocks_per_seq + 1
    packed, key_cache, value_cache = packed_kv_cache(num_blocks, block_size, num_kv_heads, r, d, dtype, device,
                                                     "NHD", fill=0.0)
    packed.normal_()
    table = torch.randperm(num_blocks - 1, device=device)[: num_seqs * blocks_per_seq] + 1
    return PagedBatch(
        q=torch.randn(num_seqs * new, num_heads, key_share * r, device=device, dtype=dtype),
        key_cache=key_cache, value_cache=value_cache, block_table=table.view(num_seqs, -1).to(torch.int32),
        cu_seqlens_q=torch.arange(0, num_seqs * new + 1, new, dtype=torch.int32, device=device),
        seq_lens=torch.full((num_seqs,), total, dtype=torch.int32, device=device),
        scale=d**-0.5, gaps=None, key_share=key_share, packed=packed,
    )


def copy_roof(sizes: Sizes, device: torch.device, repeats: int) -> dict:
    """Device-to-device copy bandwidth, counting bytes read + written (what a copy moves)."""
    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device, repeats)
    return {"bytes": sizes.copy_bytes, "us": us, "gb_per_s": 2 * sizes.copy_bytes / us / 1e3}


def correctness(device: torch.device) -> list[dict]:
    """Cases from the test suite (mixed batch, split decode, gaps, r > d, shared keys) in bf16 against the
    float64 reference."""
    cases = [  # name, q_lens, seq_lens, r, d, group, gaps, num_splits, key_share (2 KV heads)
        ("mixed r32 d128 g4", [1, 7, 1, 19], [37, 50, 90, 19], 32, 128, 4, None, None, 1),
        ("decode split r16 d128 g4", [1, 1, 1], [300, 45, 1], 16, 128, 4, None, 4, 1),
        ("gaps r24 d64 g3", [1, 3, 12], [100, 90, 80], 24, 64, 3, [(16, 64), (5, 41), (0, 40)], None, 1),
        ("r>d r256 d128 g8", [1, 20], [70, 20], 256, 128, 8, None, None, 1),
        ("shared S2 r32 d128 g4 split", [1, 7, 1, 19], [37, 50, 300, 19], 32, 128, 4, None, 2, 2),
    ]
    rows = []
    for name, q_lens, seq_lens, r, d, group, gaps, splits, share in cases:
        batch = random_paged_batch(q_lens, seq_lens, num_heads=2 * group, num_kv_heads=2, r=r, d=d, block_size=16,
                                   dtype=torch.bfloat16, device=device, layout="HND", gaps=gaps, key_share=share)
        ref = reference.paged_attention(*batch.args(), gaps=batch.gaps, key_share=share)
        out = paged_attention(*batch.args(), gaps=batch.gaps, key_share=share, num_splits=splits)
        err = float((out.double().cpu() - ref).norm() / ref.norm())
        rows.append({"case": name, "dtype": "bf16", "rel_error": err, "tolerance": BF16_TOLERANCE,
                     "ok": bool(err <= BF16_TOLERANCE and not out.isnan().any())})
    return rows


def graph_replay(device: torch.device) -> list[dict]:
    """Full CUDA graphs (the backend's UNIFORM_BATCH support): paged_attention captured over fixed
    buffers holding batch A (5 requests, one of them padding; split-KV planned at a 2048-token
    "max_model_len") and replayed after the buffers are refilled with A, then with batch B (2 real
    requests, other lengths and tables), in bf16: each replay must equal the eager call on that
    batch and the float64 reference, and leave the padding rows of out untouched. On CPU (dry run)
    the call runs again in the interpreter instead of a replay."""
    rows = []
    for q_len in (1, 3):  # decode, 2 speculative tokens
        num_seqs, num_rows, block_size = 5, 5 * q_len + 3, 16
        batches = [
            random_paged_batch([q_len] * 4 + [0], [150, 45, q_len, 260, 0], num_heads=8, num_kv_heads=2, r=32,
                               d=128, block_size=block_size, dtype=torch.bfloat16, device=device, seed=1),
            random_paged_batch([q_len] * 2 + [0] * 3, [300, 17, 0, 0, 0], num_heads=8, num_kv_heads=2, r=32,
                               d=128, block_size=block_size, dtype=torch.bfloat16, device=device, seed=2),
        ]
        buffers = StepBuffers(num_seqs, num_rows, num_blocks=64, width=2048 // block_size, num_heads=8,
                              num_kv_heads=2, r=32, d=128, block_size=block_size, dtype=torch.bfloat16,
                              device=device)
        out = torch.empty(num_rows, 8, 128, dtype=torch.bfloat16, device=device)
        call = buffers.load(batches[0])

        def launch() -> None:
            paged_attention(*call.args(), out=out, max_seqlen_q=q_len, max_seqlen_k=2048)

        replay = launch
        if device.type == "cuda":
            launch()  # compiles outside the capture, as vLLM's warm-up runs do
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                launch()
            replay = graph.replay
        for name, batch in zip("AB", batches):
            buffers.load(batch)
            num_real = batch.q.shape[0]
            out.fill_(float("nan"))
            out[num_real:] = 7.0
            replay()
            eager = paged_attention(*batch.args(), max_seqlen_q=q_len, max_seqlen_k=batch.max_seqlen_k)
            ref = reference.paged_attention(*batch.args())
            got = out[:num_real].double().cpu()
            vs_eager = float((got - eager.double().cpu()).norm() / ref.norm())
            err = float((got - ref).norm() / ref.norm())
            untouched = bool((out[num_real:] == 7.0).all())
            rows.append({"case": f"graph replay q_len {q_len} batch {name}", "dtype": "bf16", "rel_error": err,
                         "vs_eager": vs_eager, "padding_untouched": untouched, "tolerance": BF16_TOLERANCE,
                         "ok": bool(err <= BF16_TOLERANCE and vs_eager <= BF16_TOLERANCE and untouched
                                    and not got.isnan().any())})
    return rows


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

    return run


def decode_sweep(sizes: Sizes, roof_gbs: float, device: torch.device, repeats: int, log) -> list[dict]:
    g = sizes.num_heads // sizes.num_kv_heads
    elem = torch.finfo(sizes.dtype).bits // 8
    rows = []
    for batch in sizes.batches:
        for context in sizes.contexts:
            if batch * context > sizes.max_tokens:
                continue
            # SDPA on dense contiguous KV at r = d; the group's query heads folded into the query
            # length, so each KV head is read once, as in the paged kernel.
            k = torch.randn(batch, sizes.num_kv_heads, context, sizes.d, device=device, dtype=sizes.dtype)
            q = torch.randn(batch, sizes.num_kv_heads, g, sizes.d, device=device, dtype=sizes.dtype)
            try:
                sdpa_us = time_us(sdpa_flash(q, k, torch.randn_like(k), causal=False), device, repeats)
            except RuntimeError as exc:  # recorded, not hidden
                sdpa_us = None
                log(f"  SDPA flash failed at batch {batch} x {context}: {exc}")
            del q, k
            for r in sizes.ranks:
                pb = uniform_batch(batch, 1, context, r, sizes.d, sizes.num_heads, sizes.num_kv_heads,
                                   sizes.block_size, sizes.dtype, device)
                out = torch.empty(batch, sizes.num_heads, sizes.d, device=device, dtype=sizes.dtype)
                us = time_us(lambda: paged_attention(*pb.args(), out=out, max_seqlen_q=1, max_seqlen_k=context),
                             device, repeats)
                kv_bytes = batch * context * sizes.num_kv_heads * (r + sizes.d) * elem
                row = {"batch": batch, "context": context, "r": r, "d": sizes.d, "us": us, "kv_bytes": kv_bytes,
                       "gb_per_s": kv_bytes / us / 1e3, "roof_fraction": kv_bytes / us / 1e3 / roof_gbs,
                       "sdpa_flash_r_eq_d_us": sdpa_us, "speedup_vs_sdpa": sdpa_us / us if sdpa_us else None}
                rows.append(row)
                log(f"  decode b{batch:<4} ctx{context:<6} r{r:<4} {us:10.1f} us {row['gb_per_s']:8.1f} GB/s "
                    f"{row['roof_fraction']:6.1%} of roof" + (f"  SDPA(r=d) {sdpa_us:10.1f} us" if sdpa_us else ""))
                del pb, out
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    full = {(row["batch"], row["context"]): row for row in rows if row["r"] == sizes.d}
    for row in rows:
        base = full.get((row["batch"], row["context"]))
        row["speedup_vs_r_eq_d"] = base["us"] / row["us"] if base else None
        row["ideal_speedup_vs_r_eq_d"] = 2 * sizes.d / (row["r"] + sizes.d)
    return rows


def split_sweep(sizes: Sizes, device: torch.device, repeats: int, log) -> list[dict]:
    """Decode time against forced split counts at the target size, to check the split heuristic."""
    batch, context = (64, 4096) if 64 in sizes.batches else (sizes.batches[-1], sizes.contexts[-1])
    r = 32 if 32 in sizes.ranks else sizes.ranks[0]
    pb = uniform_batch(batch, 1, context, r, sizes.d, sizes.num_heads, sizes.num_kv_heads, sizes.block_size,
                       sizes.dtype, device)
    rows = []
    for splits in (None, 1, 2, 4, 8, 16):
        us = time_us(lambda: paged_attention(*pb.args(), max_seqlen_q=1, max_seqlen_k=context, num_splits=splits),
                     device, repeats)
        rows.append({"batch": batch, "context": context, "r": r, "num_splits": splits or "heuristic", "us": us})
        log(f"  splits {str(splits or 'heuristic'):>9}: {us:10.1f} us")
    return rows


def shared_key_sweep(sizes: Sizes, roof_gbs: float, device: torch.device, repeats: int, log) -> list[dict]:
    """Decode with shared keys (key_share S: S KV heads share one key latent, r dims per slot) next to
    per-head keys of the same r and r = d at the same batch and context. A shared case reads the cache
    bytes of the per-head r case but dots S·r-dim keys (S times the QK FLOPs and q bytes per query head)."""
    elem = torch.finfo(sizes.dtype).bits // 8
    rows = []
    for batch, context in sizes.shared_points:
        if batch * context > sizes.max_tokens:
            continue
        cases = sorted({(r, 1) for r, _ in sizes.shared} | {(sizes.d, 1)}) + list(sizes.shared)
        at: dict[tuple[int, int], dict] = {}
        for r, share in cases:
            pb = uniform_batch(batch, 1, context, r, sizes.d, sizes.num_heads, sizes.num_kv_heads, sizes.block_size,
                               sizes.dtype, device, key_share=share)
            out = torch.empty(batch, sizes.num_heads, sizes.d, device=device, dtype=sizes.dtype)
            us = time_us(lambda: paged_attention(*pb.args(), out=out, key_share=share, max_seqlen_q=1,
                                                 max_seqlen_k=context), device, repeats)
            kv_bytes = batch * context * sizes.num_kv_heads * (r + sizes.d) * elem
            row = at[(r, share)] = {
                "batch": batch, "context": context, "r": r, "key_share": share, "qk": share * r, "d": sizes.d,
                "us": us, "kv_bytes": kv_bytes, "gb_per_s": kv_bytes / us / 1e3,
                "roof_fraction": kv_bytes / us / 1e3 / roof_gbs,
                "qk_tflop_per_s": 2 * batch * sizes.num_heads * context * share * r / us / 1e6,
            }
            rows.append(row)
            log(f"  shared-key decode b{batch:<4} ctx{context:<6} r{r:<4} S{share:<2} (qk {share * r:<4}) "
                f"{us:10.1f} us {row['gb_per_s']:8.1f} GB/s {row['roof_fraction']:6.1%} of roof")
            del pb, out
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for (r, share), row in at.items():
            row["time_vs_per_head_r"] = row["us"] / at[(r, 1)]["us"]  # the cost of sharing: 1.0 = free
            row["speedup_vs_r_eq_d"] = at[(sizes.d, 1)]["us"] / row["us"]
    return rows


def prefill_sweep(sizes: Sizes, device: torch.device, repeats: int, log) -> list[dict]:
    rows = []
    for batch, new, cached in sizes.prefill:
        total = new + cached
        sdpa_us = None
        if cached == 0:  # torch's is_causal is top-left aligned: only a full prefill has an SDPA twin
            q = torch.randn(batch, sizes.num_heads, new, sizes.d, device=device, dtype=sizes.dtype)
            k = torch.randn(batch, sizes.num_kv_heads, new, sizes.d, device=device, dtype=sizes.dtype)
            try:
                sdpa_us = time_us(sdpa_flash(q, k, torch.randn_like(k), causal=True), device, repeats)
            except RuntimeError as exc:
                log(f"  SDPA flash failed for prefill {batch}x{new}: {exc}")
            del q, k
        for r in sizes.ranks:
            pb = uniform_batch(batch, new, total, r, sizes.d, sizes.num_heads, sizes.num_kv_heads, sizes.block_size,
                               sizes.dtype, device)
            out = torch.empty(batch * new, sizes.num_heads, sizes.d, device=device, dtype=sizes.dtype)
            us = time_us(lambda: paged_attention(*pb.args(), out=out, max_seqlen_q=new, max_seqlen_k=total),
                         device, repeats)
            pairs = batch * sizes.num_heads * sum(cached + i + 1 for i in range(new))  # causal (q, k) pairs
            row = {"batch": batch, "new_tokens": new, "cached_tokens": cached, "r": r, "d": sizes.d, "us": us,
                   "tflop_per_s": 2 * pairs * (r + sizes.d) / us / 1e6, "sdpa_flash_r_eq_d_us": sdpa_us,
                   "speedup_vs_sdpa": sdpa_us / us if sdpa_us else None}
            rows.append(row)
            log(f"  prefill {batch}x{new} (+{cached} cached) r{r:<4} {us:11.1f} us {row['tflop_per_s']:7.1f} TFLOP/s"
                + (f"  SDPA(r=d) {sdpa_us:11.1f} us" if sdpa_us else ""))
            del pb, out
    full = {(row["batch"], row["new_tokens"], row["cached_tokens"]): row for row in rows if row["r"] == sizes.d}
    for row in rows:
        base = full.get((row["batch"], row["new_tokens"], row["cached_tokens"]))
        row["speedup_vs_r_eq_d"] = base["us"] / row["us"] if base else None
    return rows


def torch_path_sweep(sizes: CpuSizes, repeats: int, log) -> list[dict]:
    """`paged_attention_torch` per layer call on the CPU."""
    rows = []
    for dtype in sizes.dtypes:
        for name, num_seqs, new, total in sizes.cases:
            for r in sizes.ranks:
                pb = uniform_batch(num_seqs, new, total, r, sizes.d, sizes.num_heads, sizes.num_kv_heads,
                                   sizes.block_size, dtype, torch.device("cpu"))
                us = time_us(lambda: paged_attention_torch(*pb.args()), torch.device("cpu"), repeats)
                rows.append({"case": name, "sequences": num_seqs, "new_tokens": new, "context": total, "r": r,
                             "d": sizes.d, "dtype": str(dtype).removeprefix("torch."), "ms_per_layer": us / 1e3})
                log(f"  torch path {name} {num_seqs}x{new} ctx {total} r{r} {dtype}: {us / 1e3:9.1f} ms per layer")
    return rows


def evaluate_targets(decode: list[dict], d: int) -> dict:
    at = {row["r"]: row for row in decode if row["batch"] == 64 and row["context"] == 4096}
    if 32 not in at or d not in at:
        return {"evaluated": False, "reason": "batch 64 x 4k with r = 32 and r = d is not in this run"}
    speedup = at[d]["us"] / at[32]["us"]
    vs_sdpa = at[d]["speedup_vs_sdpa"]
    return {
        "evaluated": True,
        "decode_roof_fraction_b64_4k": {r: row["roof_fraction"] for r, row in at.items()},
        "decode_roof_fraction_ok": min(row["roof_fraction"] for row in at.values())
        >= TARGETS["decode_roof_fraction_b64_4k"],
        "decode_speedup_r32_over_r128_b64_4k": speedup,
        "decode_speedup_ok": speedup >= TARGETS["decode_speedup_r32_over_r128_b64_4k"],
        "decode_r128_vs_sdpa_b64_4k": vs_sdpa,
        "decode_vs_sdpa_ok": vs_sdpa is not None and vs_sdpa >= TARGETS["decode_r128_vs_sdpa_b64_4k"],
    }


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _section(title: str, headers: list[str], rows: list[list], *intro: str) -> list[str]:
    return ["", f"## {title}", "", *intro, *([""] if intro else []), markdown_table(headers, rows)]


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Thin-key paged attention kernels — {env['device']}", "",
             f"{env['date']} · torch {env['torch']} · triton {env['triton']}"
             + (" · **dry run: tiny sizes, interpreter times are meaningless**" if result["dry_run"] else ""), ""]
    if result.get("correctness"):
        lines += _section("Correctness (bf16 vs float64 reference)", ["case", "rel. error", "tolerance", "ok"],
                          [[c["case"], f"{c['rel_error']:.2e}", f"{c['tolerance']:.0e}", "yes" if c["ok"] else "**NO**"]
                           for c in result["correctness"]])
    if result.get("roof"):
        lines += ["", f"Roof (device-to-device copy, read + write): **{result['roof']['gb_per_s']:.0f} GB/s**"]
    if result.get("decode"):
        lines += _section(
            "Decode (one query token per sequence)",
            ["batch", "context", "r", "µs", "GB/s", "% roof", "vs r=d (ideal)", "SDPA flash r=d µs", "vs SDPA"],
            [[row["batch"], row["context"], row["r"], f"{row['us']:.1f}", f"{row['gb_per_s']:.0f}",
              f"{row['roof_fraction']:.0%}",
              f"{_fmt(row['speedup_vs_r_eq_d'], '.2f')}× ({row['ideal_speedup_vs_r_eq_d']:.2f}×)",
              _fmt(row["sdpa_flash_r_eq_d_us"], ".1f"), f"{_fmt(row['speedup_vs_sdpa'], '.2f')}×"]
             for row in result["decode"]])
        lines += _section("Decode split-KV sweep", ["batch", "context", "r", "splits", "µs"],
                          [[row["batch"], row["context"], row["r"], row["num_splits"], f"{row['us']:.1f}"]
                           for row in result["split_sweep"]])
    if result.get("shared_keys"):
        lines += _section(
            "Shared-key decode (S KV heads share one key latent of S·r dims)",
            ["batch", "context", "r", "S", "qk", "µs", "GB/s", "% roof", "time vs per-head r", "vs r=d"],
            [[row["batch"], row["context"], row["r"], row["key_share"], row["qk"], f"{row['us']:.1f}",
              f"{row['gb_per_s']:.0f}", f"{row['roof_fraction']:.0%}", f"{row['time_vs_per_head_r']:.2f}×",
              f"{row['speedup_vs_r_eq_d']:.2f}×"] for row in result["shared_keys"]],
            "Same cache bytes as per-head keys of r dims; S times the QK FLOPs per query head.")
    if result.get("prefill"):
        lines += _section(
            "Prefill", ["seqs", "new", "cached", "r", "µs", "TFLOP/s", "vs r=d", "SDPA flash r=d µs", "vs SDPA"],
            [[row["batch"], row["new_tokens"], row["cached_tokens"], row["r"], f"{row['us']:.1f}",
              f"{row['tflop_per_s']:.1f}", f"{_fmt(row['speedup_vs_r_eq_d'], '.2f')}×",
              _fmt(row["sdpa_flash_r_eq_d_us"], ".1f"), f"{_fmt(row['speedup_vs_sdpa'], '.2f')}×"]
             for row in result["prefill"]])
    if result.get("targets"):
        lines += ["", "## Targets (batch 64 × 4k decode)", "", "```", json.dumps(result["targets"], indent=2), "```"]
    if result.get("torch_path"):
        lines += _section("Torch path (CPU serving), per layer call",
                          ["case", "seqs × new", "context", "r", "d", "dtype", "ms"],
                          [[row["case"], f"{row['sequences']} × {row['new_tokens']}", row["context"], row["r"], row["d"],
                            row["dtype"], f"{row['ms_per_layer']:.1f}"] for row in result["torch_path"]],
                          f"threads {env.get('torch_threads')}, load average {env.get('load_average')}")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{result['environment']['device']} · {result['environment']['date']}" + (" · dry run" if result["dry_run"] else "")
    if not result.get("decode"):  # CPU run: the torch path only
        fig, ax = plt.subplots(figsize=(7, 4))
        rows = result["torch_path"]
        labels = [f"{r['case']}\nr={r['r']} {r['dtype']}" for r in rows]
        ax.bar(range(len(rows)), [r["ms_per_layer"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set(ylabel="ms per layer call", title="paged_attention_torch")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    decode = result["decode"]
    batch = 64 if any(row["batch"] == 64 for row in decode) else max(row["batch"] for row in decode)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in sorted({row["r"] for row in decode}):
        pts = sorted((row["context"], row["gb_per_s"]) for row in decode if row["r"] == r and row["batch"] == batch)
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"r = {r}")
        pts = sorted((row["batch"] * row["context"], row["speedup_vs_r_eq_d"]) for row in decode
                     if row["r"] == r and row["speedup_vs_r_eq_d"])
        right.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="none", label=f"r = {r}")
    left.axhline(result["roof"]["gb_per_s"], color="k", linestyle="--", label="copy roof")
    left.set(xscale="log", xlabel="context (tokens)", ylabel="KV read GB/s", title=f"decode, batch {batch}")
    right.set(xscale="log", xlabel="batch × context (tokens)", ylabel="speedup over r = d",
              title="decode: thin keys vs full keys, same kernel")
    left.legend()
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes, every section, on any device (CPU: Triton interpreter)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output directory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def log(msg: str) -> None:
    print(msg, flush=True)


def run(device: torch.device, dry_run: bool) -> tuple[dict, bool]:
    """Every section this device runs (GPU: correctness, roof, decode, splits, shared keys, prefill; CPU: the
    torch path, and the GPU sections in the interpreter on a dry run); (result, correctness ok)."""
    env = environment(device)
    log(f"thinkv kernels benchmark on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    result: dict = {"environment": env, "dry_run": dry_run}
    repeats = 1 if dry_run else 5
    ok = True
    if device.type == "cuda" or dry_run:
        sizes = GPU_DRY if dry_run else GPU_FULL
        log("correctness (bf16):")
        result["correctness"] = correctness(device) + graph_replay(device)
        for c in result["correctness"]:
            log(f"  {c['case']:<28} rel error {c['rel_error']:.2e} {'ok' if c['ok'] else 'FAILED'}")
        ok = all(c["ok"] for c in result["correctness"])
        result["roof"] = copy_roof(sizes, device, repeats)
        log(f"roof: device-to-device copy {result['roof']['gb_per_s']:.0f} GB/s")
        log("decode:")
        result["decode"] = decode_sweep(sizes, result["roof"]["gb_per_s"], device, repeats, log)
        log("decode split sweep:")
        result["split_sweep"] = split_sweep(sizes, device, repeats, log)
        log("shared-key decode:")
        result["shared_keys"] = shared_key_sweep(sizes, result["roof"]["gb_per_s"], device, repeats, log)
        log("prefill:")
        result["prefill"] = prefill_sweep(sizes, device, repeats, log)
        result["targets"] = evaluate_targets(result["decode"], sizes.d)
        result["sizes"] = {**asdict(sizes), "dtype": str(sizes.dtype)}
    if device.type == "cpu":
        log("torch path (CPU serving):")
        cpu_sizes = CPU_DRY if dry_run else CPU_FULL
        result["torch_path"] = torch_path_sweep(cpu_sizes, repeats, log)
        result["cpu_sizes"] = {**asdict(cpu_sizes), "dtypes": [str(t) for t in cpu_sizes.dtypes]}
    return result, ok


def write(result: dict, out: Path) -> Path:
    """JSON, markdown and PNG, named by device (and CPU threads), date and dry run; returns the stem."""
    env = result["environment"]
    slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"].lower()).strip("-")
    threads = f"-{env['torch_threads']}threads" if "torch_path" in result else ""  # CPU runs: speed depends on them
    stem = out / f"kernels-{slug}{threads}-{env['date']}{'-dry-run' if result['dry_run'] else ''}"
    write_json(f"{stem}.json", result)
    Path(f"{stem}.md").write_text(markdown(result))
    plot(result, Path(f"{stem}.png"))
    return stem


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result, ok = run(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.dry_run)
    stem = write(result, args.out)
    log(f"wrote {stem}.json, .md, .png")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
