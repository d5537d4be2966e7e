"""The `aligngpt-hf` console script: a table from subcommand to the module that runs it.

Each module in the table exposes `run_cli(args) -> int`, which calls the library. The options are declared in the
sibling package `aligngpt_hf_cli` (standard library only), which is what the console script starts: it parses the
command line and answers `--help` before anything heavy is imported, then calls `run` here. Only the named
subcommand's module is imported, and those modules import TRL, datasets and other heavy libraries inside their
functions. `python -m aligngpt_hf.cli ...` (as `accelerate launch -m aligngpt_hf.cli ...` runs it) works the same.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import aligngpt_hf_cli

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


def run(args: argparse.Namespace) -> int:
    """Run a parsed command line (from `aligngpt_hf_cli.build_parser`)."""
    return int(importlib.import_module(SUBCOMMANDS[args.command]).run_cli(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Parse and run, as the console script does."""
    return aligngpt_hf_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
