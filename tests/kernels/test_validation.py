"""Bad input gets a ThinKVError (a ValueError) naming the problem, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.kernels import paged_attention, paged_attention_torch, write_kv, write_kv_torch
from vllm_thinkv.kernels.checks import check_device
from vllm_thinkv.kernels.testing import packed_kv_cache, random_paged_batch

from .helpers import DEVICE

ATTENTION_OPS = [paged_attention, paged_attention_torch]
WRITE_OPS = [write_kv, write_kv_torch]


def _args(r=16, d=64, num_heads=4, num_kv_heads=2, block_size=16, dtype=torch.float32):
    batch = random_paged_batch([1, 3], [20, 9], num_heads=num_heads, num_kv_heads=num_kv_heads, r=r, d=d,
                               block_size=block_size, dtype=dtype, device=DEVICE)
    return dict(q=batch.q, key_cache=batch.key_cache, value_cache=batch.value_cache, block_table=batch.block_table,
                cu_seqlens_q=batch.cu_seqlens_q, seq_lens=batch.seq_lens, scale=batch.scale)


def _cache(r=16, d=64, num_kv_heads=2, block_size=16, dtype=torch.float32, num_blocks=4):
    _, key_cache, value_cache = packed_kv_cache(num_blocks, block_size, num_kv_heads, r, d, dtype, DEVICE)
    return key_cache, value_cache


def _replace(args, **changes):
    return {**args, **changes}


BAD_ATTENTION = [
    ("r not a multiple of 8", lambda a: _replace(a, q=a["q"][..., :12], key_cache=_cache(r=12)[0],
                                                 value_cache=_cache(r=12)[1]), "r=12 is unsupported"),
    ("r above 256", lambda a: _replace(a, q=torch.zeros(4, 4, 264, device=DEVICE), key_cache=_cache(r=264)[0],
                                       value_cache=_cache(r=264)[1]), "r=264 is unsupported"),
    ("d not a multiple of 16", lambda a: _replace(a, value_cache=_cache(d=72)[1], key_cache=_cache(d=72)[0]),
     "d=72 is unsupported"),
    ("d above 256", lambda a: _replace(a, value_cache=_cache(d=512)[1], key_cache=_cache(d=512)[0]), "d=512 is unsupported"),
    ("block size", lambda a: _replace(a, key_cache=_cache(block_size=8)[0], value_cache=_cache(block_size=8)[1]),
     "block_size=8 is unsupported"),
    ("heads not a multiple of kv heads", lambda a: _replace(a, q=torch.zeros(4, 3, 16, device=DEVICE)),
     "num_heads=3 must be a positive multiple of num_kv_heads=2"),
    ("q dtype vs cache", lambda a: _replace(a, q=a["q"].half()), "must have the same dtype"),
    ("fp8 cache", lambda a: _replace(a, key_cache=a["key_cache"].to(torch.float8_e4m3fn),
                                     value_cache=a["value_cache"].to(torch.float8_e4m3fn)), "no fp8 KV cache"),
    ("q head dim", lambda a: _replace(a, q=torch.zeros(4, 4, 24, device=DEVICE)), "q head dim 24 != key_cache head dim r=16"),
    ("q rank", lambda a: _replace(a, q=a["q"][0]), "q must have shape [num_tokens, num_heads, r]"),
    ("cache disagreement", lambda a: _replace(a, value_cache=_cache(num_blocks=5)[1]), "must agree on"),
    ("block table dtype", lambda a: _replace(a, block_table=a["block_table"].long()), "block_table must be int32"),
    ("cu_seqlens length", lambda a: _replace(a, cu_seqlens_q=a["cu_seqlens_q"][:2]), "expected num_seqs + 1 = 3"),
    ("seq_lens rank", lambda a: _replace(a, seq_lens=a["seq_lens"][None]), "seq_lens must have shape [num_seqs]"),
    ("out shape", lambda a: _replace(a, out=torch.zeros(4, 4, 32, device=DEVICE)), "out must have shape (4, 4, 64)"),
    ("out dtype", lambda a: _replace(a, out=torch.zeros(4, 4, 64, device=DEVICE, dtype=torch.float16)), "out dtype"),
    ("gaps shape", lambda a: _replace(a, gaps=torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)), "gaps must have shape"),
    ("gap over the queries", lambda a: _replace(a, gaps=torch.tensor([[0, 20], [0, 0]], dtype=torch.int32, device=DEVICE)),
     "gap [0, 20) of sequence 0 must lie in its cached context [0, 19)"),
    ("seq_len below q_len", lambda a: _replace(a, seq_lens=torch.tensor([20, 2], dtype=torch.int32, device=DEVICE)),
     "seq_len >= q_len"),
    # (ending before num_tokens is fine: the rows after cu_seqlens_q[-1] are padding, tests/kernels/test_padding.py)
    ("cu_seqlens end", lambda a: _replace(a, cu_seqlens_q=torch.tensor([0, 1, 5], dtype=torch.int32, device=DEVICE)),
     "cu_seqlens_q ends at 5 but q has only num_tokens=4"),
    ("block table too narrow", lambda a: _replace(a, block_table=a["block_table"][:, :1]), "does not fit a block table"),
    ("scale", lambda a: _replace(a, scale=-1.0), "scale must be a positive finite number"),
    # Shared keys (key_share): q holds key_share * r dims per head; the fixture has num_kv_heads=2, r=16.
    ("key_share zero", lambda a: _replace(a, key_share=0), "key_share must be a positive int, got 0"),
    ("key_share bool", lambda a: _replace(a, key_share=True), "key_share must be a positive int, got True"),
    ("key_share float", lambda a: _replace(a, key_share=2.0), "key_share must be a positive int, got 2.0"),
    ("key_share not dividing kv heads", lambda a: _replace(a, key_share=3, q=torch.zeros(4, 4, 48, device=DEVICE)),
     "key_share=3 must divide num_kv_heads=2"),
    ("shared q width", lambda a: _replace(a, key_share=2), "q head dim 16 != key_share * r = 2 * 16 = 32"),
    ("shared width above 256", lambda a: _replace(a, key_share=2, q=torch.zeros(4, 4, 272, device=DEVICE),
                                                  key_cache=_cache(r=136)[0], value_cache=_cache(r=136)[1]),
     "key_share * r = 2 * 136 = 272 exceeds the kernels' limit 256: use a smaller share group"),
    # Sliding windows: None or an int from 1 to 2^31 - 1.
    ("window zero", lambda a: _replace(a, sliding_window=0), "sliding window 0 is unsupported"),
    ("window negative", lambda a: _replace(a, sliding_window=-4), "sliding window -4 is unsupported"),
    ("window bool", lambda a: _replace(a, sliding_window=True), "sliding window True is unsupported"),
    ("window float", lambda a: _replace(a, sliding_window=16.0), "sliding window 16.0 is unsupported"),
    ("window above int32", lambda a: _replace(a, sliding_window=2**31), "an int from 1 to 2147483647"),
]


@pytest.mark.parametrize("op", ATTENTION_OPS, ids=lambda op: op.__name__)
@pytest.mark.parametrize("name,make,message", BAD_ATTENTION, ids=[c[0] for c in BAD_ATTENTION])
def test_attention_rejects(op, name, make, message):
    args = make(_args())
    with pytest.raises(ThinKVError) as info:
        op(**args)
    assert message in str(info.value), f"{name}: {info.value}"
    assert isinstance(info.value, ValueError)


def test_num_splits_must_be_positive():
    with pytest.raises(ThinKVError, match="num_splits must be a positive int"):
        paged_attention(**_args(), num_splits=0)


def test_cpu_tensors_need_the_torch_path_outside_the_interpreter():
    t = torch.zeros(1)
    with pytest.raises(ThinKVError, match="use paged_attention_torch / write_kv_torch on CPU"):
        check_device({"q": t}, triton_path=True, interpreting=False)
    check_device({"q": t}, triton_path=False, interpreting=False)  # the torch path is fine on CPU


def _write_args():
    key_cache, value_cache = _cache()
    return dict(key=torch.randn(5, 2, 16, device=DEVICE), value=torch.randn(5, 2, 64, device=DEVICE),
                key_cache=key_cache, value_cache=value_cache,
                slot_mapping=torch.tensor([0, 1, -1, 5, 9], dtype=torch.int32, device=DEVICE))


BAD_WRITE = [
    ("key head dim", lambda a: _replace(a, key=torch.randn(5, 2, 8, device=DEVICE)), "key must have shape (5, 2, 16)"),
    ("value heads", lambda a: _replace(a, value=torch.randn(5, 1, 64, device=DEVICE)), "value must have shape (5, 2, 64)"),
    ("dtype", lambda a: _replace(a, key=a["key"].half()), "must share one dtype"),
    ("slot dtype", lambda a: _replace(a, slot_mapping=a["slot_mapping"].float()), "slot_mapping must be int32 or int64"),
    ("too many slots", lambda a: _replace(a, slot_mapping=torch.zeros(6, dtype=torch.int32, device=DEVICE)),
     "slot_mapping has 6 entries but key/value hold only 5 tokens"),
    ("cache r", lambda a: _replace(a, key_cache=_cache(r=12)[0], value_cache=_cache(r=12)[1]), "r=12 is unsupported"),
]


@pytest.mark.parametrize("op", WRITE_OPS, ids=lambda op: op.__name__)
@pytest.mark.parametrize("name,make,message", BAD_WRITE, ids=[c[0] for c in BAD_WRITE])
def test_write_kv_rejects(op, name, make, message):
    with pytest.raises(ThinKVError) as info:
        op(**make(_write_args()))
    assert message in str(info.value), f"{name}: {info.value}"
