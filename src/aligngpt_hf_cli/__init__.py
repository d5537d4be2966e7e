"""The `aligngpt-hf` console script's front end: parses the command line without importing `aligngpt_hf`.

`import aligngpt_hf` registers the Auto classes, which loads torch and transformers (about 3 s). This package imports
only the standard library, so `aligngpt-hf --help`, `aligngpt-hf COMMAND --help` and usage errors answer at once;
a parsed command is handed to `aligngpt_hf.cli.run`, which imports the one module that runs it. The options of every
subcommand are declared in `aligngpt_hf_cli.options`; defaults that the library also uses are read from its source.
"""

from __future__ import annotations

import argparse
import sys

from aligngpt_hf_cli.options import SUBCOMMAND_HELP, HelpFormatter, add_subcommand_arguments

__all__ = ["SUBCOMMAND_HELP", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subparser per subcommand, every option with help text and its default."""
    parser = argparse.ArgumentParser(
        prog="aligngpt-hf",
        description="AlignGPT for Hugging Face: alignment levels, training, conversion, publishing.",
        epilog="Run `aligngpt-hf COMMAND --help` for a command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMAND_HELP.items():
        subparser = subparsers.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter
        )
        add_subcommand_arguments(name, subparser)
        subparser.set_defaults(_command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, then run the subcommand through `aligngpt_hf.cli.run` (the first point that imports the library)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_early_check", None) is not None:
        args._early_check(args)  # usage errors that need no library answer before the heavy import
    from aligngpt_hf.cli import run

    return run(args)

