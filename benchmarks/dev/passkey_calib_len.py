"""Dev experiment (2026-12-07, CPU): does calibrating beyond the serving length rescue passkey
retrieval at 4096 tokens? joint r = 32 calibrated on 4096-token windows scores 80% at ~2k but
0% at ~4k (benchmarks/results/quality.md): its answers are empty, the first generated token
is <|im_end|>. Here the same method calibrated on 2 x 8192-token windows (the same 16384
tokens), 2 trials per depth at ~4096 tokens. Result (printed; recorded in
benchmarks/results/quality-dev/passkey-calib-len.md): 2 of 6 correct, the other four empty.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dev/passkey_calib_len.py
"""
import importlib.util
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("quality", BENCHMARKS / "quality.py")
q = importlib.util.module_from_spec(spec)
spec.loader.exec_module(q)
torch.set_num_threads(1)
args = q.parse_args(["--out", "/tmp/passkey-calib-len", "--only"])
sw = q.Sweep(args)
t = time.time()
thin, cfg, _ = sw.thin_model("joint", 32, "", 8192)
print("calibrated at 8192 in", round(time.time() - t), "s", flush=True)
from vllm_thinkv.eval.passkey import build_cases, run_hf  # noqa: E402
from vllm_thinkv.hf.text import read_texts  # noqa: E402

hay = read_texts(args.eval, skip_chars=args.eval_skip_chars)
cases = build_cases(sw.tok, hay, 4096, 2, seed=0, at=[0.1, 0.5, 0.9])
for r in run_hf(thin, sw.tok, cases, progress=False):
    print(r["depth"], r["correct"], repr(r["answer"][:60]), flush=True)
