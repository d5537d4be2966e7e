"""The `aligngpt-hf` console script: a table from subcommand to the module that runs it.

Each subcommand's module exposes `add_cli_arguments(parser)` (declares the options) and `run_cli(args) -> int` (calls
the library). Only the module of the subcommand being run is imported, and those modules import TRL, datasets and
other heavy libraries inside their functions, so `aligngpt-hf --help` and `aligngpt-hf SUBCOMMAND --help` cost little
more than `import aligngpt_hf` (which registers the Auto classes and so loads torch and transformers).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("aligngpt_hf.conversion.convert", "convert a released original-layout AlignGPT checkpoint to this layout"),
    "levels": ("aligngpt_hf.levels.compute", "score image-caption pairs with CLIP and bucket them into alignment levels"),
    "pretrain": ("aligngpt_hf.training.cli", "stage 1: train the projector and level table (YAML recipe)"),
    "instruct": ("aligngpt_hf.training.cli", "stage 2: instruction-tune LLM, projector and gate (YAML recipe)"),
    "push": ("aligngpt_hf.hub.push", "publish a trained or converted folder to the Hub with remote code and a card"),
    "inspect": ("aligngpt_hf.evaluation.inspect_alignment", "plot the gate's alignment weights for an image and prompts"),
    "answer": ("aligngpt_hf.evaluation.answer", "answer a LLaVA-style question JSONL into an answer JSONL (benchmarks)"),
    "demo": ("aligngpt_hf.demo.pipeline", "the whole pipeline end to end on an embedded synthetic task, offline"),
}


def _requested_subcommand(argv: list[str]) -> str | None:
    """The subcommand named on the command line: its module is the only one imported."""
    return next((token for token in argv if token in SUBCOMMANDS), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the named subcommand's options are declared (the others list their help line)."""
    parser = argparse.ArgumentParser(
        prog="aligngpt-hf",
        description="AlignGPT for Hugging Face: alignment levels, training, conversion, publishing.",
        epilog="Run `aligngpt-hf COMMAND --help` for a command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    requested = _requested_subcommand(argv) if argv is not None else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        if argv is not None and name != requested:
            continue
        module = importlib.import_module(module_name)
        if name in ("pretrain", "instruct"):
            module.add_cli_arguments(subparser, stage=name)
        else:
            module.add_cli_arguments(subparser)
        subparser.set_defaults(_module=module, _command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._module.run_cli(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
