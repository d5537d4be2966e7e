"""The `aligngpt-hf` console script: one thin subcommand per library entry point.

Each subcommand lives in the module that implements it, which exposes two functions:
`add_cli_arguments(parser)` (declares the options) and `run_cli(args) -> int` (calls the library).
Modules are imported only when their subcommand is used, so `aligngpt-hf --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "levels": ("aligngpt_hf.levels", "score image-caption pairs with CLIP and bucket them into alignment levels"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligngpt-hf",
        description="AlignGPT for Hugging Face: alignment levels, training, conversion, publishing.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_cli_arguments(subparser)
        subparser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._module.run_cli(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
