"""The console script: one table of subcommands, fast `--help`, every option documented."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from aligngpt_hf import cli

HEAVY_MODULES = ("trl", "datasets", "peft", "matplotlib", "lmms_eval", "deepspeed")


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser([name])
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_option_has_help_text(name):
    undocumented = [action.dest for action in _subparser(name)._actions if not (action.help or "").strip()]
    assert not undocumented, f"`aligngpt-hf {name}` options without help text: {undocumented}"


def test_help_imports_only_the_named_subcommand_and_nothing_heavy():
    code = (
        "import sys, contextlib, io\n"
        "from aligngpt_hf import cli\n"
        "for argv in ([], ['pretrain'], ['levels'], ['answer'], ['demo']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        cli.main([*argv, '--help'])\n"
        f"print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('aligngpt_hf.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True)
    heavy, package_modules = (json.loads(line) for line in out.stdout.splitlines()[-2:])
    assert heavy == [], f"--help imported {heavy}; import them inside the functions that need them"
    assert "aligngpt_hf.conversion.convert" not in package_modules  # not named: not imported
    assert "aligngpt_hf.training.trainers" not in package_modules


def test_training_help_lists_shipped_recipes_and_fields(capsys):
    with pytest.raises(SystemExit):
        cli.main(["instruct", "--help"])
    text = capsys.readouterr().out
    for expected in ("instruct_7b", "instruct_tiny", "mplug-owl-stage2", "data_path", "use_lora",
                     "allow_untrained_alignment", "activation_checkpointing", "--per_device_train_batch_size"):
        assert expected in text, expected
    assert "pretrain_7b" not in text


def test_levels_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["levels", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8)" in text and "(default: quantile)" in text


def test_no_command_prints_the_table_and_exits_2(capsys):
    assert cli.main([]) == 2
    text = capsys.readouterr().out
    assert all(name in text for name in cli.SUBCOMMANDS)
