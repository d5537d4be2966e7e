"""The `aligngpt-hf` dispatcher: which module runs each subcommand, and how its expected errors reach the user.

Each module in the table exposes `run_cli(args) -> int`, which calls the library. The options are declared in the
sibling package `aligngpt_hf_cli` (standard library only), which is what the console script starts: it parses the
command line and answers `--help` before anything heavy is imported, then calls `run` here. Only the named
subcommand's module is imported, and those modules import TRL, datasets and other heavy libraries inside their
functions. `python -m aligngpt_hf.cli ...` (as `accelerate launch -m aligngpt_hf.cli ...` runs it) works the same.

Errors. The library raises `EXPECTED_ERRORS` for what a user can fix (a bad file, record, option, folder, a full
disk); `run` prints each as one line, `aligngpt-hf COMMAND: error: ...`, and exits 1. Anything else is a bug and
keeps its traceback; `--debug` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from aligngpt_hf_cli.parser import parse

# subcommand -> the module whose run_cli(args) runs it (one-line help: aligngpt_hf_cli.SUBCOMMAND_HELP)
SUBCOMMANDS: dict[str, str] = {
    "convert": "aligngpt_hf.conversion.convert",
    "from-llava": "aligngpt_hf.conversion.from_llava",
    "levels": "aligngpt_hf.levels.compute",
    "pretrain": "aligngpt_hf.training.cli",
    "instruct": "aligngpt_hf.training.cli",
    "push": "aligngpt_hf.hub.push",
    "inspect": "aligngpt_hf.evaluation.inspect_alignment",
    "answer": "aligngpt_hf.evaluation.answer",
    "demo": "aligngpt_hf.demo.pipeline",
}
# What the library raises for inputs, files and settings a user can fix. OSError covers missing, unreadable and
# unwritable files and a full disk; ImportError a missing optional extra; FloatingPointError a diverged run.
EXPECTED_ERRORS = (ValueError, TypeError, OSError, ImportError, FloatingPointError, NotImplementedError)


def error_line(command: str, error: BaseException) -> str:
    """`aligngpt-hf COMMAND: error: MESSAGE` on one line (a multi-line message is joined)."""
    message = " ".join(str(error).split()) or type(error).__name__
    return f"aligngpt-hf {command}: error: {message}"


def run(args: argparse.Namespace) -> int:
    """Run a parsed command line (from `aligngpt_hf_cli.parser`); expected errors become one line and exit code 1."""
    try:
        return int(importlib.import_module(SUBCOMMANDS[args.command]).run_cli(args) or 0)
    except EXPECTED_ERRORS as error:
        if getattr(args, "debug", False):
            raise
        print(error_line(args.command, error), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"aligngpt-hf {args.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Parse and run, as the console script does."""
    args = parse(sys.argv[1:] if argv is None else list(argv))
    return 2 if args is None else run(args)


if __name__ == "__main__":
    sys.exit(main())
