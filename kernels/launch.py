"""Launch configurations: the one place to tune the kernels for a device.

No `@triton.autotune`: the interpreter cannot run several configs, CUDA graphs want
no first-call benchmarking, and an explicit table is reviewable. Configs are pure
functions of (phase, qk, d, group size, dtype, device facts), where qk is the query/key
width per head (r, or key_share * r with shared keys: `attention.paged_attention`) and
QK_PAD / D_PAD its and d's padded widths (`head_pads`); tune them with `benchmarks/kernels.py`.

| phase   | dtype  | condition             | BLOCK_M           | TILE_N                     | warps | stages |
|---------|--------|-----------------------|-------------------|----------------------------|-------|--------|
| decode  | 16-bit | QK_PAD + D_PAD <= 384 | max(16, pow2(g))  | 64                         | 4     | 3      |
| decode  | 16-bit | wider                 | max(16, pow2(g))  | 32                         | 4     | 3      |
| decode  | fp32   |                       | max(16, pow2(g))  | 32                         | 4     | 2      |
| prefill | 16-bit | D_PAD <= 128          | max(128, pow2(g)) | 64                         | 8     | 3      |
| prefill | 16-bit | D_PAD == 256          | max(64, pow2(g))  | 64 if QK_PAD <= 64 else 32 | 8     | 2      |
| prefill | fp32   |                       | max(64, pow2(g))  | 32                         | 8     | 2      |
| any     | interpreter |                   | max(16 decode / 32 prefill, pow2(g)) | 32     | 1     | 1      |

On a GPU the stage count, then TILE_N, then BLOCK_M are lowered until the pipelined
K/V tiles fit the device's shared memory. The interpreter uses small tiles so that the
tests cross many tiles and query blocks at small sizes.

Split-KV (decode-only batches): splits = next_pow2(ceil(PROGRAMS_PER_SM * SMs /
(seqs * kv_heads))), capped by context length (>= MIN_SPLIT_TOKENS keys per split) and
MAX_SPLITS; 1 when the batch alone fills the device. Powers of two keep the number of
compiled variants small and CUDA-graph captures stable.

CUDA graphs: a plan (grids, constexprs, scalar arguments) is a pure function of the call's
shapes (rows, requests, heads, dims), whether max_seqlen_q exceeds DECODE_MAX_Q, and
`context_bucket(max_seqlen_k)`; it reads no device value and no other per-step host value,
so a graph captured for a batch shape replays any batch of that shape
(tests/kernels/test_padding.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton

from . import attention_kernel

PROGRAMS_PER_SM = 8  # resident programs per SM to hide HBM latency and shrink the last-wave tail
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost (q load, partial write, merge) dominates
MAX_SPLITS = 64


@dataclass(frozen=True)
class DeviceFacts:
    """What the launch heuristics need to know about the device."""

    kind: str  # "interpreter" or "sm<major><minor>"
    num_sms: int
    smem_bytes: int  # opt-in shared memory per block


@dataclass(frozen=True)
class TileConfig:
    """Constexpr tile sizes and launch options of one kernel launch."""

    block_m: int  # query rows (tokens x group heads) per program
    tile_n: int  # KV positions per loop iteration
    num_warps: int
    num_stages: int


@dataclass
class KernelCall:
    """One planned kernel launch, kept as data so a plan can be inspected and compiled ahead of time."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]
    options: dict[str, int]

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


INTERPRETER = DeviceFacts("interpreter", num_sms=1, smem_bytes=1 << 30)


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(attention_kernel.paged_attention_kernel, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _cuda_facts(index: int) -> DeviceFacts:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024  # sm86/sm89's opt-in size
    return DeviceFacts(f"sm{props.major}{props.minor}", props.multi_processor_count, int(smem))


def device_facts(device: torch.device) -> DeviceFacts:
    if interpreting():
        return INTERPRETER
    return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def head_pads(qk: int, d: int) -> tuple[int, int]:
    """Power-of-two register widths: the query/key width qk (r, or key_share * r) padded to >= 16
    (tl.dot needs K >= 16), d to a power of two."""
    return max(16, triton.next_power_of_2(qk)), triton.next_power_of_2(d)


def _fit_smem(cfg: TileConfig, min_block_m: int, qk_pad: int, d_pad: int, elem: int, smem: int) -> TileConfig:
    """Fewer pipeline stages, then a narrower KV tile, then fewer query rows, until the staged
    K/V tiles and the query block fit in shared memory."""
    block_m, tile_n, stages = cfg.block_m, cfg.tile_n, cfg.num_stages
    while stages * tile_n * (qk_pad + d_pad) * elem + block_m * qk_pad * elem > 0.85 * smem:
        if stages > 1:
            stages -= 1
        elif tile_n > 16:
            tile_n //= 2
        elif block_m > min_block_m:
            block_m //= 2
        else:
            break
    return TileConfig(block_m, tile_n, cfg.num_warps, stages)


@functools.lru_cache(maxsize=None)
def tile_config(phase: str, qk: int, d: int, group: int, dtype: torch.dtype, facts: DeviceFacts) -> TileConfig:
    """The table above; `phase` is 'decode' or 'prefill', qk the query/key width per head (`head_pads`)."""
    qk_pad, d_pad = head_pads(qk, d)
    group_rows = triton.next_power_of_2(group)
    if facts.kind == "interpreter":
        return TileConfig(max(16 if phase == "decode" else 32, group_rows), 32, 1, 1)
    wide = dtype == torch.float32
    if phase == "decode":
        cfg = TileConfig(max(16, group_rows), 32 if wide or qk_pad + d_pad > 384 else 64, 4, 2 if wide else 3)
    elif wide:
        cfg = TileConfig(max(64, group_rows), 32, 8, 2)
    elif d_pad <= 128:
        cfg = TileConfig(max(128, group_rows), 64, 8, 3)
    else:
        cfg = TileConfig(max(64, group_rows), 64 if qk_pad <= 64 else 32, 8, 2)
    return _fit_smem(cfg, max(16, group_rows), qk_pad, d_pad, torch.finfo(dtype).bits // 8, facts.smem_bytes)


def context_bucket(max_seqlen_k: int) -> int:
    """All a launch plan depends on of the batch's longest context: the largest power of two <=
    max(1, max_seqlen_k // MIN_SPLIT_TOKENS), the most splits that give each >= MIN_SPLIT_TOKENS keys.
    A CUDA graph captured at max_model_len keeps that bucket's plan for every replay."""
    by_length = max(1, max_seqlen_k // MIN_SPLIT_TOKENS)
    return 1 << (by_length.bit_length() - 1)


def decode_splits(num_seqs: int, num_kv_heads: int, max_seqlen_k: int, facts: DeviceFacts) -> int:
    """Split-KV factor for a decode-only batch (see the module docstring)."""
    if facts.kind == "interpreter":
        return 1
    programs = max(1, num_seqs * num_kv_heads)
    target = PROGRAMS_PER_SM * facts.num_sms
    if programs >= target:
        return 1
    wanted = triton.next_power_of_2(-(-target // programs))
    return max(1, min(wanted, context_bucket(max_seqlen_k), MAX_SPLITS))
