"""The tree's rules: the remote-code unit stands alone, and dependencies flow cli -> capabilities -> models."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "aligngpt_hf"
REMOTE_CODE_ALLOWED = {"torch", "transformers"} | set(sys.stdlib_module_names)
# capability -> the other parts of the package it may import (models and paths are allowed everywhere outside models/)
CAPABILITY_IMPORTS = {
    # conversion: load_stage1_artefact / is_stage1_artefact only; hub: the published configs a dry run plans from
    "training": {"models", "tiny", "conversion", "hub"},
    "levels": {"models", "tiny"},
    "conversion": {"models", "hub"},  # hub.checks: the repo-id, --private and loading-report checks push uses too
    "hub": {"models", "tiny"},
    "evaluation": {"models", "hub"},  # hub.checks: the config-value and NaN-weight checks push uses too
    "demo": {"models", "tiny", "training", "levels", "evaluation"},
}


def _imports(path: Path, skip_try: bool = False) -> list[tuple[int, str]]:
    """(relative level, absolute-or-relative module name) of every import in a file, nested ones included;
    `skip_try`: not those inside a `try` block (transformers' remote-code loader does not require them either)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)}
    found = []
    for node in ast.walk(tree):
        if skip_try and id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_remote_code_files_import_only_torch_transformers_stdlib_and_their_folder():
    files = sorted((PACKAGE / "models").glob("*.py"))
    assert {f.name for f in files} >= {"configuration_aligngpt.py", "modeling_aligngpt.py", "processing_aligngpt.py"}
    offenders = []
    for path in files:  # a `try`-guarded import (AlignGPTForConditionalGeneration.from_llava's) is optional
        for level, module in _imports(path, skip_try=True):
            if level == 1 and (PACKAGE / "models" / f"{module.split('.')[0]}.py").is_file():
                continue
            if level == 0 and module.split(".")[0] in REMOTE_CODE_ALLOWED:
                continue
            offenders.append(f"{path.name}: {'.' * level}{module}")
    assert not offenders, f"remote-code files may import only torch, transformers, stdlib and ./: {offenders}"


@pytest.mark.parametrize("capability", sorted(CAPABILITY_IMPORTS))
def test_capability_imports_flow_one_way(capability):
    allowed = CAPABILITY_IMPORTS[capability] | {capability, "paths"}
    offenders = []
    for path in sorted((PACKAGE / capability).glob("*.py")):
        for level, module in _imports(path):
            if level:
                offenders.append(f"{path.name}: relative import {'.' * level}{module} (use aligngpt_hf.{capability}...)")
                continue
            parts = module.split(".")
            if parts[0] == "aligngpt_hf" and len(parts) > 1 and parts[1] not in allowed:
                offenders.append(f"{path.name}: {module}")
    assert not offenders, f"{capability}/ may import only {sorted(allowed)} of the package: {offenders}"


def test_every_capability_folder_documents_what_it_owns():
    for folder in [*CAPABILITY_IMPORTS, "models"]:
        init = PACKAGE / folder / "__init__.py"
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring and len(docstring.split()) >= 20, f"{init} needs a docstring saying what it owns and imports"
        assert "import" in docstring.lower(), f"{init}'s docstring must say what the folder may import"


def test_package_root_holds_only_the_entry_points():
    top_level = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top_level == ["__init__.py", "cli.py", "paths.py", "tiny.py"], top_level


def test_paths_helper_imports_only_the_standard_library():
    """`paths.py` (atomic writes, writability) is shared by every capability, so it depends on none of them."""
    modules = [module for _, module in _imports(PACKAGE / "paths.py")]
    assert all(module.split(".")[0] in sys.stdlib_module_names | {"__future__"} for module in modules), modules


def test_files_and_functions_stay_small():
    """House style: files under ~500 lines, functions under ~80 (long ones are split, not grandfathered)."""
    too_long = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "aligngpt_hf_cli").rglob("*.py")]):
        lines = path.read_text().splitlines()
        if len(lines) > 520:
            too_long.append(f"{path.relative_to(PACKAGE.parent)}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 85:
                too_long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}(): "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


def _module_graph() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (nested imports included; `from package import module`
    counts as importing that module)."""
    modules = {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {target for target in targets if target in modules and target != name
                       and not target.endswith("__init__")}
    return graph


def test_no_import_circles_between_modules():
    """A module imports only modules that do not import it back (not even lazily inside a function): shared steps
    live in a module both sides import."""
    graph, circles = _module_graph(), []

    def visit(name, trail):
        for target in sorted(graph[name]):
            if target in trail:
                circles.append(" -> ".join([*trail[trail.index(target):], target]))
            elif target not in done:
                visit(target, [*trail, target])
        done.add(name)

    done = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert not circles, f"import circles: {sorted(set(circles))}"
