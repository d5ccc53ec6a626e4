"""SnapKV quality in vLLM: passkey retrieval, full cache vs SnapKV vs keep-the-most-recent.

    python benchmarks/snapkv_quality.py --out benchmarks/results/snapkv-passkey \
        --haystack /work/shared/data/austen/{prideprejudice,persuasion,northangerabbey}.txt \
        --lengths 2048 4096 --depths 0.1 0.5 0.9 --trials 20 --budgets 256 512 1024 \
        [--policies snapkv recent value_aware keydiff] [--sinks N] \
        [--thin-model DIR [--calib FILES]] [--lock /tmp/thinkv-heavy.lock] [--hf]

Prompts come from `vllm_thinkv.eval.passkey` (needle, question, chat template,
scoring); trial i of a (length, depth) setting has its own seed, hence its own
key and haystack window. Every configuration is one vLLM engine (the thinkv
attention backend; SnapKV via `hf_overrides={"thinkv_snapkv": ...}`) in a fresh
process, serving all prompts in one greedy `generate` call. Configurations:

    full            thinkv, no SnapKV (the full-cache baseline)
    POLICY-B        compaction policy POLICY (`--policies`: snapkv, recent,
                    value_aware, keydiff; `snapkv.policies`), budget B (+ window);
                    POLICY-sinksN-B with `--sinks N`
    stock           vLLM's own CPU attention, no plugin backend (opt-in)
    thin-full, thin-snapkv-B   the same on a thin-key checkpoint (--thin-model)

Each configuration's result is written to `{out}-runs/{key}.json` as soon as it
finishes, stamped with the date and device it ran on; a rerun skips configurations
whose file exists for the same prompts (`vllm_thinkv.results.ResumeCache` keyed by
the prompts' fingerprint; `--overwrite` redoes them). `{out}.json/.md/.png` are
rebuilt from those files after every configuration (`--report-only` rebuilds them
without running). `--dry-run` is a tiny end-to-end run (2 prompts, 1 SnapKV engine)
for tests. The script reads parse -> configurations -> run -> report.

`--hf` runs the same configurations in the Hugging Face fp32 reference
(`vllm_thinkv.hf.snapkv`) instead of vLLM, under two protocols: question-aware
(the whole prompt is compacted, as in vLLM) and question-agnostic (the document
is compacted before the question is appended, as for a cache reused by several
questions). One prefill per case and protocol serves every policy and budget;
results go to `{out}-hf.json/.md`, saved after every case and resumed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from vllm_thinkv import results
from vllm_thinkv.bench.engine import OFFLINE_ENV, run_in_subprocess
from vllm_thinkv.results import markdown_table, write_json

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("snapkv_quality")

# --------------------------------------------------------------------------- configurations


def configurations(args, select: bool = True) -> list[dict]:
    """The engines to run: key, model role, SnapKV settings (None = full cache), backend.
    With `select`, only --configs, in the order given there (run the important ones first)."""
    snap = {"window": args.window, "kernel_size": args.kernel_size, "pooling": args.pooling}
    sinks = {"sinks": args.sinks} if args.sinks else {}
    out = [{"key": "full", "model": "base", "snapkv": None, "backend": "thinkv"}]
    for policy in args.policies:
        for b in args.budgets:
            out.append({"key": policy_key(policy, args.sinks, b), "model": "base",
                        "snapkv": {"budget": b, **snap, "policy": policy, **sinks}, "backend": "thinkv"})
    if args.stock:
        out.append({"key": "stock", "model": "base", "snapkv": None, "backend": "stock"})
    if args.thin_model:
        out.append({"key": "thin-full", "model": "thin", "snapkv": None, "backend": "thinkv"})
        for b in args.budgets:
            out.append({"key": f"thin-snapkv-{b}", "model": "thin",
                        "snapkv": {"budget": b, **snap, "policy": "snapkv"}, "backend": "thinkv"})
    if select and args.configs:
        known = {c["key"]: c for c in out}
        unknown = sorted(set(args.configs) - set(known))
        if unknown:
            raise SystemExit(f"unknown --configs {unknown} (known with these arguments: {', '.join(known)})")
        out = [known[k] for k in dict.fromkeys(args.configs)]
    return out


def policy_key(policy: str, sinks: int, budget: int) -> str:
    return f"{policy}-sinks{sinks}-{budget}" if sinks else f"{policy}-{budget}"


def engine_kwargs(args, config: dict, max_len: int) -> dict:
    kw = {
        "dtype": args.dtype,
        "enforce_eager": True,
        "max_model_len": max_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": max(args.max_num_batched_tokens, max_len) if args.no_chunking else args.max_num_batched_tokens,
        "seed": 0,
    }
    if config["backend"] == "thinkv":
        kw.update(attention_backend="thinkv", block_size=args.block_size)
        if config["snapkv"] is not None:
            kw["hf_overrides"] = {"thinkv_snapkv": config["snapkv"]}
    else:
        kw["block_size"] = max(32, -(-args.block_size // 32) * 32)  # stock CPU attention: multiples of 32
    return kw


# --------------------------------------------------------------------------- prompts


def build_prompts(args, model_dir: str) -> list[dict]:
    """One case per (length, depth, trial), each with its own seed; the dicts keep the
    case's provenance (key, depth, needle position, haystack offset, prompt length)."""
    from transformers import AutoTokenizer

    from vllm_thinkv.eval.passkey import build_case
    from vllm_thinkv.hf.text import read_texts

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(read_texts(args.haystack, args.skip_chars), add_special_tokens=False)["input_ids"]
    cases, seed = [], args.seed
    for length in args.lengths:
        for depth in args.depths:
            for trial in range(args.trials):
                case = build_case(tok, ids, length, depth, seed)
                cases.append({"length": length, "trial": trial, "seed": seed, **case.to_dict(),
                              "prompt_ids": case.prompt_ids})
                seed += 1
    return cases


def fingerprint(cases: list[dict]) -> list:
    return [[c["length"], c["depth"], c["seed"], c["key"], c["prompt_tokens"]] for c in cases]


# --------------------------------------------------------------------------- engine (child process)


def run_engine(args, model_dir: str, engine: dict, prompts: list[list[int]]) -> dict:
    """One engine in a fresh process (`vllm_thinkv.bench.engine`, mode "generate"; stops at end-of-sequence)."""
    spec = {"mode": "generate", "model": model_dir, "engine": engine, "prompts": prompts,
            "max_tokens": args.max_new_tokens, "ignore_eos": False}
    wrapper = []
    if args.lock:  # one heavy job at a time on a shared machine, and a polite one
        wrapper = ["flock", args.lock, "nice", "-n", "15", "env", f"OMP_NUM_THREADS={args.threads}"]
    env = {**os.environ, **OFFLINE_ENV, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    if args.cpu_attention:
        env["THINKV_CPU_ATTENTION"] = args.cpu_attention
    return run_in_subprocess(spec, env=env, wrapper=wrapper, cwd=ROOT, timeout=args.timeout)


# --------------------------------------------------------------------------- scoring and report


def settings(cases: list[dict]) -> list[tuple[int, float]]:
    return sorted({(c["length"], c["depth"]) for c in cases})


def summarize(run: dict) -> dict:
    """Accuracy per (length, depth), per length and overall: correct / trials."""
    rows = run["results"]

    def acc(sel):
        return {"correct": sum(r["correct"] for r in sel), "trials": len(sel)}

    by_setting = {f"{n}@{d:g}": acc([r for r in rows if r["length"] == n and r["depth"] == d])
                  for n, d in settings(rows)}
    by_length = {str(n): acc([r for r in rows if r["length"] == n]) for n in sorted({r["length"] for r in rows})}
    return {"by_setting": by_setting, "by_length": by_length, "overall": acc(rows)}


def pct(a: dict) -> float:
    return 100.0 * a["correct"] / a["trials"] if a["trials"] else float("nan")


def paired(a: dict, b: dict) -> dict:
    """Discordant pairs on identical prompts: a right & b wrong, a wrong & b right."""
    ra, rb = a["results"], b["results"]
    return {"only_" + a["config"]["key"]: sum(x["correct"] and not y["correct"] for x, y in zip(ra, rb)),
            "only_" + b["config"]["key"]: sum(y["correct"] and not x["correct"] for x, y in zip(ra, rb))}


def stamp(runs: list[dict], field: str) -> str:
    """The runs' dates (or devices), each once: the report says when and where its numbers were measured."""
    return ", ".join(sorted({str(r.get(field)) for r in runs})) or "–"


def report(args, cases: list[dict], runs: dict[str, dict], command: str) -> None:
    out = Path(args.out)
    order = [c["key"] for c in configurations(args, select=False) if c["key"] in runs]
    summaries = {k: summarize(runs[k]) for k in order}
    any_run = runs[order[0]] if order else {}
    meta = {
        "date": stamp([runs[k] for k in order], "date"),
        "device": stamp([runs[k] for k in order], "device"),
        "vllm": any_run.get("vllm"),
        "torch": any_run.get("torch"),
        "dtype": args.dtype,
        "command": command,
        "model": any_run.get("model_dir"),
        "thin_model": args.thin_model,
        "haystack": [str(p) for p in args.haystack] or ["(packaged Emma excerpt)"],
        "lengths": args.lengths, "depths": args.depths, "trials": args.trials, "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "snapkv": {"window": args.window, "kernel_size": args.kernel_size, "pooling": args.pooling},
        "engine": {k: v for k, v in any_run.get("engine", {}).items() if k != "hf_overrides"},
        "dry_run": args.dry_run,
    }
    def same_prompts(a, b):
        return a in runs and b in runs and runs[a]["fingerprint"] == runs[b]["fingerprint"]

    comparisons = {}  # vs the full cache of the same model; thin configurations also vs the original full
    for k in order:
        base = "thin-full" if k.startswith("thin-snapkv") else "full"
        if k != base and same_prompts(base, k):
            comparisons[k] = {"vs": base,
                              "delta_points": round(pct(summaries[k]["overall"]) - pct(summaries[base]["overall"]), 2),
                              **paired(runs[base], runs[k])}
        if k != "full" and same_prompts("full", k):
            comparisons.setdefault(k, {})["delta_vs_original_full"] = round(
                pct(summaries[k]["overall"]) - pct(summaries["full"]["overall"]), 2)
    commands: dict[str, list[str]] = {}  # the exact command behind each configuration's result
    for k in order:
        commands.setdefault(runs[k].get("command", "?"), []).append(k)
    hf_ref_path = Path(str(out) + "-hf-reference.json")
    hf_ref = json.loads(hf_ref_path.read_text()) if hf_ref_path.is_file() else None
    doc = {**meta, "configurations": {k: {"config": runs[k]["config"], "accuracy": summaries[k],
                                          "comparison": comparisons.get(k),
                                          "timing": runs[k]["timing"]} for k in order},
           "commands": [{"command": c, "configurations": ks} for c, ks in commands.items()],
           "report_command": command,
           "cases": [{k: v for k, v in c.items() if k != "prompt_ids"} for c in cases],
           "answers": {k: [r["answer"] for r in runs[k]["results"]] for k in order}}
    write_json(out.with_suffix(".json"), doc)

    sets = settings(cases)
    lengths = sorted({n for n, _ in sets})
    headers = ["configuration", *[f"{n} @ {d:g}" for n, d in sets], *[f"{n} all" for n in lengths], "overall",
               "Δ vs same-model full (pts)", "Δ vs original full (pts)"]
    rows = []
    for k in order:
        s = summaries[k]
        cmp_ = comparisons.get(k)
        rows.append([k, *[f"{pct(s['by_setting'][f'{n}@{d:g}']):.0f}" for n, d in sets],
                     *[f"{pct(s['by_length'][str(n)]):.1f}" for n in lengths],
                     f"{pct(s['overall']):.1f} ({s['overall']['correct']}/{s['overall']['trials']})",
                     "" if cmp_ is None or "delta_points" not in cmp_ else f"{cmp_['delta_points']:+.1f}",
                     "" if cmp_ is None or "delta_vs_original_full" not in cmp_
                     else f"{cmp_['delta_vs_original_full']:+.1f}"])
    times = [[k, runs[k]["timing"]["init_s"], runs[k]["timing"]["generate_s"]] for k in order]
    md = [
        "# SnapKV passkey retrieval (vLLM, thinkv backend)",
        "",
        f"Date {meta['date']}; device {meta['device']}; vLLM {meta['vllm']}; torch {meta['torch']}; dtype {args.dtype}; "
        f"model `{meta['model']}`" + (f"; thin-key model `{args.thin_model}`" if args.thin_model else "") + ".",
        f"Haystacks: {', '.join(Path(p).name for p in meta['haystack'])}; prompt lengths {args.lengths} tokens "
        f"(chat template included); needle depths {args.depths}; {args.trials} trials per setting "
        f"(own key and haystack window each); greedy, {args.max_new_tokens} new tokens; "
        f"SnapKV window {args.window}, kernel {args.kernel_size}, {args.pooling} pooling.",
        "",
        "Accuracy in % (correct / trials); a column `N @ d` is prompt length N, needle depth d. "
        "Δ: points vs the full cache of the same model (thin-* vs thin-full) and vs the original model's full "
        f"cache, on the same prompts. Configurations not listed were not run. thin-*: the r = {args.thin_rank} "
        "PCA thin-key checkpoint (`thinkv compress --method pca`).",
        "",
        markdown_table(headers, rows),
        "",
        "Discordant pairs vs the same model's full cache (same prompts): " + ("; ".join(
            f"{k}: {c['vs']} only {c['only_' + c['vs']]}, {k} only {c['only_' + k]}"
            for k, c in comparisons.items() if "vs" in c) or "n/a"),
        "",
        "SnapKV vs the recent-tokens baseline, overall accuracy per budget: " + ("; ".join(
            f"{b}: snapkv {pct(summaries[f'snapkv-{b}']['overall']):.1f}, recent "
            + (f"{pct(summaries[f'recent-{b}']['overall']):.1f}" if f"recent-{b}" in summaries else "not run")
            for b in args.budgets if f"snapkv-{b}" in summaries) or "n/a") + ".",
        "",
        markdown_table(["configuration", "engine start (s)", "generate (s)"], times),
        "",
        "Commands (each configuration's result comes from the command listed with it; the report was "
        "rebuilt with the last one):",
        "",
        *[f"- {', '.join(ks)}: `{c}`" for c, ks in commands.items()],
        f"- report: `{command}`",
        "",
    ]
    if hf_ref:
        md += [f"Hugging Face reference (fp32, `vllm_thinkv.hf.snapkv`, SnapKV budget {hf_ref['budget']}) on "
               "cases SnapKV-1024 missed in vLLM; `key digits kept` = (layer, KV head) pairs whose kept tokens "
               "include every digit token of at least one of the needle's two key mentions:", "",
               markdown_table(["seed", "setting", "key", "HF full cache", "HF SnapKV", "vLLM snapkv",
                               "key digits kept"],
                              [[r["seed"], f"{r['length']} @ {r['depth']:g}", r["key"], repr(r["full_answer"]),
                                repr(r["snapkv_answer"]), repr(r.get("vllm_answer")), f"{r['complete_key_heads']:.0%}"]
                               for r in hf_ref["cases"]]),
               "", f"Command: `{hf_ref['command']}`", ""]
    if args.notes and Path(args.notes).is_file():
        md += ["## Findings", "", Path(args.notes).read_text().strip(), ""]
    out.with_suffix(".md").write_text("\n".join(md))
    plot(out.with_suffix(".png"), summaries, lengths, args, meta)
    print(f"wrote {out.with_suffix('.json')}, .md, .png")


def plot(path: Path, summaries: dict, lengths: list[int], args, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(5.2 * len(lengths), 4.2), squeeze=False, sharey=True)
    styles = {"snapkv": ("C0", "o", "SnapKV"), "recent": ("C1", "s", "recent (naive)"),
              "value_aware": ("C3", "D", "value-aware"), "keydiff": ("C4", "v", "KeyDiff (query-agnostic)"),
              "merge": ("C5", "P", "merge (KVSlimmer-style)"),
              "thin-snapkv": ("C2", "^", f"thin r={args.thin_rank} + SnapKV")}
    styles.update({f"{p}-sinks{args.sinks}": (c, m, f"{label} + {args.sinks} sinks")
                   for p, (c, m, label) in list(styles.items()) if args.sinks and not p.startswith("thin")})
    lines = {"full": ("k", "-", "full cache"), "stock": ("0.5", ":", "stock vLLM"),
             "thin-full": ("C2", "--", f"thin r={args.thin_rank}, full cache")}
    for ax, n in zip(axes[0], lengths):
        for prefix, (color, marker, label) in styles.items():
            pts = sorted((int(k.rsplit("-", 1)[1]), pct(s["by_length"][str(n)])) for k, s in summaries.items()
                         if k.rsplit("-", 1)[0] == prefix)
            if pts:
                ax.plot(*zip(*pts), color=color, marker=marker, label=label)
        for key, (color, style, label) in lines.items():
            if key in summaries:
                ax.axhline(pct(summaries[key]["by_length"][str(n)]), color=color, linestyle=style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.budgets, [str(b) for b in args.budgets])
        ax.set_xlabel(f"budget (tokens kept per KV head, + window {args.window})")
        ax.set_title(f"~{n}-token prompts")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"passkey accuracy (%), {args.trials} trials x {len(args.depths)} depths")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct passkey in vLLM (thinkv backend), {meta['device']}, {args.dtype}, "
                 f"{meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- HF reference


def eos_ids(model, tok) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}


def answer_text(tok, tokens, eos: set[int]) -> str:
    """The answer up to the first end-of-sequence token, as vLLM stops there."""
    tokens = [int(t) for t in tokens]
    cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tok.decode(tokens[:cut], skip_special_tokens=True)


def split_question(tok, prompt_ids: list[int]) -> int:
    """Where the question starts: the largest k whose tail prompt_ids[k:] still contains the
    whole question (so the document part [0, k) holds none of it)."""
    from vllm_thinkv.eval.passkey import QUESTION

    question = QUESTION.strip()
    for k in range(len(prompt_ids) - 1, -1, -1):
        if question in tok.decode(prompt_ids[k:]):
            return k
    raise ValueError("the prompt does not contain the passkey question")


PROTOCOLS = ("aware", "agnostic")  # the question inside the compacted prompt, or appended after compaction


def hf_policies(args, cases: list[dict], command: str) -> None:
    """Every configuration of the base model in the HF fp32 reference, under both protocols;
    `{out}-hf.json` is rewritten after each case and finished cases are skipped on a rerun."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vllm_thinkv.hf.snapkv as ref
    from vllm_thinkv.eval.passkey import score
    from vllm_thinkv.snapkv.config import SnapKVConfig
    from vllm_thinkv.snapkv.policies import make_policy

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    eos = eos_ids(model, tok)
    configs = [c for c in configurations(args) if c["model"] == "base" and c["backend"] == "thinkv"]
    path = Path(str(args.out) + "-hf.json")
    done = json.loads(path.read_text()) if path.is_file() and not args.overwrite else {}
    fp = fingerprint(cases)
    # finished cases are kept when the same seed still makes the same prompt
    same = {c["seed"]: [c["key"], c["prompt_tokens"], c["depth"]] for c in cases}
    rows = {r["seed"]: r for r in done.get("cases", []) if same.get(r["seed"]) == [r["key"], r["prompt_tokens"],
                                                                                  r["depth"]]}
    started = time.time()
    # trial-major, so that a run stopped early covers every length and depth alike
    for i, c in enumerate(sorted(cases, key=lambda c: (c["trial"], c["length"], c["depth"]))):
        row = rows.setdefault(c["seed"], {k: v for k, v in c.items() if k != "prompt_ids"} | {"answers": {}})
        todo = {p: [cfg for cfg in configs if f"{p}/{cfg['key']}" not in row["answers"]] for p in PROTOCOLS}
        if any(todo.values()):
            # one forward pass serves both protocols: the document is a prefix of the prompt
            split = {"aware": len(c["prompt_ids"]), "agnostic": split_question(tok, c["prompt_ids"])}
            prefills = dict(zip(PROTOCOLS, ref.prefill_prefixes(model, torch.tensor([c["prompt_ids"]]), args.window,
                                                                  [split[p] for p in PROTOCOLS])))
        for protocol in PROTOCOLS:
            if not todo[protocol]:
                continue
            prefilled, question = prefills[protocol], c["prompt_ids"][split[protocol]:]
            row[f"{protocol}_compacted_tokens"] = prefilled.prompt_len
            for cfg in todo[protocol]:
                selections = None
                if cfg["snapkv"] is not None:
                    settings = SnapKVConfig.from_dict(cfg["snapkv"])
                    kept = settings.kept_len(prefilled.prompt_len)
                    if kept is None:
                        raise SystemExit(f"a {prefilled.prompt_len}-token document is not compacted with {settings}")
                    selections = ref.select(prefilled, make_policy(settings), kept - settings.window)
                tokens, _ = ref.generate(model, prefilled, selections, args.max_new_tokens, question, stop=eos)
                answer = answer_text(tok, tokens, eos)
                row["answers"][f"{protocol}/{cfg['key']}"] = {"answer": answer, "correct": score(answer, c["key"])}
        prefills = None
        write_json(path, {"date": results.today(), "device": results.device_label("cpu"), "dtype": "float32",
                          "command": command, "model": args.model, "window": args.window,
                          "kernel_size": args.kernel_size, "pooling": args.pooling, "sinks": args.sinks,
                          "lengths": args.lengths, "depths": args.depths, "trials": args.trials,
                          "max_new_tokens": args.max_new_tokens, "protocols": list(PROTOCOLS),
                          "configurations": [cfg["key"] for cfg in configs], "fingerprint": fp,
                          "cases": [rows[k] for k in sorted(rows)]})
        log.info("HF case %d/%d (seed %d, %d tokens) done, %.0f s so far", i + 1, len(cases), c["seed"],
                 c["prompt_tokens"], time.time() - started)
    hf_report(args, path)


def hf_report(args, path: Path) -> None:
    """`{out}-hf.md`: accuracy per configuration, protocol and length; Δ vs the same protocol's full cache."""
    doc = json.loads(path.read_text())
    rows_in = doc["cases"]
    lengths = sorted({r["length"] for r in rows_in})
    keys = [k for k in doc["configurations"]
            if all(f"{p}/{k}" in r["answers"] for r in rows_in for p in doc["protocols"])]

    def acc(protocol, key, length=None):
        sel = [r["answers"][f"{protocol}/{key}"]["correct"] for r in rows_in if length in (None, r["length"])]
        return 100.0 * sum(sel) / len(sel), f"{sum(sel)}/{len(sel)}"

    headers = ["configuration"]
    for p in doc["protocols"]:
        headers += [*[f"{p} {n}" for n in lengths], f"{p} all", f"{p} Δ vs full"]
    table = []
    for k in keys:
        row = [k]
        for p in doc["protocols"]:
            row += [f"{acc(p, k, n)[0]:.1f}" for n in lengths]
            a, frac = acc(p, k)
            row += [f"{a:.1f} ({frac})", "" if k == "full" else f"{a - acc(p, 'full')[0]:+.1f}"]
        table.append(row)
    md = [
        "# Compaction policies, passkey retrieval, Hugging Face fp32 reference",
        "",
        f"Date {doc['date']}; device {doc['device']}; fp32; model `{doc['model']}`; prompt lengths {doc['lengths']} "
        f"tokens; needle depths {doc['depths']}; {doc['trials']} trials per setting ({len(rows_in)} cases); greedy, "
        f"up to {doc['max_new_tokens']} new tokens; window {doc['window']}, kernel {doc['kernel_size']}, "
        f"{doc['pooling']} pooling; sinks {doc['sinks']}. Cases per (length, depth): "
        + ", ".join(f"{n} @ {d:g}: {sum(r['length'] == n and r['depth'] == d for r in rows_in)}"
                    for n, d in sorted({(r['length'], r['depth']) for r in rows_in}))
        + ("" if len(rows_in) == len(doc["lengths"]) * len(doc["depths"]) * doc["trials"]
           else f" (**partial run**: {len(rows_in)} of {len(doc['lengths']) * len(doc['depths']) * doc['trials']} "
                "cases, trial-major order)") + ".",
        "",
        "Protocols: **aware** = the whole prompt (document + question) is prefilled and compacted, as in vLLM; "
        "**agnostic** = only the document is prefilled and compacted, then the question (and the chat template's "
        "assistant header) runs through the compacted cache, as for a cache reused by several questions. "
        "Accuracy in % (correct / cases); Δ in points vs the full cache of the same protocol.",
        "",
        markdown_table(headers, table),
        "",
        f"Command: `{doc['command']}`",
        "",
    ]
    if args.notes and Path(args.notes).is_file():
        md += ["## Findings", "", Path(args.notes).read_text().strip(), ""]
    path.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {path}, {path.with_suffix('.md')}")


def hf_reference(args, cases: list[dict], command: str) -> None:
    """Evidence for misses: the HF fp32 reference SnapKV (largest budget) and the full cache on the
    cases with the given seeds, and how many (layer, KV head) pairs keep a whole key mention."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vllm_thinkv.hf.snapkv as ref
    from vllm_thinkv.eval.passkey import score
    from vllm_thinkv.snapkv.config import SnapKVConfig
    from vllm_thinkv.snapkv.policies import make_policy

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    budget = max(args.budgets)
    cfg = SnapKVConfig(budget=budget, window=args.window, kernel_size=args.kernel_size, pooling=args.pooling)
    vllm_path = Path(str(args.out) + "-runs", f"snapkv-{budget}.json")
    vllm = {r["seed"]: r["answer"] for r in json.loads(vllm_path.read_text())["results"]} if vllm_path.is_file() else {}
    eos = eos_ids(model, tok)

    def text(tokens) -> str:
        return answer_text(tok, tokens, eos)

    rows = []
    for c in [c for c in cases if c["seed"] in set(args.hf_reference)]:
        ids = torch.tensor([c["prompt_ids"]])
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)[0, ids.shape[1]:]
        prefilled = ref.prefill(model, ids, cfg.window)
        selections = ref.select(prefilled, make_policy(cfg), cfg.kept_len(ids.shape[1]) - cfg.window)
        snap, _ = ref.generate(model, prefilled, selections, args.max_new_tokens)
        full_text, snap_text = (text(t) for t in (full, snap))
        key_ids, p = tok(c["key"], add_special_tokens=False)["input_ids"], c["prompt_ids"]
        mentions = [torch.arange(i, i + len(key_ids)) for i in range(len(p)) if p[i:i + len(key_ids)] == key_ids]
        complete = [any(bool(torch.isin(m, head).all()) for m in mentions) for sel in selections for head in sel]
        rows.append({"seed": c["seed"], "length": c["length"], "depth": c["depth"], "key": c["key"],
                     "full_answer": full_text, "full_correct": score(full_text, c["key"]),
                     "snapkv_answer": snap_text, "snapkv_correct": score(snap_text, c["key"]),
                     "vllm_answer": vllm.get(c["seed"]), "key_mentions": len(mentions),
                     "complete_key_heads": sum(complete) / len(complete)})
        log.info("HF reference seed %d: %s", c["seed"], rows[-1])
    write_json(Path(str(args.out) + "-hf-reference.json"),
               {"date": results.today(), "device": results.device_label("cpu"), "dtype": "float32", "budget": budget,
                "command": command,
                "snapkv": {"window": args.window, "kernel_size": args.kernel_size, "pooling": args.pooling},
                "cases": rows})


# --------------------------------------------------------------------------- driver


def ensure_thin(args, model_dir: str) -> None:
    """Create the r=16 PCA checkpoint with `thinkv compress` when --thin-model does not exist yet."""
    if Path(args.thin_model, "config.json").is_file():
        return
    cmd = [sys.executable, "-m", "vllm_thinkv.cli", "compress", model_dir, args.thin_model, "--method", "pca",
           "--rank", str(args.thin_rank), "--no-progress"]
    if args.calib:
        cmd += ["--calib", *args.calib]
    if args.lock:
        cmd = ["flock", args.lock, "nice", "-n", "15", "env", f"OMP_NUM_THREADS={args.threads}", *cmd]
    log.info("creating the thin-key checkpoint: %s", " ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, **OFFLINE_ENV}, check=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint (default: SmolLM2-135M-Instruct, vllm_thinkv.hf.smollm2)")
    p.add_argument("--thin-model", default=None, help="thin-key checkpoint folder; created with `thinkv compress "
                   "--method pca --rank --thin-rank --calib ...` when missing; adds thin-full and thin-snapkv-B")
    p.add_argument("--thin-rank", type=int, default=16)
    p.add_argument("--calib", nargs="*", default=[], help="calibration texts for creating --thin-model")
    p.add_argument("--haystack", nargs="*", default=[], help="haystack text files (default: the packaged Emma excerpt)")
    p.add_argument("--skip-chars", type=int, default=5000, help="front-matter characters skipped per haystack file")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--trials", type=int, default=20, help="trials per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--policies", nargs="+", default=["snapkv", "recent", "value_aware", "keydiff"],
                   help="compaction policies (thinkv_snapkv `policy`), each at every budget")
    p.add_argument("--sinks", type=int, default=0, help="first prompt tokens always kept (every policy)")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--kernel-size", type=int, default=7)
    p.add_argument("--pooling", default="max", choices=["max", "avg"])
    p.add_argument("--stock", action="store_true", help="also run stock vLLM attention (full cache)")
    p.add_argument("--configs", nargs="*", default=None, help="run only these configuration keys")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--no-chunking", action="store_true", help="max-num-batched-tokens >= max-model-len")
    p.add_argument("--kv-cache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--cpu-attention", default=None, choices=["numba", "torch"],
                   help="THINKV_CPU_ATTENTION for the engines (default: the backend's; torch prefills long "
                        "prompts several times faster on CPU than numba)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per engine")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for engines run under --lock")
    p.add_argument("--lock", default=None, help="flock this file around every engine run (e.g. /tmp/thinkv-heavy.lock)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "snapkv-passkey"),
                   help="path prefix: .json .md .png, -runs/")
    p.add_argument("--overwrite", action="store_true", help="rerun configurations whose result exists")
    p.add_argument("--notes", default=None, help="markdown file appended to {out}.md as its findings")
    p.add_argument("--hf-reference", type=int, nargs="*", default=None, metavar="SEED",
                   help="instead of engines: HF fp32 reference SnapKV (largest budget) and full cache on these "
                   "cases (by seed), written to {out}-hf-reference.json")
    p.add_argument("--hf", action="store_true", help="instead of engines: every configuration of the base model "
                   "in the HF fp32 reference, question-aware and question-agnostic, to {out}-hf.json/.md")
    p.add_argument("--report-only", action="store_true", help="rebuild .json/.md/.png from -runs/ without running")
    p.add_argument("--dry-run", action="store_true",
                   help="2 prompts (256 tokens, depths 0.1/0.9), one SnapKV engine (budget 64, window 16); "
                   "with --hf: full and every policy at budget 64 in the HF reference")
    args = p.parse_args(argv)
    if args.dry_run:
        args.lengths, args.depths, args.trials, args.budgets = [256], [0.1, 0.9], 1, [64]
        args.window, args.thin_model, args.stock = 16, None, False
        args.configs = ["full", *[policy_key(p, args.sinks, 64) for p in args.policies]] if args.hf else ["snapkv-64"]
        args.kv_cache_gib, args.max_num_batched_tokens = 1, 128
    return args


def run(args, cases: list[dict], configs: list[dict], runs: dict[str, dict], cache: results.ResumeCache,
        command: str) -> bool:
    """Run each configuration that has no result for these prompts yet (all of them with
    --overwrite), store it, and rebuild the report after each; True if any ran."""
    import torch

    from vllm_thinkv.eval.passkey import score

    fp = fingerprint(cases)
    max_len = max(c["prompt_tokens"] for c in cases) + args.max_new_tokens + 16
    ran = False
    for config in configs:
        if config["key"] in runs and not args.overwrite:
            log.info("%s: result exists (%s), skipped", config["key"], cache.path(config["key"]))
            continue
        model_dir = args.thin_model if config["model"] == "thin" else args.model
        engine = engine_kwargs(args, config, max_len)
        log.info("%s: starting the engine (%s)", config["key"], json.dumps(engine))
        t0 = time.time()
        try:
            res = run_engine(args, model_dir, engine, [c["prompt_ids"] for c in cases])
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # EngineFailed is a RuntimeError
            log.error("%s failed: %s", config["key"], e)
            continue
        answers = [{**{k: v for k, v in c.items() if k != "prompt_ids"}, "answer": o["text"],
                    "correct": score(o["text"], c["key"]), "served_prompt_tokens": len(o["prompt_token_ids"])}
                   for c, o in zip(cases, res["results"])]
        run_record = {"config": config, "engine": engine, "model_dir": str(model_dir), "vllm": res["vllm_version"],
                      "torch": torch.__version__, "dtype": args.dtype, "date": results.today(),
                      "device": results.device_label("cuda" if torch.cuda.is_available() else "cpu"),
                      "run_at": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
                      "fingerprint": fp, "results": answers,
                      "timing": {"init_s": round(res["init_s"], 1), "generate_s": round(res["wall_s"], 1),
                                 "wall_s": round(time.time() - t0, 1)},
                      "num_kv_blocks": res["num_gpu_blocks"], "attention_backend": res["attention_backend"],
                      "omp_threads_bind": res.get("omp_threads_bind", "auto"),
                      "cpu_attention": args.cpu_attention or os.environ.get("THINKV_CPU_ATTENTION", "default")}
        runs[config["key"]] = cache.put(config["key"], fp, run_record)
        ran = True
        s = summarize(run_record)
        log.info("%s: %d/%d correct (%s); generate %.0f s", config["key"], s["overall"]["correct"],
                 s["overall"]["trials"], ", ".join(f"{k}: {v['correct']}/{v['trials']}" for k, v in s["by_setting"].items()),
                 res["wall_s"])
        report(args, cases, runs, command)
    return ran


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    command = "python benchmarks/snapkv_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    import vllm_thinkv  # noqa: F401  (fail early when the plugin is not installed)

    if args.model is None:
        from vllm_thinkv.hf.smollm2 import smollm2_dir

        args.model = str(smollm2_dir())
    cases = build_prompts(args, args.model)
    cache = results.ResumeCache(Path(str(args.out) + "-runs"), field="fingerprint")
    if args.hf:
        if args.report_only:
            hf_report(args, Path(str(args.out) + "-hf.json"))
        else:
            hf_policies(args, cases, command)
        return 0
    if args.hf_reference:
        hf_reference(args, cases, command)
        args.report_only = True
    configs = configurations(args)
    log.info("%d prompts x %d configurations: %s", len(cases), len(configs), ", ".join(c["key"] for c in configs))
    if args.thin_model and not args.report_only and any(c["model"] == "thin" for c in configs):
        ensure_thin(args, args.model)

    # every configuration with a result for these prompts, run now or before
    fp = fingerprint(cases)
    runs = {c["key"]: r for c in configurations(args, select=False) if (r := cache.get(c["key"], fp)) is not None}
    ran = not args.report_only and run(args, cases, configs, runs, cache, command)
    if runs and not ran:  # the report is rebuilt from the stored results
        report(args, cases, runs, command)
    missing = [c["key"] for c in configs if c["key"] not in runs] if not args.report_only else []
    if missing:
        log.error("no result for: %s", ", ".join(missing))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
