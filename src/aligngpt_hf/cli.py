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
    "convert": ("aligngpt_hf.conversion.convert", "convert a released original-layout AlignGPT checkpoint to this layout"),
    "levels": ("aligngpt_hf.levels.compute", "score image-caption pairs with CLIP and bucket them into alignment levels"),
    "pretrain": ("aligngpt_hf.training.cli", "stage 1: train the projector and level table (YAML recipe)"),
    "instruct": ("aligngpt_hf.training.cli", "stage 2: instruction-tune LLM, projector and gate (YAML recipe)"),
    "push": ("aligngpt_hf.hub.push", "publish a trained or converted folder to the Hub with remote code and a card"),
    "inspect": ("aligngpt_hf.evaluation.inspect_alignment", "plot the gate's alignment weights for an image and prompts"),
    "answer": ("aligngpt_hf.evaluation.answer", "answer a LLaVA-style question JSONL into an answer JSONL (benchmarks)"),
    "demo": ("aligngpt_hf.demo.pipeline", "the whole pipeline end to end on an embedded synthetic task, offline"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligngpt-hf",
        description="AlignGPT for Hugging Face: alignment levels, training, conversion, publishing.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # subcommand not shipped in this build
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name in ("pretrain", "instruct"):
            module.add_cli_arguments(subparser, stage=name)
        else:
            module.add_cli_arguments(subparser)
        subparser.set_defaults(_module=module, _command=name)
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
