"""Dev experiment (2026-11-23, CPU): calibrate pca on chat-wrapped windows (each novel excerpt as a
user message with a question, SmolLM2's chat template) vs plain novel windows; passkey + PPL on
a dev split. Result (printed; kept in benchmarks/results/quality-dev/chat_calibration.json). Command:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dev/chat_calibration.py 32
"""
import copy, json, sys, time, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm_thinkv.hf.smollm2 import smollm2_dir
from vllm_thinkv.hf.windows import windows_from_files
from vllm_thinkv.hf.text import read_texts
from vllm_thinkv.compress.calibrate import collect_statistics
from vllm_thinkv.compress.api import compress_model
from vllm_thinkv.config import CompressRequest
from vllm_thinkv.hf.thin_model import make_thin
from vllm_thinkv.eval.ppl import perplexity
from vllm_thinkv.eval.passkey import build_cases, run_hf, chat_prompt_ids
torch.set_num_threads(2)
A = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "austen"  # ../shared next to the checkout
calib = [f"{A}/{b}.txt" for b in ("emma", "mansfieldpark", "sensesensibility")]
rank = int(sys.argv[1]); ctx = 1024
d = str(smollm2_dir()); tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
plain, _ = windows_from_files(tok, calib, ctx, 16, what="calib")
Q = "\n\nWhat is this passage about?"
over = len(chat_prompt_ids(tok, Q))
chat = []
for w in plain:
    body = tok.decode(w[: ctx - over - 8].tolist())
    ids = chat_prompt_ids(tok, body + Q)[:ctx]
    ids = ids + w[len(ids) - ctx:].tolist() if len(ids) < ctx else ids  # pad (rare) with text
    chat.append(ids[:ctx])
chat = torch.tensor(chat)
dev, _ = windows_from_files(tok, calib, ctx, 8, skip_chars=300000, what="dev")
cases = build_cases(tok, read_texts(calib, skip_chars=300000), 2048, 5, seed=100, at=[0.1, 0.5, 0.9])
res = {}
for name, wins in (("plain", plain), ("chat", chat), ("mix", torch.cat([plain[:8], chat[8:]]))):
    t = time.time()
    stats = collect_statistics(model, wins, progress=False)
    cfg, tensors = compress_model(model, CompressRequest("pca", rank=rank), stats=stats, progress=False)
    thin = make_thin(copy.deepcopy(model), cfg, tensors)
    ppl = perplexity(thin, dev, progress=False).ppl
    trials = run_hf(thin, tok, cases, progress=False)
    acc = sum(x["correct"] for x in trials) / len(trials)
    res[name] = {"ppl": ppl, "passkey": acc, "answers": [x["answer"][:30] for x in trials[:4]], "s": time.time() - t}
    print(name, json.dumps(res[name]), flush=True)
