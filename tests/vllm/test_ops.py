"""`backend.ops.select_ops`: which implementation THINKV_CPU_ATTENTION picks on CPU (no engine)."""

import pytest
import torch

from vllm_thinkv.backend import ops
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels import paged_attention_torch
from vllm_thinkv.kernels.cpu_numba import paged_attention_cpu

select = ops.select_ops.__wrapped__  # uncached: the environment changes between cases


def test_numba_is_the_cpu_default(monkeypatch):
    monkeypatch.delenv(ops.CPU_ATTENTION_ENV, raising=False)
    chosen = select("cpu")
    assert chosen.name == "numba" and chosen.paged_attention is paged_attention_cpu
    chosen.prepare(torch.float32, 16, 64)  # compiles (or loads) the kernels: start-up, not the first request


@pytest.mark.parametrize("value, name, op", [("numba", "numba", paged_attention_cpu),
                                             (" Torch ", "torch", paged_attention_torch)])
def test_explicit_choice(monkeypatch, value, name, op):
    monkeypatch.setenv(ops.CPU_ATTENTION_ENV, value)
    chosen = select("cpu")
    assert chosen.name == name and chosen.paged_attention is op


def test_without_numba_the_default_is_torch_and_says_so(monkeypatch):
    from vllm_thinkv.kernels import cpu_numba

    monkeypatch.delenv(ops.CPU_ATTENTION_ENV, raising=False)
    monkeypatch.setattr(cpu_numba, "available", lambda: False)
    chosen = select("cpu")
    assert chosen.paged_attention is paged_attention_torch and "numba is not installed" in chosen.name
    monkeypatch.setenv(ops.CPU_ATTENTION_ENV, "numba")
    with pytest.raises(ThinKVError, match="needs numba"):
        select("cpu")


def test_unknown_choice_is_an_error(monkeypatch):
    monkeypatch.setenv(ops.CPU_ATTENTION_ENV, "flex")
    with pytest.raises(ThinKVError, match="numba, torch, triton"):
        select("cpu")
