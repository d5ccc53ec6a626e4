"""`thinkv analyze MODEL --text FILES --out DIR`: the measurements behind choosing a thin-key rank."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from vllm_thinkv.analyze.config import SUPPORTED_MODEL_TYPES, AnalyzeConfig
from vllm_thinkv.errors import ThinKVError

log = logging.getLogger(__name__)

DESCRIPTION = f"""\
Measure, per layer and KV head, why a model's keys are compressible:
singular-value spectra and effective ranks (90/95/99% energy) of the k/v/q
projection weights and of the keys (pre- and post-RoPE), values and queries;
the rank r at which each thin-key method (pairs, pca, svd) reproduces the
attention logits to a relative error (default 1/5/10/20%) on held-out text; cosine
similarity of adjacent tokens' keys vs values; and how well each head's keys
and values are predicted from 1..5 peer heads of its layer (held-out R^2).

The text is cut into --ctx windows spread evenly over the files; the first
half fits (least squares, thin-key methods), the second half scores.
Writes analysis.json (every number), summary.md and PNG plots into --out.
Model types: {", ".join(SUPPORTED_MODEL_TYPES)}.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    d = AnalyzeConfig()
    p.add_argument("model", metavar="MODEL", help="HF checkpoint folder (Llama, Mistral, Qwen2, Qwen3, Gemma 3)")
    p.add_argument("--text", nargs="+", default=[], metavar="FILE",
                   help="calibration text files (default: the public-domain text shipped in the package)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; its result files are replaced)")
    p.add_argument("--ctx", type=int, default=d.ctx, help=f"window length in tokens (default {d.ctx})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help=f"tokens analysed, spread evenly over the files (default {d.max_tokens})")
    p.add_argument("--skip-chars", type=int, default=d.skip_chars,
                   help=f"front-matter characters skipped per file (default {d.skip_chars})")
    p.add_argument("--max-refs", type=int, default=d.max_refs, metavar="K",
                   help=f"most peer heads used to predict a head (default {d.max_refs}; at most heads - 1)")
    p.add_argument("--logit-errors", type=float, nargs="+", default=list(d.logit_errors), metavar="E",
                   help="relative logit errors to find the thin-key rank for (default "
                   f"{' '.join(f'{e:g}' for e in d.logit_errors)})")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype (default float32)")


def command_line(args: argparse.Namespace, device: str) -> str:
    """The exact, fully explicit command that reproduces this run."""
    argv = ["thinkv", "analyze", args.model]
    if args.text:
        argv += ["--text", *args.text]
    argv += ["--out", args.out, "--ctx", str(args.ctx), "--max-tokens", str(args.max_tokens)]
    argv += ["--skip-chars", str(args.skip_chars), "--max-refs", str(args.max_refs)]
    argv += ["--logit-errors", *(f"{e:g}" for e in args.logit_errors)]
    argv += ["--device", device, "--dtype", args.dtype]
    return shlex.join(argv)


def run(args: argparse.Namespace) -> int:
    import torch

    from vllm_thinkv.analyze import plots, report
    from vllm_thinkv.analyze.run import analyze
    from vllm_thinkv.results import write_json

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ThinKVError(f"--out {out} exists and is not a folder")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = AnalyzeConfig(
        ctx=args.ctx, max_tokens=args.max_tokens, skip_chars=args.skip_chars, max_refs=args.max_refs,
        logit_errors=tuple(args.logit_errors), device=device, dtype=args.dtype,
    )
    result = analyze(args.model, args.text, cfg)
    result = {"meta": report.provenance(command_line(args, device), device), "definitions": report.DEFINITIONS, **result}
    result["headline"] = report.headline(result)
    out.mkdir(parents=True, exist_ok=True)
    # every number to 6 significant digits, each list on one line: readable, diffable, small
    write_json(out / "analysis.json", result, indent=1, digits=6, inline_lists=True)
    names = plots.write_plots(result, out)
    (out / "summary.md").write_text(report.summary_markdown(result, names), encoding="utf-8")
    log.info("wrote %s: analysis.json, summary.md, %s", out, ", ".join(names))
    return 0
