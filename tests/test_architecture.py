"""The shape of the code: imports point down the layers, and NVFlare is used through its public API."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bottom first; a package may import only packages listed before it (and itself)
LAYERS = ["schema", "omics", "models", "jobs", "provisioning", "consortium"]
ALLOWED_BELOW = {
    "schema": set(),
    "omics": {"schema"},
    "models": {"schema"},  # omics and models are side by side: neither imports the other
    "jobs": {"schema", "omics", "models"},
    "provisioning": {"schema", "jobs"},
    "consortium": {"schema", "omics", "models", "jobs", "provisioning"},
}
# The one place a project import may sit inside a function: the CLI's command modules, so that starting
# the CLI (``--help``, ``init``, ``data check``) does not load torch, NVFlare or MLflow; a command imports
# what it runs. These imports still obey the layers (``_imports`` reads every import, nested or not).
LAZY_IMPORTS_ALLOWED = ROOT / "consortium" / "commands"
PRIVATE_NVFLARE = re.compile(r"nvflare\.private|from nvflare[\w.]* import [^\n]*\b_[a-z]|nvflare[\w.]*\._[a-z]")


def _imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in LAYERS and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", LAYERS)
def test_imports_point_down_the_layers(package):
    upward = {other: files for other, files in _imports(package).items() if other not in ALLOWED_BELOW[package]}
    assert not upward, f"{package} imports packages above or beside it: {upward}"


def test_no_import_cycles_between_packages():
    graph = {p: set(_imports(p)) for p in LAYERS}
    cycles = sorted(f"{a}<->{b}" for a in graph for b in graph[a] if a < b and a in graph[b])
    assert not cycles


def test_no_lazy_imports_of_project_packages_inside_functions():
    """A lazy import of a project package hides a cycle; imports of third-party modules may be lazy.
    Only the CLI's command modules are exempt (see ``LAZY_IMPORTS_ALLOWED``)."""
    lazy = []
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.parent == LAZY_IMPORTS_ALLOWED:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    for inner in ast.walk(node):
                        if isinstance(inner, ast.ImportFrom) and inner.module and inner.module.split(".")[0] in LAYERS:
                            lazy.append(f"{path.relative_to(ROOT)}:{inner.lineno} {inner.module}")
    assert not lazy, f"lazy imports of project packages: {lazy}"


PRIVATE_SETTING_ALLOWED = {"jobs/flare_tuning.py"}  # the private settings, version-checked; see its docstring
PRIVATE_SETTINGS = ("_RESULT_POLL_INTERVAL", "_task_check_period", "FETCH_TASK_RUN_RETRY")


def test_only_public_nvflare_api():
    """Private NVFlare names only where a version-checked setting needs them (``PRIVATE_SETTING_ALLOWED``)."""
    offenders = []
    for folder in [*LAYERS, "tests", "benchmarks"]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == Path(__file__) or str(path.relative_to(ROOT)) in PRIVATE_SETTING_ALLOWED:
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if PRIVATE_NVFLARE.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "private NVFlare names used:\n" + "\n".join(offenders)


@pytest.mark.parametrize("name", PRIVATE_SETTINGS)
def test_each_private_nvflare_setting_is_set_in_one_place_for_the_pinned_version(name):
    users = sorted(
        str(path.relative_to(ROOT))
        for folder in [*LAYERS, "benchmarks"]
        for path in (ROOT / folder).rglob("*.py")
        if name in path.read_text()
    )
    assert set(users) == PRIVATE_SETTING_ALLOWED
    from jobs.flare_tuning import PINNED_NVFLARE

    assert f"nvflare=={PINNED_NVFLARE}" in (ROOT / "setup.cfg").read_text()


def test_the_guard_finds_private_names():
    assert PRIVATE_NVFLARE.search("from nvflare.private.fed.app import x")
    assert PRIVATE_NVFLARE.search("from nvflare.recipe.spec import _peek_recipe_args")
    assert PRIVATE_NVFLARE.search("nvflare.recipe.poc_env._start_poc(")
    assert not PRIVATE_NVFLARE.search("from nvflare.recipe import ProdEnv, SimEnv")


def test_lazy_imports_in_the_cli_stay_inside_the_command_layer():
    """The exemption covers exactly the command modules, not the CLI entry point or the library it calls."""
    assert LAZY_IMPORTS_ALLOWED.is_dir() and (LAZY_IMPORTS_ALLOWED / "run.py").exists()
    assert not list(LAZY_IMPORTS_ALLOWED.glob("*/*.py")), "no sub-packages under the exempt folder"
