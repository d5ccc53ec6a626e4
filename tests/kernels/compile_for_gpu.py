"""Compile the kernels for real NVIDIA targets on a machine without a GPU.

The interpreter executes kernels as Python, so it accepts code the Triton compiler
rejects (and ignores shared-memory limits). This script plans representative launches
with the GPU tile table (`launch.tile_config` for sm80 / sm90 device facts) and
compiles every distinct kernel variant to a cubin with Triton's bundled ptxas,
checking each fits the device's shared memory. It must run without TRITON_INTERPRET
(see test_compile.py). Prints one JSON line per variant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vllm_thinkv.kernels import launch  # noqa: E402
from vllm_thinkv.kernels.attention import plan_attention  # noqa: E402
from vllm_thinkv.kernels.calls import KVWrite  # noqa: E402
from vllm_thinkv.kernels.checks import attention_shape  # noqa: E402
from vllm_thinkv.kernels.testing import random_log_counts, random_paged_batch  # noqa: E402
from vllm_thinkv.kernels.write_kv import plan_write_kv  # noqa: E402

DEVICES = {
    90: launch.DeviceFacts("sm90", num_sms=132, smem_bytes=232448),  # H100 SXM
    80: launch.DeviceFacts("sm80", num_sms=108, smem_bytes=166912),  # A100
}
TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}

# (arch, dtype, r, d, group, with gap, key_share[, sliding window[, slot counts]]): decode-only small batch
# (split-KV + merge) and a mixed batch.
CASES = [
    (90, torch.bfloat16, 32, 128, 4, False, 1),  # the headline configuration
    (90, torch.bfloat16, 24, 256, 3, True, 1),  # non-power-of-two r, widest d, odd group, gap
    (90, torch.float16, 8, 64, 1, False, 1),  # r < 16, MHA
    (90, torch.bfloat16, 256, 256, 8, False, 1),  # widest r
    (90, torch.float32, 48, 128, 4, True, 1),  # fp32 (exact products, FMA path)
    (80, torch.float16, 64, 128, 8, False, 1),  # Ampere
    (90, torch.bfloat16, 24, 128, 4, True, 4),  # shared keys: 4 slots of non-power-of-two r = 24 -> qk 96, gap
    (90, torch.bfloat16, 64, 256, 4, True, 1, 512),  # sliding window (Gemma 3's d = 256), gap
    (80, torch.float16, 32, 128, 8, False, 2, 100),  # sliding window with shared keys, Ampere
    (90, torch.bfloat16, 32, 128, 4, True, 1, None, True),  # slot counts (SnapKV merge), gap
]


def specialised(call: launch.KernelCall) -> ASTSource:
    """The source Triton would compile at launch: like its JIT, ints equal to 1 become constants and
    ints divisible by 16 and 16-byte aligned pointers are marked divisible (this decides vector width
    and whether loads can be pipelined)."""
    names = [n for n in call.kernel.arg_names if n not in call.constexprs]
    types, constants, attrs = {}, dict(call.constexprs), {}
    for name, value in zip(names, call.args):
        index = (call.kernel.arg_names.index(name),)
        if isinstance(value, torch.Tensor):
            types[name] = "*" + TYPE_NAMES[value.dtype]
            divisible = value.data_ptr() % 16 == 0
        elif isinstance(value, float):
            types[name] = "fp32"
            divisible = False
        elif value == 1:
            types[name] = "constexpr"
            constants[name] = 1
            continue
        else:
            types[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        if divisible:
            attrs[index] = [["tt.divisibility", 16]]
    types.update({name: "constexpr" for name in call.constexprs})
    ordered = {name: types[name] for name in call.kernel.arg_names}
    return ASTSource(call.kernel, ordered, constexprs=constants, attrs=attrs)


def planned_calls(arch: int, dtype: torch.dtype, r: int, d: int, group: int, gap: bool,
                  key_share: int = 1, sliding_window: int | None = None, counts: bool = False) -> list[launch.KernelCall]:
    num_kv_heads = max(2, key_share)
    b = random_paged_batch(
        [1, 1, 40], [300, 64, 200], num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads, r=r, d=d,
        block_size=16, dtype=dtype, device="cpu", gaps=[(16, 200), (0, 0), (0, 0)] if gap else None,
        key_share=key_share, sliding_window=sliding_window,
    )
    if counts:
        b = dataclasses.replace(b, log_counts=random_log_counts(b))
    calls = []
    for q_lens_max in (1, 40):  # decode-only plan (uses the split heuristic) and mixed plan
        shape = attention_shape(b)
        out = b.q.new_empty(shape.num_tokens, shape.num_heads, d)
        calls += plan_attention(b, shape, out, max_seqlen_q=q_lens_max, max_seqlen_k=8192, num_splits=None,
                                facts=DEVICES[arch])
    key = torch.randn(4, num_kv_heads, r, dtype=dtype)
    value = torch.randn(4, num_kv_heads, d, dtype=dtype)
    slots = torch.tensor([3, -1, 7, 9], dtype=torch.int64)
    calls += plan_write_kv(KVWrite(key, value, b.key_cache, b.value_cache, slots))
    return calls


def main() -> int:
    seen: set = set()
    failures = 0
    for arch, dtype, r, d, group, gap, key_share, *rest in CASES:
        for call in planned_calls(arch, dtype, r, d, group, gap, key_share, *rest):
            src = specialised(call)
            key = repr((arch, call.kernel.fn.__name__, src.signature, sorted(src.constants.items()),
                        sorted(src.attrs.items()), sorted(call.options.items())))
            if key in seen:
                continue
            seen.add(key)
            row = dict(arch=arch, kernel=call.kernel.fn.__name__, **{k: v for k, v in call.constexprs.items()},
                       **call.options, dtype=TYPE_NAMES[dtype])
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=call.options)
                row["shared_bytes"] = compiled.metadata.shared
                row["fits_smem"] = compiled.metadata.shared <= DEVICES[arch].smem_bytes
                failures += not row["fits_smem"]
            except Exception as exc:  # report every failing variant, not just the first
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                failures += 1
            print(json.dumps(row), flush=True)
    print(json.dumps({"variants": len(seen), "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
