"""The package's shape: the public API, the layers, and the naming rules (README, "Layout").

The layer contract itself is checked by ``lint-imports`` (``pyproject.toml``); these tests add
what it does not: no import cycles, no private names across modules, one public API.
"""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import grimp
import pytest

import pyro_backpass

ROOT = Path(pyro_backpass.__file__).parent
REPO = ROOT.parent


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name → file."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` of every import in a file, made absolute."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            found.append((base, [a.name for a in node.names], node.lineno))
    return found


def test_public_api_is_sorted_complete_and_importable():
    names = pyro_backpass.__all__
    assert names == sorted(names)
    for name in names:
        assert getattr(pyro_backpass, name) is not None, name
    # Complete: every public object bound in the root (not a subpackage) is listed.
    bound = {
        n
        for n, v in vars(pyro_backpass).items()
        if not n.startswith("_") and not isinstance(v, type(pyro_backpass))
    }
    assert bound == set(names), f"in the root but not in __all__: {bound - set(names)}"


def test_every_subpackage_all_is_importable_and_sorted():
    for module in _modules():
        mod = importlib.import_module(module)
        names = getattr(mod, "__all__", None)
        if names is None:
            continue
        missing = [n for n in names if not hasattr(mod, n)]
        assert not missing, f"{module}.__all__ names {missing}, which it does not define"
        assert list(names) == sorted(names), f"{module}.__all__ is not sorted"


def test_no_import_cycles():
    graph = grimp.build_graph("pyro_backpass")
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in modules:
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@pytest.mark.parametrize("where", ["pyro_backpass", "tests", "benchmarks"])
def test_no_private_names_imported_across_modules(where):
    files = (
        _modules().items()
        if where == "pyro_backpass"
        else [(p.stem, p) for p in sorted((REPO / where).rglob("*.py"))]
    )
    bad = []
    for module, path in files:
        for target, names, line in _imports(path, module):
            if not target.startswith("pyro_backpass"):
                continue
            private = [p for p in target.split(".") if _is_private(p)]
            private += [n for n in names if _is_private(n)]
            if private:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {private} from {target}")
    assert not bad, "\n".join(bad)


def test_library_modules_do_not_import_the_root_package():
    """The root re-exports everything; a module importing it would import the whole package."""
    bad = []
    for module, path in _modules().items():
        if module == "pyro_backpass":
            continue
        for target, _, line in _imports(path, module):
            if target == "pyro_backpass":
                bad.append(f"{path.relative_to(REPO)}:{line}")
    assert not bad, bad


def test_argparse_and_device_choice_live_in_cli_only():
    for module, path in _modules().items():
        if module.startswith("pyro_backpass.cli"):
            continue
        targets = {t for t, _, _ in _imports(path, module)}
        assert "argparse" not in targets, f"{module} imports argparse"
        assert "def resolve_device" not in path.read_text(), module


def test_no_module_shares_its_name_with_a_function_or_class():
    modules = _modules()
    module_names = {m.rpartition(".")[2] for m in modules}
    clashes = []
    for module, path in modules.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in module_names:
                clashes.append(f"{module}.{node.name}")
    assert not clashes, clashes


def test_notebooks_and_readme_import_from_the_root_only():
    sources = [(REPO / "README.md").read_text()]
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        sources += ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    for text in sources:
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith(("from pyro_backpass.", "import pyro_backpass.")):
                pytest.fail(f"imports below the root: {stripped!r}")


def test_benchmarks_import_public_names_only():
    """Benchmarks use the root, a subpackage's ``__init__`` or a shared leaf (``files``...),
    never a module inside a subpackage."""
    modules = _modules()
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    packages |= {m for m in modules if m.count(".") == 1}  # levels, results, files
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for target, _, line in _imports(path, path.stem):
            if target.startswith("pyro_backpass") and target not in packages:
                pytest.fail(f"{path.name}:{line} imports {target}, not a package")


def test_licence_is_an_spdx_string_with_a_setuptools_that_reads_it():
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT" and meta["project"]["license-files"] == ["LICENSE"]
    (req,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert tuple(int(x) for x in req.split(">=")[1].split(".")[:2]) >= (77, 0)  # PEP 639 support
