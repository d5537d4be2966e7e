"""The `aligngpt-hf` console script's front end: parses the command line without importing `aligngpt_hf`.

`import aligngpt_hf` registers the Auto classes, which loads torch and transformers (about 3 s). This package imports
only the standard library, so `aligngpt-hf --help`, `aligngpt-hf COMMAND --help` and usage errors answer at once;
a parsed command is handed to `aligngpt_hf.cli.run`, which imports the one module that runs it and turns expected
errors into one line. The options of every subcommand are declared in `aligngpt_hf_cli.options`, the parser in
`aligngpt_hf_cli.parser`; defaults that the library also uses are read from its source.
"""

from __future__ import annotations

import sys

from aligngpt_hf_cli.options import SUBCOMMAND_HELP
from aligngpt_hf_cli.parser import build_parser, parse

__all__ = ["SUBCOMMAND_HELP", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Parse, then run the subcommand through `aligngpt_hf.cli.run` (the first point that imports the library)."""
    args = parse(sys.argv[1:] if argv is None else list(argv))
    if args is None:
        return 2
    if getattr(args, "_early_check", None) is not None:
        args._early_check(args)  # usage errors that need no library answer before the heavy import
    from aligngpt_hf.cli import run

    return run(args)
