"""The `>>>` examples in the package's docstrings run and print what they show (transformers' fenced style: the
closing ``` ends an example's expected output, so the fences are dropped before doctest parses the docstring)."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "src"
MODULES = sorted(
    ".".join(path.relative_to(SOURCE).with_suffix("").parts)
    for path in (SOURCE / "aligngpt_hf").rglob("*.py") if ">>>" in path.read_text(encoding="utf-8"))
FENCE = re.compile(r"^\s*```\w*\s*$", re.MULTILINE)
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


class FencedDocTestParser(doctest.DocTestParser):
    def parse(self, string, name="<string>"):
        return super().parse(FENCE.sub("", string), name)


def test_the_example_modules_are_found():
    assert {"aligngpt_hf.models.configuration_aligngpt", "aligngpt_hf.training.trainers"} <= set(MODULES)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write (output_dir="/tmp/...") stay out of the checkout
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(parser=FencedDocTestParser())
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    tests = [test for test in finder.find(module, module_name) if test.examples]
    assert tests, f"{module_name} has `>>>` lines but no example doctest finds"
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples in {module_name} failed (see above)"
