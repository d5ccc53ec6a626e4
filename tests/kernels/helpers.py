"""Shared pieces of the kernel tests: device, dtypes, tolerances, comparisons."""

from __future__ import annotations

import torch

from vllm_thinkv.kernels import reference
from vllm_thinkv.kernels.testing import PagedBatch

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"  # CPU runs the Triton kernels in the interpreter
# Every dtype everywhere: under the interpreter 16-bit loads are upcast to fp32 (its bf16
# arithmetic is wrong), so CPU runs check the 16-bit loads, stores and rounding, not GPU dot precision.
MATRIX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Bounds on ||out - ref|| / ||ref|| against the float64 reference on the same (rounded) inputs.
# fp32: accumulation error only (~1e-7 measured). 16-bit: the output is rounded to the dtype
# (RMS relative error ~ulp/sqrt(12): 3e-4 fp16, 2e-3 bf16) and on a GPU P is rounded to the
# dtype before P.V, roughly doubling that; the bounds leave ~4x headroom.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def poisoned_out(batch: PagedBatch, d: int) -> torch.Tensor:
    """An output buffer full of NaN, so any row a kernel forgets to write fails the comparison."""
    return torch.full((batch.q.shape[0], batch.q.shape[1], d), float("nan"), dtype=batch.q.dtype, device=batch.q.device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "output holds NaN: a row was not written or a masked slot leaked in"
    return float((out.double().cpu() - ref).norm() / ref.norm())


def reference_output(batch: PagedBatch) -> torch.Tensor:
    return reference.paged_attention(*batch.args(), gaps=batch.gaps, key_share=batch.key_share,
                                     sliding_window=batch.sliding_window)


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = relative_error(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"
