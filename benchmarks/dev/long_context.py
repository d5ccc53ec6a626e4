"""Dev experiment (2026-11-23, CPU): does a thin model degrade at positions beyond its calibration
window? The quality sweep calibrates (and evaluates) at ctx 1024 and fine-tunes at 512, while the
passkey prompts are 2048 tokens long. Mean NLL per position bucket on 2048-token windows of a dev
split (the calibration novels from character 300000 on, disjoint from the calibration and
fine-tuning windows), for models from the sweep (cached calibration / fine-tuned tensors) and for
pca calibrated on 2048-token windows (`@2048`). Result: benchmarks/results/quality-dev/long_context.json
(updated in place, one key per model). Command:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dev/long_context.py \
        original pca:48 pca:32 pca:32:ft svd:32:ft pca:32@2048
"""
import copy, importlib.util, json, math, sys, time
from pathlib import Path

import torch

from vllm_thinkv.compress.api import compress_model
from vllm_thinkv.compress.calibrate import collect_statistics
from vllm_thinkv.config import CompressRequest
from vllm_thinkv.hf.thin_model import make_thin
from vllm_thinkv.hf.windows import windows_from_files

BENCHMARKS = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("quality", BENCHMARKS / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)

CALIB, EVAL = quality.CALIB, quality.EVAL  # three Austen novels each, from ../shared/data/austen
CTX, BUCKET, N_WINDOWS = 2048, 512, 8
torch.set_num_threads(2)

args = quality.parse_args(["--out", "/tmp/long-context-sweep", "--calib", *CALIB, "--eval", *EVAL])
sweep = quality.Sweep(args)
dev, prov = windows_from_files(sweep.tok, CALIB, CTX, N_WINDOWS, skip_chars=300000, what="dev split")


def bucket_nll(model) -> list[float]:
    """Mean next-token NLL per BUCKET-token position range over the dev windows."""
    total = torch.zeros(CTX - 1, dtype=torch.float64)
    with torch.no_grad():
        for w in dev:
            logits = model(w[None]).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, w[1:], reduction="none")
    per_pos = total / len(dev)
    return [float(per_pos[i:i + BUCKET].mean()) for i in range(0, CTX - 1, BUCKET)]


def build(key: str):
    if key == "original":
        return sweep.model
    if "@" in key:  # training-free, calibrated on windows of another length
        k, calib_ctx = key.split("@")
        method, rank = k.split(":")[0], int(k.split(":")[1])
        wins, _ = windows_from_files(sweep.tok, CALIB, int(calib_ctx), args.calib_tokens // int(calib_ctx), what="calib")
        stats = collect_statistics(sweep.model, wins, progress=False)
        cfg, tensors = compress_model(sweep.model, CompressRequest(method, rank=rank), stats=stats, progress=False)
        return make_thin(copy.deepcopy(sweep.model), cfg, tensors)
    method, rank, variant = quality.parse_key(key)
    return sweep.thin_model(method, rank, variant)[0]


out_path = BENCHMARKS / "results" / "quality-dev" / "long_context.json"
res = json.loads(out_path.read_text()) if out_path.is_file() else {}
res.setdefault("setup", {"ctx": CTX, "bucket": BUCKET, "windows": N_WINDOWS, "dev": prov,
                         "note": "sweep models: calibration ctx 1024, fine-tuning ctx 512"})
for key in sys.argv[1:]:
    t = time.time()
    nll = bucket_nll(build(key).eval())
    res[key] = {"bucket_nll": nll, "bucket_ppl": [math.exp(x) for x in nll], "seconds": round(time.time() - t, 1)}
    print(key, " ".join(f"{math.exp(x):8.2f}" for x in nll), flush=True)
    out_path.write_text(json.dumps(res, indent=1))
