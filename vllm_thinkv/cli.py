"""`thinkv` command line: one subcommand per module, imported lazily so that
`thinkv --help` stays fast and a missing optional dependency only affects its
own subcommand.

Each subcommand module provides `add_arguments(parser)` and `run(args) -> int`.
`thinkv serve` is different: it hands its arguments to vLLM's own server CLI.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vllm_thinkv.errors import ThinKVError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("vllm_thinkv.serve.cli", "run vLLM's OpenAI-compatible server with the thinkv backend"),
    "compress": ("vllm_thinkv.compress.cli", "turn an HF checkpoint into a thin-key checkpoint"),
    "finetune": ("vllm_thinkv.compress.finetune_cli", "fine-tune the q/k side of a thin-key checkpoint"),
    "eval": ("vllm_thinkv.eval.cli", "perplexity and passkey retrieval of a (thin-key) checkpoint"),
    "analyze": ("vllm_thinkv.analyze.cli", "measure why a model's keys are compressible (spectra, ranks, R^2)"),
    "capacity": ("vllm_thinkv.capacity.cli", "KV-cache capacity model from an HF config (no weights)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":  # vLLM parses these itself
        return importlib.import_module(COMMANDS["serve"][0]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="thinkv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if name == "serve":
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        if not argv or argv[0] != name:
            sub.add_parser(name, help=help_text)  # not selected: don't import it
            continue
        sp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sp)
        sp.set_defaults(_module=module)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ThinKVError as e:
        print(f"thinkv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
