"""The package's shape (STYLE.md "Layout"), read from the source with ``ast``.

- Layers: every module of ``collapse_ext`` belongs to one layer, and imports (top-level,
  lazy inside functions, or under TYPE_CHECKING alike) go only to its own layer or the
  ones before it: ``_ops`` (with ``_validate``, ``_version``, ``_build``), ``stats``,
  ``metrics``, ``lpm``/``theory``, ``monitor`` (with ``loggers`` and ``data``, which build
  on it), ``integrations``, ``io``/``analyze``/``report``/``demo``/``demo_report``, ``cli`` (with any
  ``*_cli`` module). The package's ``__init__`` is the facade over all of them: no
  module imports from it.
- One stated exception (``ALLOWED_UPWARD``): ``collapse_metrics(..., predict="lpm-ce")``
  builds a ``theory.Predictor`` through a lazy import inside ``metrics.bundle``; the
  prediction itself lives in the theory layer, which imports the metrics, not the reverse.
- ``integrations`` is a leaf: third-party adapters that only the command line may use.
- No module has more than 400 lines.
- ``reference.py`` (the float64 oracle of the tests) is imported by no module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "collapse_ext"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 400

LAYERS: tuple[tuple[str, ...], ...] = (
    ("_C", "_ops", "_validate", "_version", "_build"),
    ("stats",),
    ("metrics",),
    ("lpm", "theory", "reference"),
    ("monitor", "loggers", "data"),
    ("integrations",),
    ("io", "analyze", "report", "demo", "demo_report", "lm_report"),
    ("cli",),
)
# (importing module, imported module): why the import may go against the layer order. Each
# must be lazy (inside a function), so importing the lower layer never loads the upper one.
ALLOWED_UPWARD = {
    (f"{PACKAGE}.metrics.bundle", f"{PACKAGE}.theory.beside"): "collapse_metrics(predict=<model name>)",
}
FACADE = len(LAYERS)  # collapse_ext/__init__.py
LEAVES = {"integrations": "cli"}  # a leaf, and the one layer that may import it
ORACLE = f"{PACKAGE}.reference"
# Compiled modules: importable names without a .py file in a checkout.
NOT_PY = ("_C",)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _top(module: str) -> str:
    """The top-level name of a package module: collapse_ext.metrics.nc1 -> "metrics"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(module: str) -> int:
    top = _top(module)
    if top == "":
        return FACADE
    if top.endswith("_cli"):
        top = "cli"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} belongs to no layer: add {top!r} to LAYERS in tests/test_layout.py")


def _is_module(name: str) -> bool:
    return name in MODULES or name.split(".")[-1] in NOT_PY


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module of this package) for every import statement of ``module``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                # `from . import lpm` imports the submodule; `from . import X` otherwise an attribute.
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if _is_module(sub) else target))
    return out


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_flow_one_way():
    bad = []
    for module, path in MODULES.items():
        mine = layer_of(module)
        for line, target in imports_of(module, path):
            theirs = layer_of(target)
            if theirs > mine and (module, target) not in ALLOWED_UPWARD:
                bad.append(
                    f"{path.relative_to(ROOT.parent)}:{line}: {module} (layer {mine}) imports {target} (layer {theirs})"
                )
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_allowed_upward_imports_are_lazy_and_still_needed():
    for module, target in ALLOWED_UPWARD:
        tree = ast.parse(MODULES[module].read_text())
        top_level = {n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        lines = [line for line, t in imports_of(module, MODULES[module]) if t == target]
        assert lines, f"{module} no longer imports {target}: drop it from ALLOWED_UPWARD"
        assert not top_level & set(lines), f"{module} imports {target} at module level: it must stay lazy"


def test_integrations_is_a_leaf():
    bad = []
    for module, path in MODULES.items():
        for line, target in imports_of(module, path):
            leaf = _top(target)
            if leaf in LEAVES and _top(module) != leaf and layer_of(module) != layer_of(f"{PACKAGE}.{LEAVES[leaf]}"):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {module} imports the leaf {target}")
    assert not bad, "\n".join(bad)


def test_no_module_imports_the_reference():
    bad = [
        f"{path.relative_to(ROOT.parent)}:{line}: {module} imports {target}"
        for module, path in MODULES.items()
        if module != ORACLE
        for line, target in imports_of(module, path)
        if target == ORACLE or target.startswith(ORACLE + ".")
    ]
    assert not bad, "the float64 references are the tests' oracle only:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES}): split it by concern"


def test_layer_checker_catches_violations(tmp_path):
    """The checker itself: an upward import, a lazy one and the oracle are all seen."""
    path = tmp_path / "nc1.py"
    path.write_text(
        "from ..monitor import CollapseMonitor\n"
        "def f():\n"
        "    from .. import reference\n"
        "    import collapse_ext.cli\n"
        "from . import _inputs\n"
    )
    found = imports_of(f"{PACKAGE}.metrics.nc1", path)
    assert sorted(found) == [
        (1, f"{PACKAGE}.monitor"),
        (3, f"{PACKAGE}.reference"),
        (4, f"{PACKAGE}.cli"),
        (5, f"{PACKAGE}.metrics._inputs"),
    ]
    assert layer_of(f"{PACKAGE}.monitor") > layer_of(f"{PACKAGE}.metrics.nc1")
    assert layer_of(f"{PACKAGE}.theory_cli") == layer_of(f"{PACKAGE}.cli")
