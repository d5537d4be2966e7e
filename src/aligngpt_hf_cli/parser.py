"""The whole command line as an `argparse` parser (standard library only), shared by the console script and
`python -m aligngpt_hf.cli`."""

from __future__ import annotations

import argparse

from aligngpt_hf_cli.options import SUBCOMMAND_HELP, HelpFormatter, add_subcommand_arguments


def build_parser() -> argparse.ArgumentParser:
    """One subparser per subcommand, every option with help text and its default, plus `--debug` on each."""
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
        subparser.add_argument("--debug", action="store_true",
                               help="show the Python traceback of an error instead of the one-line message")
        subparser.set_defaults(_command=name)
    return parser


def parse(argv: list[str]) -> argparse.Namespace | None:
    """Parsed arguments, or None after printing the command table (no subcommand given)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return None
    overrides = getattr(args, "overrides", None)
    if overrides and "--debug" in overrides:  # the training commands pass what follows the recipe on as fields
        overrides.remove("--debug")
        args.debug = True
    return args
