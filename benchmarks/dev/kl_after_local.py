"""Dev experiment (2026-11-23, CPU): does a short KL stage after the local fine-tune help?
Dev split: the calibration books past 300k characters. Reuses benchmarks/quality.py's cached
local fine-tune. Result (printed; kept in benchmarks/results/quality-dev/kl_after_local.json). Command:

    M=pca R=32 S=64 LR=3e-3 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dev/kl_after_local.py
"""
import importlib.util, sys, time, json, torch, os
sys.argv = ["x"]
spec = importlib.util.spec_from_file_location("quality", str(__import__("pathlib").Path(__file__).resolve().parents[1] / "quality.py"))
q = importlib.util.module_from_spec(spec); spec.loader.exec_module(q)
from vllm_thinkv.compress.finetune import FinetuneConfig, finetune
from vllm_thinkv.eval.ppl import perplexity
calib = q.CALIB  # Emma, Mansfield Park, Sense and Sensibility from ../shared/data/austen
method, rank, steps, lr, ctx = os.environ["M"], int(os.environ["R"]), int(os.environ["S"]), float(os.environ["LR"]), int(os.environ.get("CTX", 512))
args = q.parse_args(["--calib", *calib, "--eval", *calib, "--eval-skip-chars", "300000", "--eval-windows", "8",
                     "--out", "/tmp/exp/dev", "--load-ranks", "--ft-ctx", "512"])
torch.set_num_threads(2)
sw = q.Sweep(args)
orig = sw.original()
thin, cfg, log = sw.thin_model(method, rank, "ft")
base = perplexity(thin, sw.eval_windows, desc="local-ft").ppl
print(f"dev: original {orig.ppl:.3f}  {method}:{rank} local-ft {base:.3f}", flush=True)
from vllm_thinkv.hf.windows import windows_from_files
wins = sw.ft_windows if ctx == 512 else windows_from_files(sw.tok, calib, ctx, 32, what="ft")[0]
t = time.time()
kl = finetune(thin, sw.model, wins, FinetuneConfig(objective="kl", steps=steps, lr=lr))
after = perplexity(thin, sw.eval_windows, desc="local+kl").ppl
print(json.dumps({"method": method, "rank": rank, "steps": steps, "lr": lr, "orig": orig.ppl, "local": base,
                  "local+kl": after, "kl_before": kl["before"], "kl_after": kl["after"], "s": time.time() - t}), flush=True)
