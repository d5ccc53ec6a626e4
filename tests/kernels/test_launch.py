"""The launch table and plan: pure functions of shapes and device facts, checked for every supported size."""

import pytest
import torch
import triton

from vllm_thinkv.kernels import launch
from vllm_thinkv.kernels.attention import plan_attention
from vllm_thinkv.kernels.checks import attention_shape
from vllm_thinkv.kernels.testing import random_paged_batch

H100 = launch.DeviceFacts("sm90", 132, 232448)
RTX4090 = launch.DeviceFacts("sm89", 128, 101376)


@pytest.mark.parametrize("facts", [H100, RTX4090, launch.INTERPRETER], ids=lambda f: f.kind)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_tile_configs_are_valid_for_every_supported_shape(facts, dtype):
    elem = torch.finfo(dtype).bits // 8
    for r in range(8, 257, 8):
        for d in range(16, 257, 16):
            r_pad, d_pad = launch.head_pads(r, d)
            assert r_pad >= max(16, r) and d_pad >= d  # tl.dot needs K >= 16
            # fp32 with 64-head groups and r > 128 can exceed a 99 KB GPU's shared memory (Triton then
            # refuses the launch with an out-of-resources error); 16-bit covers MQA-sized groups.
            for group in (1, 3, 4, 8, 16) + ((64,) if elem == 2 else ()):
                for phase in ("decode", "prefill"):
                    cfg = launch.tile_config(phase, r, d, group, dtype, facts)
                    assert cfg.block_m >= max(16, triton.next_power_of_2(group))
                    assert cfg.block_m & (cfg.block_m - 1) == 0 and cfg.tile_n in (16, 32, 64)
                    staged = cfg.num_stages * cfg.tile_n * (r_pad + d_pad) * elem + cfg.block_m * r_pad * elem
                    assert facts.kind == "interpreter" or staged <= 0.85 * facts.smem_bytes, (phase, r, d, group, cfg)


def test_split_heuristic():
    assert launch.decode_splits(256, 8, 32768, H100) == 1  # 2048 programs already fill 132 SMs
    assert launch.decode_splits(1, 8, 32768, H100) == 64  # capped by MAX_SPLITS
    assert launch.decode_splits(1, 8, 1024, H100) == 4  # capped by >= 256 keys per split
    assert launch.decode_splits(1, 8, 100, H100) == 1
    assert launch.decode_splits(1, 8, 32768, launch.INTERPRETER) == 1
    previous = 1 << 30
    for batch in (1, 2, 4, 8, 16, 32, 64, 128):
        splits = launch.decode_splits(batch, 8, 4096, H100)
        assert splits & (splits - 1) == 0 and splits <= previous  # power of two, fewer as batches grow
        previous = splits


def _plan(q_lens, seq_lens, max_seqlen_q, num_splits=None, group=4):
    b = random_paged_batch(q_lens, seq_lens, num_heads=group, num_kv_heads=1, r=32, d=64, block_size=16)
    shape = attention_shape(b)
    out = b.q.new_empty(shape.num_tokens, shape.num_heads, 64)
    calls = plan_attention(b, shape, out, max_seqlen_q=max_seqlen_q, max_seqlen_k=max(seq_lens),
                           num_splits=num_splits, facts=H100)
    return [(c.kernel.fn.__name__, c.constexprs.get("DECODE"), c.constexprs.get("NUM_SPLITS"), c.grid) for c in calls]


def test_plans():
    # Decode-only small batch on a big GPU: split-KV decode, then the merge; no prefill launch.
    assert _plan([1, 1], [4096, 100], 1) == [
        ("paged_attention_kernel", True, 16, (2, 1, 16)), ("merge_splits_kernel", None, 16, (2, 4))]
    # Mixed: decode unsplit (prefill fills the device), prefill grid = tokens // BLOCK_Q + seqs.
    assert _plan([1, 50], [4096, 60], 50) == [
        ("paged_attention_kernel", True, 1, (2, 1, 1)), ("paged_attention_kernel", False, 1, (51 // 16 + 2, 1, 1))]  # fp32: BLOCK_M 64
    # Forced splits apply in a mixed batch too.
    assert [p[:3] for p in _plan([1, 50], [4096, 60], 50, num_splits=3)] == [
        ("paged_attention_kernel", True, 3), ("merge_splits_kernel", None, 3), ("paged_attention_kernel", False, 1)]
    assert _plan([0], [0], 0) == []


def test_kernels_do_not_import_vllm():
    import subprocess
    import sys

    code = "import sys, vllm_thinkv.kernels; print([m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
