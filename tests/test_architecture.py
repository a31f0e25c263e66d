"""The package's layers, as README.md and docs/architecture.md draw them, held by the tests: every import of a minidiff
module points down (or within its own folder), none hides inside a function, none takes another module's private
name, the module graph has no cycle, and no file passes 400 lines."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minidiff"
# bottom to top; folders on one rung may not import each other
LAYERS = [{"backend"}, {"kernels"}, {"nn"}, {"models"}, {"execution"}, {"diffusion", "optim", "datasets", "runs"},
          {"instruments"}, {"training"}, {"study", "bench"}, {"(root)"}]
RUNG = {folder: i for i, rung in enumerate(LAYERS) for folder in rung}


def _module_name(path: Path) -> str:
    parts = ("minidiff",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else "(root)"


def _imports(path: Path):
    """(line, imported module, names taken from it, inside a function?) for every minidiff import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(node) for node in ast.walk(fn) if node is not fn)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "minidiff":
                    yield node.lineno, alias.name, [], id(node) in inside
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            if node.module and node.module.split(".")[0] == "minidiff":
                names = [a.name for a in node.names]
                targets = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
                rest = [n for n in names if f"{node.module}.{n}" not in MODULES]
                for target in targets:
                    yield node.lineno, target, [], id(node) in inside
                if rest:
                    yield node.lineno, node.module, rest, id(node) in inside


def _graph():
    return {m: [(line, target, names, hidden) for line, target, names, hidden in _imports(p)]
            for m, p in MODULES.items()}


def test_every_folder_is_on_a_rung():
    assert {_folder(m) for m in MODULES} == set(RUNG)


def test_imports_point_down_and_none_hides_inside_a_function_or_takes_a_private_name():
    problems = []
    for module, edges in _graph().items():
        where = MODULES[module].relative_to(PACKAGE.parent)
        for line, target, names, hidden in edges:
            if target.startswith(module + ".") or target == "minidiff":
                continue   # a package's __init__ re-exporting its own modules, or the version string
            a, b = _folder(module), _folder(target)
            if hidden:
                problems.append(f"{where}:{line}: imports {target} inside a function")
            if a != b and RUNG[b] >= RUNG[a]:
                problems.append(f"{where}:{line}: {a} imports {target} ({b} is not below it)")
            private = [n for n in names if n.startswith("_")]
            if private and target != module:
                problems.append(f"{where}:{line}: takes {private} from {target}")
    assert not problems, "\n".join(problems)


def test_the_module_graph_has_no_cycle():
    deps = {m: {t for _, t, _, _ in edges if t in MODULES and t != m and not t.startswith(m + ".")}
            for m, edges in _graph().items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        if state.get(m) == "open":
            cycle = path[path.index(m):] + [m]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        state[m] = "open"
        for d in sorted(deps[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(deps):
        visit(m, [])


def test_no_file_passes_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long
