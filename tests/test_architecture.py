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
# a dotted path into nvflare.private or to a private name, in a string (import_module, monkeypatch.setattr)
PRIVATE_NVFLARE_PATH = re.compile(r"\bnvflare(?:\.\w+)*\.(?:private\b|_(?!_))")


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
# the adapter, and its test: that reads back what the adapter sets, and that stock NVFlare still needs it
PRIVATE_NVFLARE_ALLOWED = PRIVATE_SETTING_ALLOWED | {"tests/jobs/test_flare_tuning.py"}


def private_nvflare_uses(source: str) -> list[str]:
    """Where ``source`` uses a private NVFlare name, as ``"LINE: NAME"``:

    - an import of ``nvflare.private`` or of a private module, or of a private name
      (``from nvflare.x import _NAME``, on any line of a parenthesised import);
    - a private attribute of anything the code got from NVFlare: the package, a module or class it imported
      (under any alias), what calling one returned, a parameter annotated with one (``nvflare.x._NAME``,
      ``module._NAME``, ``Class()._NAME``, ``made = Class(); made._NAME``);
    - the same by name: ``getattr``/``setattr``/``hasattr`` or ``monkeypatch.setattr`` on such an object with
      a private name (``setattr(module, "_NAME", value)``);
    - a dotted path to a private name or into ``nvflare.private`` in a string (``import_module``).
    """
    tree = ast.parse(source)
    from_nvflare = _names_from_nvflare(tree)
    found = sorted(
        (lineno, name) for node in ast.walk(tree) for lineno, name in _private_nvflare_names(node, from_nvflare)
    )
    return [f"{lineno}: {name}" for lineno, name in found]


def _is_nvflare(module: str | None) -> bool:
    return module is not None and (module == "nvflare" or module.startswith("nvflare."))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")  # nvflare.__version__ is public


def _is_private_module(module: str) -> bool:
    parts = module.split(".")
    return parts[1:2] == ["private"] or any(_is_private(part) for part in parts)


def _root_name(node: ast.AST) -> str | None:
    """``a`` of ``a.b.c``, ``a(...).b``, ``a[0].b``."""
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _names_from_nvflare(tree: ast.AST) -> set[str]:
    """The names the module binds to something from NVFlare, wherever in the module (a guard errs wide)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.asname or a.name.split(".")[0] for a in node.names if _is_nvflare(a.name))
        elif isinstance(node, ast.ImportFrom) and not node.level and _is_nvflare(node.module):
            names.update(a.asname or a.name for a in node.names)
    while True:  # what was made from those, until nothing new is found
        more = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and _root_name(node.value) in names:
                more.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.arg) and node.annotation is not None and _root_name(node.annotation) in names:
                more.add(node.arg)
        if more <= names:
            return names
        names |= more


def _private_nvflare_names(node: ast.AST, from_nvflare: set[str]) -> list[tuple[int, str]]:
    if isinstance(node, ast.Import):
        return [(a.lineno, a.name) for a in node.names if _is_nvflare(a.name) and _is_private_module(a.name)]
    if isinstance(node, ast.ImportFrom) and not node.level and _is_nvflare(node.module):
        if _is_private_module(node.module):
            return [(node.lineno, node.module)]
        return [(a.lineno, a.name) for a in node.names if _is_private(a.name)]
    if isinstance(node, ast.Attribute) and _is_private(node.attr) and _root_name(node.value) in from_nvflare:
        return [(node.lineno, node.attr)]
    if (
        isinstance(node, ast.Call)
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and _is_private(node.args[1].value)
        and _root_name(node.args[0]) in from_nvflare
    ):
        return [(node.lineno, node.args[1].value)]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and PRIVATE_NVFLARE_PATH.search(node.value):
        return [(node.lineno, node.value)]
    return []


def test_only_public_nvflare_api():
    """Private NVFlare names only where a version-checked setting needs them (``PRIVATE_NVFLARE_ALLOWED``)."""
    offenders = []
    for folder in [*LAYERS, "tests", "benchmarks"]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == Path(__file__) or str(path.relative_to(ROOT)) in PRIVATE_NVFLARE_ALLOWED:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{use}" for use in private_nvflare_uses(path.read_text())]
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


BACKEND = "from nvflare.app_common.executors.client_api import in_process_backend\n"
COMMUNICATOR = "from nvflare.apis.impl.wf_comm_server import WFCommServer\n"


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from nvflare.private.fed.app import simulator", "1: nvflare.private.fed.app"),
        ("import nvflare.private.fed.app.simulator.simulator_worker as worker", "1: nvflare.private."),
        ("from nvflare.recipe._internal import helper", "1: nvflare.recipe._internal"),
        ("from nvflare.recipe.spec import _peek_recipe_args", "1: _peek_recipe_args"),
        ("from nvflare.recipe.spec import (\n    Recipe,\n    _peek_recipe_args,\n)", "3: _peek_recipe_args"),
        ("import nvflare.recipe.poc_env\nnvflare.recipe.poc_env._start_poc()", "2: _start_poc"),
        (BACKEND + "in_process_backend._RESULT_POLL_INTERVAL = 0.02", "2: _RESULT_POLL_INTERVAL"),
        ("import nvflare.apis.impl.wf_comm_server as wcs\nprint(wcs._DEFAULT)", "2: _DEFAULT"),
        (COMMUNICATOR + "print(WFCommServer._task_check_period)", "2: _task_check_period"),
        (COMMUNICATOR + "WFCommServer()._task_check_period = 0.05", "2: _task_check_period"),
        (COMMUNICATOR + "made = WFCommServer()\nmade._task_check_period = 0.05", "3: _task_check_period"),
        (COMMUNICATOR + "def pace(c: WFCommServer):\n    c._task_check_period = 0.05", "3: _task_check_period"),
        (BACKEND + "setattr(in_process_backend, '_RESULT_POLL_INTERVAL', 0.02)", "2: _RESULT_POLL_INTERVAL"),
        (BACKEND + "monkeypatch.setattr(in_process_backend, '_RESULT_POLL_INTERVAL', 0.5)", "2: _RESULT_POLL_INTER"),
        ("importlib.import_module('nvflare.private.fed.app.simulator.simulator_worker')", "1: nvflare.private."),
        ("monkeypatch.setattr('nvflare.app_common.x.backend._INTERVAL', 0.5)", "1: nvflare.app_common.x.backend._"),
    ],
    ids=[
        "private package",
        "private package, imported as",
        "private module",
        "private name imported",
        "private name in a parenthesised import",
        "attribute through the package",
        "attribute of an imported module",
        "attribute of a module alias",
        "attribute of an imported class",
        "attribute of an object made by a call",
        "attribute of an object kept in a name",
        "attribute of an annotated parameter",
        "setattr by name",
        "monkeypatch.setattr by name",
        "dotted path in a string",
        "dotted path to a private name in a string",
    ],
)
def test_the_guard_finds_each_form_of_private_use(source, found):
    uses = private_nvflare_uses(source)
    assert len(uses) == 1 and uses[0].startswith(found), uses


def test_the_guard_leaves_public_use_and_our_own_private_names_alone():
    source = """
import nvflare
from nvflare.apis.fl_component import FLComponent
from nvflare.recipe import ProdEnv, SimEnv

assert nvflare.__version__


class Pacing(FLComponent):
    def __init__(self, tries: int) -> None:
        super().__init__()
        self._tries = tries  # a private attribute of our own class


_made = SimEnv(clients=["a"])
settings = {"_private": 1}
print(settings["_private"], getattr(ProdEnv, "startup_kit_location", None))
"""
    assert private_nvflare_uses(source) == []


def test_lazy_imports_in_the_cli_stay_inside_the_command_layer():
    """The exemption covers exactly the command modules, not the CLI entry point or the library it calls."""
    assert LAZY_IMPORTS_ALLOWED.is_dir() and (LAZY_IMPORTS_ALLOWED / "run.py").exists()
    assert not list(LAZY_IMPORTS_ALLOWED.glob("*/*.py")), "no sub-packages under the exempt folder"


MAX_LINES = 400
MAX_PARAMETERS = 8
# being split by its own owner; the limits hold for every other module
SIZE_EXEMPT = {"consortium/commands/provisioning.py"}


def _consortium_modules() -> list[Path]:
    return [p for p in sorted((ROOT / "consortium").rglob("*.py")) if str(p.relative_to(ROOT)) not in SIZE_EXEMPT]


def test_consortium_modules_stay_under_400_lines():
    long = {
        str(p.relative_to(ROOT)): n for p in _consortium_modules() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_consortium_function_takes_more_than_8_parameters_or_a_bundle():
    """Run state travels in named objects (the run plan, a job's context), not in long signatures or ``**``
    bundles; a ``**`` parameter is allowed only where it forwards to a call that is not ours (a process's
    ``kwargs``)."""
    found = []
    for path in _consortium_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or _cli_command(node):
                continue
            arguments = node.args
            named = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
            count = len([a for a in named if a.arg not in ("self", "cls")]) + bool(arguments.vararg)
            where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
            if count > MAX_PARAMETERS:
                found.append(f"{where} takes {count} parameters")
            if arguments.kwarg is not None and (path.name, node.name) not in BUNDLES_ALLOWED:
                found.append(f"{where} takes **{arguments.kwarg.arg}")
    assert not found, "\n".join(found)


def _cli_command(node: ast.FunctionDef) -> bool:
    """A typer command declares its command-line options as parameters (it turns them into a run plan)."""
    return any(
        isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
        for d in node.decorator_list
    )


# ``**`` parameters that are not run state: a call forwarded to another process, an audit entry's own
# fields, rich's print options, the extra fields of a JSON answer
BUNDLES_ALLOWED = {
    ("aside.py", "__init__"),
    ("aside.py", "_call"),
    ("signing.py", "append"),
    ("signed_log.py", "record"),
    ("console.py", "print"),
    ("run_summary.py", "say"),
    ("run.py", "result_json"),
}
