"""paged_attention_cpu (the backend's default CPU op): long prefill chunks to the torch path, the rest to numba.

Ragged batches whose long sequences sit first, last, in the middle and interleaved with short ones
(contiguous and scattered query rows), with gaps, counts, a sliding window and shared keys, against the
float64 reference, `out` NaN-poisoned (rows past cu_seqlens_q[-1] must stay NaN); a spy checks which
implementation got which sequences, and one case uses the real PREFILL_TOKENS.
"""

from __future__ import annotations

import pytest
import torch

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels import cpu_numba, reference
from vllm_thinkv.kernels.cpu_numba import PREFILL_TOKENS, paged_attention_cpu
from vllm_thinkv.kernels.testing import random_log_counts, random_paged_batch

from .helpers import MATRIX_DTYPES, assert_close_to_reference, poisoned_out

pytestmark = pytest.mark.skipif(not cpu_numba.available(), reason="numba is not installed")

LONG = 8  # PREFILL_TOKENS in the routing tests: sequences with more query tokens go to torch


class _Spy:
    """Stands in for an op module attribute: records the query lengths of each call's sequences."""

    def __init__(self, op):
        self.op, self.calls = op, []

    def impl(self, call, out, num_splits):
        cu = call.cu_seqlens_q.tolist()
        self.calls.append([b - a for a, b in zip(cu[:-1], cu[1:])])
        return self.op.impl(call, out, num_splits)


@pytest.fixture
def spies(monkeypatch):
    monkeypatch.setattr(cpu_numba, "PREFILL_TOKENS", LONG)
    spies = {"torch": _Spy(cpu_numba.paged_attention_torch), "numba": _Spy(cpu_numba.paged_attention_numba)}
    monkeypatch.setattr(cpu_numba, "paged_attention_torch", spies["torch"])
    monkeypatch.setattr(cpu_numba, "paged_attention_numba", spies["numba"])
    return spies


# (q_lens, seq_lens): long first / last / middle / interleaved, all long, none long
ORDERS = {
    "long-first": ([20, 1, 3, 1], [60, 70, 41, 33]),
    "long-last": ([1, 1, 5, 30], [48, 90, 40, 30]),
    "long-middle": ([1, 12, 17, 1], [50, 40, 60, 66]),
    "interleaved": ([9, 1, 25, 2, 11, 1], [30, 64, 80, 19, 11, 52]),
    "all-long": ([9, 30], [40, 30]),
    "none-long": ([1, 8, 3], [40, 30, 9]),
}


def _check(batch, dtype, what, **opts):
    opts = dict(gaps=batch.gaps, key_share=batch.key_share, sliding_window=batch.sliding_window) | opts
    ref = reference.paged_attention(*batch.args(), **opts)
    out = poisoned_out(batch, batch.value_cache.shape[-1])
    pad = torch.full((3, *out.shape[1:]), float("nan"), dtype=out.dtype)
    out = torch.cat([out, pad])  # padding rows past cu_seqlens_q[-1] (CUDA-graph batches): never written
    q = torch.cat([batch.q, torch.randn(3, *batch.q.shape[1:]).to(batch.q.dtype)])
    assert paged_attention_cpu(q, *batch.args()[1:], out=out, **opts) is out
    assert_close_to_reference(out[: batch.q.shape[0]], ref, dtype, what)
    assert out[batch.q.shape[0]:].isnan().all(), f"{what}: padding rows written"


@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
@pytest.mark.parametrize("order", ORDERS, ids=str)
def test_routing_matches_reference(spies, order, dtype):
    q_lens, seq_lens = ORDERS[order]
    gaps = [(0, 0) if ql > seq // 2 else (3, 3 + (seq - ql) // 2) for ql, seq in zip(q_lens, seq_lens)]
    batch = random_paged_batch(q_lens, seq_lens, num_heads=6, num_kv_heads=2, r=16, d=32, block_size=16,
                               dtype=dtype, gaps=gaps, seed=len(order))
    _check(batch, dtype, order)
    long = [ql for ql in q_lens if ql > LONG]
    short = [ql for ql in q_lens if ql <= LONG]
    assert spies["torch"].calls == ([long] if long else [])
    assert spies["numba"].calls == ([short] if short else [])


@pytest.mark.parametrize("case", [dict(sliding_window=7), dict(key_share=2, num_heads=4), dict(counts=True)],
                         ids=["window", "shared", "counts"])
def test_routing_variants(spies, case):
    counts = case.pop("counts", False)
    opts = dict(num_heads=6, num_kv_heads=2, r=16, d=32, block_size=16, dtype=torch.float32, seed=5) | case
    batch = random_paged_batch([1, 20, 2, 13], [50, 44, 30, 60], gaps=[(4, 30), (0, 0), (0, 0), (10, 20)], **opts)
    extra = dict(log_counts=random_log_counts(batch, seed=4)) if counts else {}
    _check(batch, torch.float32, f"routing with {case or 'counts'}", **extra)
    assert spies["torch"].calls == [[20, 13]] and spies["numba"].calls == [[1, 2]]


def test_real_threshold():
    """At the shipped PREFILL_TOKENS: a chunk just over it beside decodes and one at it."""
    batch = random_paged_batch([1, PREFILL_TOKENS + 1, PREFILL_TOKENS, 1], [300, PREFILL_TOKENS + 40,
                               PREFILL_TOKENS, 700], num_heads=4, num_kv_heads=2, r=16, d=32, block_size=16,
                               dtype=torch.bfloat16, seed=9)
    _check(batch, torch.bfloat16, "real threshold")


def test_bad_call_is_refused_whole(spies):
    """A malformed call is refused before either implementation runs (nothing half-written)."""
    batch = random_paged_batch([20, 1], [40, 30], num_heads=2, num_kv_heads=1, r=16, d=32, block_size=16, seed=1)
    with pytest.raises(ThinKVError, match="seq_len >= q_len"):
        paged_attention_cpu(*batch.args()[:5], torch.tensor([40, 0], dtype=torch.int32), batch.scale)
    assert spies["torch"].calls == [] and spies["numba"].calls == []
