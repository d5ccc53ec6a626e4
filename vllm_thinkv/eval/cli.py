"""`thinkv eval ppl MODEL --text FILES [--ctx 1024]` and
`thinkv eval passkey MODEL --haystack FILES --ctx N --trials K`.

MODEL is an original or thin-key checkpoint (loaded with `vllm_thinkv.hf.load`,
the transformers reference). Each prints a table and writes a JSON result file.
"""

from __future__ import annotations

import argparse
import logging
import time

from vllm_thinkv.errors import ThinKVError

log = logging.getLogger("vllm_thinkv.eval")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_kind", required=True, metavar="KIND")
    p = sub.add_parser("ppl", help="perplexity over non-overlapping windows of text files")
    p.add_argument("model", metavar="MODEL", help="HF checkpoint folder (original or thin-key)")
    p.add_argument("--text", nargs="+", default=[], metavar="FILE", help="text files (default: the packaged text)")
    p.add_argument("--ctx", type=int, default=1024, help="window length in tokens (default 1024)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens evaluated, spread evenly over the files (default 16384)")
    p.add_argument("--skip-chars", type=int, default=5000, help="front-matter characters skipped per file (default 5000)")
    _common(p, "thinkv_eval_ppl.json")
    k = sub.add_parser("passkey", help="passkey retrieval with the needle at depths 0.1..0.9")
    k.add_argument("model", metavar="MODEL", help="HF checkpoint folder (original or thin-key)")
    k.add_argument("--haystack", nargs="+", required=True, metavar="FILE", help="haystack text files (concatenated)")
    k.add_argument("--ctx", type=int, required=True, help="prompt length in tokens (chat template included)")
    k.add_argument("--trials", type=int, default=10, help="trials, depths evenly spread in [0.1, 0.9] (default 10); with --depths: trials per depth")
    k.add_argument("--depths", type=float, nargs="+", default=None, metavar="D", help="needle depths in [0, 1], --trials at each (e.g. 0.1 0.5 0.9)")
    k.add_argument("--seed", type=int, default=0, help="trial i uses seed + i for its key and haystack window")
    k.add_argument("--style", choices=["auto", "chat", "completion"], default="auto",
                   help="prompt: a chat message (chat template) or text ending in 'The pass key is' for a base model; "
                   "auto (default): chat if the tokenizer has a chat template")
    k.add_argument("--max-new-tokens", type=int, default=24)
    k.add_argument("--skip-chars", type=int, default=5000, help="front-matter characters skipped per file (default 5000)")
    _common(k, "thinkv_eval_passkey.json")


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=default_out, help=f"JSON result file (default ./{default_out})")
    p.add_argument("--no-progress", action="store_true")


def _load(args):
    import torch
    from transformers import AutoTokenizer

    from vllm_thinkv.hf.thin_model import load, read_config

    raw = read_config(args.model)
    model = load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    return model, AutoTokenizer.from_pretrained(args.model), raw.get("thinkv")


def _header(args, section) -> dict:
    from vllm_thinkv.results import environment

    return {
        "model": str(args.model),
        "thinkv": section,
        "arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        **environment(args.device),
    }


def _skipped(args) -> str:
    """Say that the front of each user file is skipped, and how to keep it."""
    if not getattr(args, "text", True) or not args.skip_chars:
        return ""
    return f" (skipping the first {args.skip_chars} characters of each file as front matter; --skip-chars 0 keeps them)"


def _skip_hint(args) -> str:
    return f", or --skip-chars 0 (the first {args.skip_chars} characters of each file are skipped)" if args.skip_chars else ""


def _describe(section) -> str:
    if not section:
        return "original"
    ranks = section["ranks"]
    r = str(ranks[0]) if len(set(ranks)) == 1 else f"mean {sum(ranks) / len(ranks):g}"
    return f"{section['method']} r={r}{' +ft' if section.get('finetuned') else ''}"


def run_ppl(args) -> int:
    from vllm_thinkv.eval.ppl import perplexity
    from vllm_thinkv.results import markdown_table, write_json
    from vllm_thinkv.hf.windows import windows_from_files

    if args.ctx < 2 or args.max_tokens < args.ctx:
        raise ThinKVError(f"--max-tokens ({args.max_tokens}) must hold at least one --ctx ({args.ctx}) window")
    model, tok, section = _load(args)
    try:
        windows, prov = windows_from_files(tok, args.text, args.ctx, args.max_tokens // args.ctx, args.skip_chars,
                                           what="evaluation text")
    except ThinKVError as e:
        raise ThinKVError(f"{e}. Pass a smaller --max-tokens (it asks for {args.max_tokens // args.ctx} windows of "
                          f"--ctx {args.ctx}) or --ctx{_skip_hint(args)}") from None
    print(f"evaluating {windows.shape[0]} windows x {args.ctx} tokens of {', '.join(prov['texts'])}{_skipped(args)}")
    t = time.time()
    res = perplexity(model, windows, progress=not args.no_progress)
    out = {**_header(args, section), "text": prov, **res.to_dict(), "seconds": round(time.time() - t, 1)}
    write_json(args.out, out)
    print(markdown_table(["model", "thin keys", "windows x ctx", "PPL"], [[args.model, _describe(section), f"{len(res.nll)} x {args.ctx}", res.ppl]]))
    print(f"wrote {args.out}")
    return 0


def run_passkey(args) -> int:
    from vllm_thinkv.eval.passkey import build_cases, run_hf
    from vllm_thinkv.results import markdown_table, write_json
    from vllm_thinkv.hf.text import read_texts

    model, tok, section = _load(args)
    print(f"haystack: {', '.join(args.haystack)}{_skipped(args)}")
    cases = build_cases(tok, read_texts(args.haystack, args.skip_chars), args.ctx, args.trials, args.seed, args.depths,
                        args.style)
    t = time.time()
    results = run_hf(model, tok, cases, args.max_new_tokens, progress=not args.no_progress)
    acc = sum(r["correct"] for r in results) / len(results)
    out = {**_header(args, section), "accuracy": acc, "trials": results, "seconds": round(time.time() - t, 1)}
    write_json(args.out, out)
    rows = [[r["depth"], r["prompt_tokens"], r["key"], r["answer"].strip().replace("\n", " ")[:40], "yes" if r["correct"] else "no"] for r in results]
    print(markdown_table(["depth", "prompt tokens", "key", "answer", "correct"], rows))
    print(f"{_describe(section)}: passkey accuracy {acc:.0%} ({sum(r['correct'] for r in results)}/{len(results)}); wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from vllm_thinkv.compress.cli import setup_logging

    setup_logging()
    return run_ppl(args) if args.eval_kind == "ppl" else run_passkey(args)
