"""The console script: one table of subcommands, `--help` without importing the library, every option documented."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import aligngpt_hf_cli
from aligngpt_hf import cli
from aligngpt_hf.conversion.convert import DTYPES
from aligngpt_hf.hub.model_card import DEFAULT_LICENSE
from aligngpt_hf.levels.binning import BINNINGS, DEFAULT_TIE_TOLERANCE
from aligngpt_hf.levels.scorer import DEFAULT_SCORER

FRONT_END = Path(aligngpt_hf_cli.__file__).parent


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = aligngpt_hf_cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


def test_every_subcommand_has_a_help_line_and_a_module_that_runs_it():
    assert list(aligngpt_hf_cli.SUBCOMMAND_HELP) == list(cli.SUBCOMMANDS)
    for name, module in cli.SUBCOMMANDS.items():
        assert callable(__import__(module, fromlist=["run_cli"]).run_cli), name


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_option_has_help_text(name):
    undocumented = [action.dest for action in _subparser(name)._actions if not (action.help or "").strip()]
    assert not undocumented, f"`aligngpt-hf {name}` options without help text: {undocumented}"


def test_front_end_imports_only_the_standard_library():
    offenders = []
    for path in FRONT_END.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if node.__class__ is ast.ImportFrom and node.module == "aligngpt_hf.cli":
                continue  # main's hand-over, after parsing
            offenders += [f"{path.name}: {n}" for n in names
                          if n.split(".")[0] not in sys.stdlib_module_names | {"aligngpt_hf_cli", "__future__"}]
    assert not offenders, offenders


def test_help_and_usage_errors_never_import_the_library():
    code = (
        "import contextlib, io, json, sys, aligngpt_hf_cli\n"
        "for argv in ([], ['--help'], ['pretrain', '--help'], ['instruct', '--help'], ['levels', '--help'],\n"
        "             ['answer', '--help'], ['demo', '--help'], ['levels'], ['convert', 'only-one']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()), \\\n"
        "            contextlib.redirect_stderr(io.StringIO()):\n"
        "        aligngpt_hf_cli.main(argv)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "                        ('aligngpt_hf', 'torch', 'transformers', 'trl', 'datasets', 'numpy'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_console_script_module_prints_help():
    """`python -m aligngpt_hf_cli` is the console script without its wrapper (its speed: the import test above)."""
    result = subprocess.run([sys.executable, "-m", "aligngpt_hf_cli", "instruct", "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "instruct_tiny" in result.stdout


def test_defaults_read_from_the_library_source_equal_the_library_values():
    levels, convert, push = _subparser("levels"), _subparser("convert"), _subparser("push")
    by_dest = {action.dest: action for parser in (levels, convert) for action in parser._actions}
    assert by_dest["scorer"].default == DEFAULT_SCORER
    assert tuple(by_dest["binning"].choices) == tuple(BINNINGS)
    assert by_dest["tie_tolerance"].default == DEFAULT_TIE_TOLERANCE
    assert tuple(by_dest["dtype"].choices) == ("auto", *DTYPES)
    assert DEFAULT_LICENSE in next(a.help for a in push._actions if a.dest == "license")


def test_training_help_lists_shipped_recipes_and_every_field(capsys):
    from trl import SFTConfig

    from aligngpt_hf.training.cli import AlignGPTScriptArguments
    from aligngpt_hf.training.configs import AlignGPTInstructConfig

    with pytest.raises(SystemExit):
        cli.main(["instruct", "--help"])
    text = capsys.readouterr().out
    for expected in ("instruct_7b", "instruct_tiny", "mplug-owl-stage2", "--per_device_train_batch_size"):
        assert expected in text, expected
    assert "pretrain_7b" not in text
    words = set(text.replace(",", " ").split())
    ours = {f.name for cls in (AlignGPTScriptArguments,) for f in cls.__dataclass_fields__.values()}
    trainer_own = set(AlignGPTInstructConfig.__dataclass_fields__) - set(SFTConfig.__dataclass_fields__)
    assert ours <= words and trainer_own <= words, (ours | trainer_own) - words


def test_levels_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["levels", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8)" in text and "(default: quantile)" in text


def test_no_command_prints_the_table_and_exits_2(capsys):
    assert cli.main([]) == 2
    text = capsys.readouterr().out
    assert all(name in text for name in cli.SUBCOMMANDS)


def test_a_parsed_command_runs_through_the_library(tmp_path, capsys):
    """The front end hands a parsed command to `aligngpt_hf.cli.run` (here: a usage error the library reports)."""
    assert aligngpt_hf_cli.main(["pretrain", "no-such-recipe", "--output_dir", str(tmp_path)]) == 1
    assert "aligngpt-hf pretrain: error: No recipe 'no-such-recipe'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ errors


def _run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.mark.parametrize("argv, expected", [
    (["pretrain", "no-such-recipe"], "aligngpt-hf pretrain: error: No recipe 'no-such-recipe'"),
    (["instruct", "no-such-recipe"], "aligngpt-hf instruct: error: No recipe 'no-such-recipe'"),
    (["levels", "{tmp}/missing.json", "{tmp}/out.json", "--image-folder", "{tmp}"],
     "aligngpt-hf levels: error: input {tmp}/missing.json does not exist"),
    (["answer", "{tmp}/runs/model", "--questions", "{tmp}/q.jsonl", "--image-folder", "{tmp}", "--answers",
      "{tmp}/a.jsonl"], "aligngpt-hf answer: error: the MODEL folder {tmp}/runs/model does not exist"),
    (["answer", "./runs/model", "--questions", "{tmp}/q.jsonl", "--image-folder", "{tmp}", "--answers",
      "{tmp}/a.jsonl"], "aligngpt-hf answer: error: the MODEL folder ./runs/model does not exist"),
    (["push", "{tmp}/runs/model", "me/model", "--dry-run"],
     "aligngpt-hf push: error: the model folder {tmp}/runs/model does not exist"),
    (["convert", "./no/such/folder", "{tmp}/out"],
     "aligngpt-hf convert: error: the checkpoint folder ./no/such/folder does not exist"),
    (["inspect", "{tmp}/model", "--image", "x.png", "--prompt", "hi", "--out", "{tmp}/p.png"],
     "aligngpt-hf inspect: error: the MODEL folder {tmp}/model does not exist"),
])
def test_expected_errors_are_one_line_naming_the_path_without_traceback(argv, expected, tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "image": "x.png", "text": "hi"}\n')
    code, err = _run_cli([arg.format(tmp=tmp_path) for arg in argv], capsys)
    assert code == 1
    assert err.startswith(expected.format(tmp=tmp_path)), err
    assert "\n" not in err and "Traceback" not in err


def test_debug_shows_the_traceback_of_an_expected_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No recipe 'no-such-recipe'"):
        cli.main(["pretrain", "no-such-recipe", "--output_dir", str(tmp_path), "--debug"])


def test_unwritable_output_folder_is_named_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "pairs.json").write_text("[]")
    code, err = _run_cli(["levels", str(tmp_path / "pairs.json"), str(tmp_path / "a-file" / "out.json"),
                          "--image-folder", str(tmp_path), "--no-plot"], capsys)
    assert code == 1 and err == (f"aligngpt-hf levels: error: the output folder {tmp_path / 'a-file'} is inside "
                                 f"{tmp_path / 'a-file'}, which is a file; choose another folder")


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    module = type(sys)("broken_subcommand")
    module.run_cli = lambda args: {}["missing"]
    monkeypatch.setitem(sys.modules, "broken_subcommand", module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "demo", "broken_subcommand")
    with pytest.raises(KeyError):
        cli.run(argparse.Namespace(command="demo", debug=False))


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return ({node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names})


def test_dispatcher_and_front_end_import_each_other_one_way_only():
    """The console script's front end hands over to the dispatcher; the dispatcher uses only the front end's parser,
    which never reaches back (no import circle)."""
    assert _imported_modules(Path(cli.__file__)) & {"aligngpt_hf_cli", "aligngpt_hf_cli.parser"} == {
        "aligngpt_hf_cli.parser"}
    for name in ("parser.py", "options.py"):
        assert not {m for m in _imported_modules(FRONT_END / name) if m.startswith("aligngpt_hf")} - {
            "aligngpt_hf_cli.options"}, name
