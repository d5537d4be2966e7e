"""The README and docs/*.md as a newcomer uses them: links resolve, snippets run, named code and commands exist.

Every ```python block runs (offline, in a temporary folder; the blocks of one page share a namespace, in order)
unless the line before it is `<!-- no-run: reason -->` (it needs a GPU, the Hub or real data); those still compile
and their `aligngpt_hf` imports must resolve. Relative links must reach a file or folder of the repository and, with
`#anchor`, a heading of the target page (GitHub's slugs).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
NO_RUN = re.compile(r"<!--\s*no-run:\s*(\S[^>]*?)\s*-->\s*\Z")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
MODULE_PATH = re.compile(r"\baligngpt_hf(?:\.[A-Za-z_]\w*)+")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:src|modeling_tests|hub_configs|docs|\.ci)/[\w./*-]*[\w*/])")
COMMAND = re.compile(r"(?:\baligngpt-hf|-m aligngpt_hf\.cli)\s+([a-z][\w-]*)(.*)")


def rel(path: Path, root: Path = REPO_ROOT) -> str:
    return str(path.relative_to(root))


def code_blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, code, no-run reason or None) of every fenced block."""
    blocks = []
    for match in FENCE.finditer(text):
        marker = NO_RUN.search(text[: match.start()].rstrip() + "\n")
        blocks.append((match.group(1), match.group(2), marker.group(1) if marker else None))
    return blocks


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code: where links and headings are rendered."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    found, seen = set(HTML_ANCHOR.findall(text)), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = github_slug(heading)
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(path: Path, root: Path = REPO_ROOT) -> list[str]:
    problems = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(root) or not resolved.exists():
            problems.append(f"{rel(path, root)}: link {target!r}: {file_part} does not exist in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{rel(path, root)}: link {target!r}: no heading #{anchor} in {rel(resolved, root)}")
    return problems


def resolve_dotted(dotted: str) -> bool:
    """`aligngpt_hf.a.b.name`: the longest importable module prefix, then attributes. A module that exists but needs
    an optional package (the lmms-eval plugin without lmms-eval) is checked in its source instead of imported."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        except ImportError:
            try:
                origin = importlib.util.find_spec(module).origin  # imports the parents, not the module itself
            except ImportError:  # a name inside the module that needs the package: try the shorter prefix
                continue
            return names_in_source(origin, parts[cut:])
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def names_in_source(path: str, names: list[str]) -> bool:
    """Whether `names` (a top-level name, then a name in that class) are defined in the source file at `path`."""
    body = ast.parse(Path(path).read_text(encoding="utf-8")).body
    for name in names:
        defined = {}
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined[node.name] = getattr(node, "body", [])
            for target in getattr(node, "targets", [getattr(node, "target", None)]):
                if isinstance(target, ast.Name):
                    defined[target.id] = []
        if name not in defined:
            return False
        body = defined[name]
    return True


def snippet_imports(code: str) -> list[str]:
    """Dotted names an `aligngpt_hf` snippet imports (`from aligngpt_hf.x import y` -> `aligngpt_hf.x.y`)."""
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aligngpt_hf"):
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name.startswith("aligngpt_hf")]
    return names


@pytest.mark.parametrize("path", DOC_FILES, ids=rel)
def test_relative_links_resolve(path):
    assert not broken_links(path), "\n".join(broken_links(path))


@pytest.mark.parametrize("path", DOC_FILES, ids=rel)
def test_python_snippets_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    namespace: dict = {"__name__": "__docs__"}
    ran = skipped = 0
    for number, (language, code, reason) in enumerate(code_blocks(path.read_text(encoding="utf-8")), 1):
        if language != "python":
            continue
        compiled = compile(code, f"{rel(path)} python block {number}", "exec")
        missing = [name for name in snippet_imports(code) if not resolve_dotted(name)]
        assert not missing, f"{rel(path)} python block {number} imports names that do not exist: {missing}"
        if reason is not None:
            skipped += 1
            continue
        torch.manual_seed(0)
        exec(compiled, namespace)  # noqa: S102 - the page's own snippet, run as pasted
        ran += 1
    print(f"{rel(path)}: {ran} python snippet(s) ran, {skipped} marked no-run")


@pytest.mark.parametrize("path", DOC_FILES, ids=rel)
def test_every_no_run_marker_gives_a_reason_and_precedes_a_python_block(path):
    """A mistyped or misplaced marker would silently run a snippet that needs a GPU, or skip one that should run."""
    text = path.read_text(encoding="utf-8")
    marked = sum(1 for language, _, reason in code_blocks(text) if language == "python" and reason is not None)
    assert len(re.findall(r"<!--\s*no-run", prose(text))) == marked, f"{rel(path)}: a `<!-- no-run: reason -->` marker is misplaced or empty"


def test_module_paths_and_repository_paths_exist():
    """Names like `aligngpt_hf.levels.compute` and paths like `modeling_tests/...` match the current layout."""
    problems = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for dotted in sorted(set(MODULE_PATH.findall(text))):
            if not resolve_dotted(dotted):
                problems.append(f"{rel(path)}: `{dotted}` is neither a module nor a name in one")
        for repo_path in sorted(set(REPO_PATH.findall(text))):
            if not any(REPO_ROOT.glob(repo_path.rstrip("/"))):
                problems.append(f"{rel(path)}: {repo_path} does not exist in the repository")
    assert not problems, "\n".join(problems)


def test_no_package_index_installs_and_no_citations_of_files_outside_the_repository():
    """The package is not on PyPI (`pip install aligngpt-hf[...]` fails on a clone); notes outside the repository are not cited."""
    problems = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        problems += [f"{rel(path)}: {hit!r}: install from the clone, `pip install -e \".[extra]\"`"
                     for hit in re.findall(r"pip install [^\n]*?['\"]?aligngpt-hf\b[^\n]*", text)]
        problems += [f"{rel(path)}: cites {hit}, which is not in the repository"
                     for hit in re.findall(r"(?<![\w/])(?:shared/)?spec[/][\w.-]+", text)]
    assert not problems, "\n".join(problems)


def command_lines(text: str) -> list[str]:
    """`aligngpt-hf ...` invocations in shell blocks and inline code, continuation lines joined."""
    shell = [code.replace("\\\n", " ") for language, code, _ in code_blocks(text) if language in ("bash", "sh", "")]
    inline = re.findall(r"`([^`\n]*aligngpt-hf [^`\n]*)`", FENCE.sub("", text))
    return [line for chunk in [*shell, *inline] for line in chunk.splitlines() if COMMAND.search(line)]


def subcommand_options(name: str) -> set[str] | None:
    """The option strings a subcommand accepts; pretrain/instruct take `--field` of their recipe dataclasses."""
    from aligngpt_hf.cli import SUBCOMMANDS
    from aligngpt_hf_cli.options import add_subcommand_arguments

    if name not in SUBCOMMANDS:
        return None
    parser = argparse.ArgumentParser(add_help=True)
    add_subcommand_arguments(name, parser)
    if name in ("pretrain", "instruct"):
        from aligngpt_hf.training.cli import AlignGPTScriptArguments
        from aligngpt_hf.training.trainers import AlignGPTInstructConfig, AlignGPTPretrainConfig

        config = AlignGPTPretrainConfig if name == "pretrain" else AlignGPTInstructConfig
        fields = {f"--{f.name}" for cls in (AlignGPTScriptArguments, config) for f in dataclasses.fields(cls)}
        return fields | set(parser._option_string_actions)
    return set(parser._option_string_actions)


def test_cli_commands_name_real_subcommands_options_and_recipes():
    """Every `aligngpt-hf SUBCOMMAND ... --option` in the docs exists, and named recipes are shipped."""
    recipes = {p.stem.replace("_", "-") for p in (REPO_ROOT / "src/aligngpt_hf/training/recipes").glob("*.yaml")}
    problems, options_cache = [], {}
    for path in DOC_FILES:
        for line in command_lines(path.read_text(encoding="utf-8")):
            match = COMMAND.search(line)
            name, rest = match.group(1), match.group(2)
            if name not in options_cache:
                options_cache[name] = subcommand_options(name)
            allowed = options_cache[name]
            if allowed is None:
                problems.append(f"{rel(path)}: `aligngpt-hf {name}` is not a subcommand: {line.strip()}")
                continue
            tokens = shlex.split(re.split(r"\s#\s|[;&|]", rest)[0].replace("[", " ").replace("]", " "))
            if name in ("pretrain", "instruct") and tokens and not tokens[0].startswith("-") and tokens[0] != "...":
                if tokens[0].replace("_", "-") not in recipes and not tokens[0].endswith(".yaml"):
                    problems.append(f"{rel(path)}: recipe {tokens[0]!r} is not shipped: {line.strip()}")
            for option in (t.split("=")[0] for t in tokens if t.startswith("--")):
                if option not in allowed:
                    problems.append(f"{rel(path)}: `aligngpt-hf {name}` has no option {option}: {line.strip()}")
    assert not problems, "\n".join(problems)


def test_accelerate_config_commands_print_shipped_files(capsys):
    """`$(python -m aligngpt_hf.training.cli --accelerate-config NAME)` in the docs prints a file that exists."""
    from aligngpt_hf.training.cli import main

    names = {name for path in DOC_FILES for name in
             re.findall(r"python -m aligngpt_hf\.training\.cli --accelerate-config (\w+)", path.read_text())}
    assert names, "the docs show no accelerate-config command any more: drop this test or fix the pattern"
    for name in sorted(names):
        assert main(["--accelerate-config", name]) == 0
        assert Path(capsys.readouterr().out.strip()).is_file(), name


def test_readme_quick_start_saves_a_model_that_reloads_through_remote_code(tmp_path, monkeypatch):
    """The README's first two snippets: generate, save, reload with trust_remote_code; same logits."""
    blocks = [code for language, code, reason in code_blocks((REPO_ROOT / "README.md").read_text()) if
              language == "python" and reason is None]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(blocks[0], namespace)  # noqa: S102 - the README's own snippet
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    assert (tmp_path / "tiny-aligngpt" / "modeling_aligngpt.py").is_file()
    with torch.no_grad():
        before = namespace["model"](**namespace["inputs"]).logits
        exec(blocks[1], namespace)  # noqa: S102 - reloads the saved folder into `model`
        after = namespace["model"](**namespace["inputs"]).logits
    # Same weights (the round trip is checked bit for bit elsewhere); BLAS may pick another kernel for a fresh
    # allocation, which moves the last float32 bit.
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_the_checks_catch_what_they_claim(tmp_path):
    """The link, anchor and no-run checks on a made-up page: each kind of mistake is reported."""
    page = tmp_path / "page.md"
    page.write_text(
        "# A `code` title: with punctuation!\n\n[ok](#a-code-title-with-punctuation) [bad](#nope) "
        "[missing](nothing.md) `[not a link](nothing.md)`\n\n<!-- no-run: needs a GPU -->\n```python\nx = 1\n```\n"
        "```python\ny = 2\n```\n",
        encoding="utf-8",
    )
    assert anchors(page) == {"a-code-title-with-punctuation"}
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2 and "#nope" in problems[0] and "nothing.md does not exist" in problems[1], problems
    assert [reason for _, _, reason in code_blocks(page.read_text())] == ["needs a GPU", None]
    assert github_slug("Stage-1 artefact (`mm_projector_align.bin`)") == "stage-1-artefact-mm_projector_alignbin"


def test_ci_runs_the_readmes_install_and_test_command_before_any_extra():
    """`.ci/run` checks what the README promises: its install, then its test command, with no extra package between
    (an extra installed first would hide a test that fails without it on a newcomer's `.[test]` install)."""
    quick_start = next(code for language, code, _ in code_blocks((REPO_ROOT / "README.md").read_text()) if language == "bash")
    readme = [line.split("#")[0].strip() for line in quick_start.splitlines()]
    install = next(line for line in readme if line.startswith("pip install"))
    test = next(line for line in readme if "pytest" in line)
    ci = [line.split(" #")[0].strip().replace(" --quiet", "")
          for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert test in ci, f".ci/run never runs the README's test command {test!r}"
    installs = [line for line in ci[: ci.index(test)] if "pip " in line]
    assert installs == [install], f".ci/run installs {installs} before the README's test command, not {install!r}"


def test_every_help_option_states_its_default_once():
    """`aligngpt-hf COMMAND --help` appends argparse's `(default: X)` only where the help text does not already say it."""
    from aligngpt_hf_cli import build_parser

    subparsers = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    twice = []
    for name, parser in subparsers.choices.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            text = (formatter._get_help_string(action) if action.help else "").replace("%(default)s", str(action.default))
            if text.lower().count("default") > 1:
                twice.append(f"{name} {'/'.join(action.option_strings) or action.dest}: {text}")
    assert not twice, "\n".join(twice)


def test_code_tests_and_docs_state_facts_instead_of_citing_internal_notes():
    """Readers have the repository only: no design-note sections, note files, issue or wave numbers."""
    citation = re.compile(r"spe[c]/[\w.-]|DESIG[N] §|\b[Ii]ssue [0-9]|\b[Ww]ave [0-9]")
    roots = [REPO_ROOT / name for name in ("src", "modeling_tests", "docs", "hub_configs")]
    files = [REPO_ROOT / "README.md", *(path for root in roots for path in root.rglob("*")
                                         if path.suffix in (".py", ".md", ".yaml", ".json", ".jinja"))]
    hits = [f"{rel(path)}:{number}: {line.strip()}" for path in files if "fixtures" not in path.parts
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if citation.search(line)]
    assert not hits, "\n".join(hits)
