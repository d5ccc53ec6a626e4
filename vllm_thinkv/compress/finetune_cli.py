"""`thinkv finetune CKPT OUT --calib FILES ... [--steps N --lr X --ctx T]`

Fine-tunes the q/k side of a thin-key checkpoint by distillation from the
original model (`--original`, default: the source recorded at compression)
and writes a checkpoint in the same format with `"finetuned": true`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from vllm_thinkv.errors import ThinKVError

log = logging.getLogger("vllm_thinkv.finetune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", metavar="CKPT", help="thin-key checkpoint (from `thinkv compress`)")
    parser.add_argument("out_dir", metavar="OUT", help="folder for the fine-tuned checkpoint")
    parser.add_argument("--original", help="the original checkpoint to distil from (default: the one CKPT was compressed from)")
    parser.add_argument("--calib", nargs="+", default=[], metavar="FILE", help="training text files (default: the packaged text)")
    from vllm_thinkv.compress.finetune import DEFAULT_CTX, DEFAULT_WINDOWS, OBJECTIVES, FinetuneConfig

    d = FinetuneConfig()
    parser.add_argument("--objective", default=d.objective, choices=OBJECTIVES, help="local: per-layer attention-output distillation (cheap); kl: end-to-end KL to the original's next-token distribution")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (per layer for local), one window each (default {d.steps})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam step relative to each tensor's RMS, cosine-decayed (default {d.lr:g})")
    parser.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"training window length in tokens (default {DEFAULT_CTX})")
    parser.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help=f"training windows, cycled through (default {DEFAULT_WINDOWS})")
    parser.add_argument("--bases-only", action="store_true", help="pca checkpoints: train q_basis/k_basis only (default: also q_proj/k_proj)")
    parser.add_argument("--skip-chars", type=int, default=5000, help="front-matter characters skipped per file (default 5000)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from vllm_thinkv.compress.cli import setup_logging
    from vllm_thinkv.serve.hint import serve_command

    setup_logging()
    import torch
    from transformers import AutoTokenizer

    from vllm_thinkv.compress.checkpoint import check_out_dir, write_checkpoint
    from vllm_thinkv.compress.finetune import FinetuneConfig, finetune
    from vllm_thinkv.compress.pretrained import load_original
    from vllm_thinkv.config import ThinKVConfig
    from vllm_thinkv.hf.thin_model import load, read_config
    from vllm_thinkv.hf.windows import windows_from_files

    t0 = time.time()
    cfg = FinetuneConfig(objective=args.objective, steps=args.steps, lr=args.lr, bases_only=args.bases_only)
    check_out_dir(args.out_dir, args.overwrite)
    raw = read_config(args.ckpt)
    if "thinkv" not in raw:
        raise ThinKVError(f"{args.ckpt} is not a thin-key checkpoint (no thinkv section); run `thinkv compress` first")
    section = ThinKVConfig.from_dict(raw["thinkv"])
    original = args.original or section.calibration.get("source")
    if not original or not (Path(original) / "config.json").is_file():
        raise ThinKVError(f"the original checkpoint is needed as the teacher: pass --original (got {original!r})")
    tok = AutoTokenizer.from_pretrained(args.ckpt)
    windows, prov = windows_from_files(tok, args.calib, args.ctx, args.windows, args.skip_chars, what="training text")
    student = load(args.ckpt, dtype=torch.float32, device=args.device)
    teacher = load_original(original, args.device)
    ft_log = finetune(student, teacher, windows, cfg, progress=not args.no_progress)
    calibration = dict(section.calibration)
    calibration["finetune"] = {**cfg.to_dict(), "text": prov, "before": ft_log["before"], "after": ft_log["after"]}
    student.config.thinkv = {**section.to_dict(), "finetuned": True, "calibration": calibration}
    out = write_checkpoint(student, args.ckpt, args.out_dir, overwrite=args.overwrite)
    report = {"arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "log": ft_log, "seconds": round(time.time() - t0, 1)}
    (out / "thinkv_finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}: {cfg.objective} objective {ft_log['before']:.4g} -> {ft_log['after']:.4g} in {time.time() - t0:.0f} s")
    print(f"serve it with: {serve_command()} {out}")
    return 0
