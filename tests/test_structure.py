"""The package's structure, read with ast (nothing of pcmx is imported or run).

Three rules of issue 11, counting imports made inside functions (a lazy import hides a cycle,
it does not remove it) and modules named by strings passed to ``importlib.import_module``:

* no import cycle among pcmx modules (strongly connected components of the module graph; a
  package's ``__init__`` importing its own submodules is not counted as a design edge);
* no leading-underscore name of another pcmx module imported (``from .beads import _x``) or
  reached through a module (``beads._x``); private *modules* (``pcmx._backend``) are fine, and
  so is a package's ``__init__`` re-exporting from its own submodules;
* no library module imports the command-line layer (``pcmx.cli``, ``pcmx.commands``); the
  layer itself is ``pcmx/cli.py``, ``pcmx/commands/``, ``pcmx/__main__.py`` and ``pcmx/demo.py``
  (the demo script drives the CLI), as in the project's checker ``shared/tools/structure.py``.

The checker is tested on small synthetic packages, one per rule, and on a clean one.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pcmx"
CLI_LAYER = ("cli", "commands", "demo", "__main__")  # relative to the package's name
CLI_TARGETS = ("cli", "commands")


@dataclass
class Structure:
    """The import graph of one package and the rule violations found while reading it."""

    name: str
    files: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)
    private: set[str] = field(default_factory=set)
    cli_up: set[str] = field(default_factory=set)

    def is_pkg(self, mod: str) -> bool:
        return self.files[mod].name == "__init__.py"

    def owner(self, name: str | None) -> str | None:
        """The innermost module of the package containing a dotted name (None if outside)."""
        while name and name not in self.files:
            name = name.rpartition(".")[0]
        return name or None

    def in_layer(self, mod: str, layer: tuple[str, ...]) -> bool:
        return any(mod == f"{self.name}.{p}" or mod.startswith(f"{self.name}.{p}.") for p in layer)


def _module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(mod: str, is_pkg: bool, level: int, name: str | None) -> str:
    """The absolute module named by ``from <level dots><name> import ...`` inside ``mod``."""
    if level == 0:
        return name or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_import_module(call: ast.Call) -> bool:
    f = call.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))


def _dynamic_imports(tree: ast.Module) -> set[str]:
    """Module names given to ``importlib.import_module`` as strings.

    A constant argument; a subscript of a module-level dict of constants (``_LAZY[name]``); an
    f-string ``f"prefix{param}"`` inside a helper function, resolved at each call of the helper
    with a constant (``_mod("commands.info")``); any other f-string counts as its prefix.
    """
    dicts: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            values = [v.value for v in node.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            for t in targets:
                if isinstance(t, ast.Name):
                    dicts[t.id] = values
    names: set[str] = set()
    helpers: dict[str, str] = {}  # helper function -> prefix
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    enclosing = {id(c): f for f in functions for c in ast.walk(f) if isinstance(c, ast.Call)}
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_import_module(n)):
        if not call.args:
            continue
        arg = call.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names.add(arg.value)
        elif isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name) and arg.value.id in dicts:
            names.update(dicts[arg.value.id])
        elif isinstance(arg, ast.JoinedStr):
            parts = arg.values
            prefix = parts[0].value if parts and isinstance(parts[0], ast.Constant) else ""
            names.add(prefix.rstrip("."))
            func = enclosing.get(id(call))
            params = [a.arg for a in func.args.args] if func else []
            if (func and len(parts) == 2 and isinstance(parts[1], ast.FormattedValue)
                    and isinstance(parts[1].value, ast.Name) and parts[1].value.id in params):
                helpers[func.name] = prefix
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        if isinstance(call.func, ast.Name) and call.func.id in helpers and call.args:
            arg = call.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.add(helpers[call.func.id] + arg.value)
    return {n for n in names if n}


def _private_attributes(tree: ast.Module, aliases: dict[str, str], s: Structure) -> set[tuple[str, str]]:
    """``(module, name)`` for each ``alias._name`` where ``alias`` is bound to a package module."""
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, value = [node.attr], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not (isinstance(value, ast.Name) and value.id in aliases):
            continue
        mod, *rest = aliases[value.id], *reversed(chain)
        for i, attr in enumerate(rest):
            if f"{mod}.{attr}" in s.files:
                mod = f"{mod}.{attr}"
                continue
            if i == len(rest) - 1 and attr.startswith("_") and not attr.startswith("__"):
                found.add((mod, attr))
            break
    return found


def read_structure(root: Path) -> Structure:
    """Read every ``*.py`` under the package directory ``root``."""
    files = {_module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    s = Structure(root.name, files, {m: set() for m in files})
    for m, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        pkg = s.is_pkg(m)
        targets: list[tuple[str | None, str | None]] = []  # (module, imported name or None)
        aliases: dict[str, str] = {}  # local names bound to package modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(m, pkg, node.level, node.module)
                targets.append((s.owner(base), None))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in files:  # a submodule: imports it, not a name of the package
                        targets.append((sub, None))
                        aliases[a.asname or a.name] = sub
                    else:
                        targets.append((s.owner(base), a.name))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    targets.append((s.owner(a.name), None))
                    if a.asname and a.name in files:
                        aliases[a.asname] = a.name
                    elif not a.asname and a.name.split(".")[0] == s.name:
                        aliases[s.name] = s.name
        targets += [(s.owner(n), None) for n in _dynamic_imports(tree)]
        targets += list(_private_attributes(tree, aliases, s))
        for t, name in targets:
            if t is None or t == m:
                continue
            s.edges[m].add(t)
            if name and name.startswith("_") and not name.startswith("__"):
                if not (pkg and t.startswith(m + ".")):  # a package re-exporting its own modules
                    s.private.add(f"{m} <- {t}.{name}")
            if s.in_layer(t, CLI_TARGETS) and not s.in_layer(m, CLI_LAYER):
                s.cli_up.add(f"{m} -> {t}")
    return s


def import_cycles(s: Structure) -> list[list[str]]:
    """Strongly connected groups (Tarjan) of more than one module.

    A module's edges to its own enclosing packages (``from . import x`` in ``pkg/a.py`` runs
    ``pkg/__init__``) are left out: a package is always loaded before its modules, and its
    ``__init__`` importing them is not a design cycle. A package's ``__init__`` importing its
    children does count, so ``a -> pkg.io -> pkg.io.store -> a`` is a cycle.
    """

    def deps(v):
        return sorted(w for w in s.edges[v] if not v.startswith(w + "."))

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[list[str]] = []
    for root in sorted(s.files):  # iterative, so deep graphs do not hit the recursion limit
        if root in index:
            continue
        work = [(root, iter(deps(root)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(deps(w))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    sccs.append(sorted(comp))
    return sorted(sccs)


def _listing(items) -> str:
    return "\n  " + "\n  ".join(items)


# ---- the rules on pcmx -------------------------------------------------------------------------


def test_no_import_cycle():
    cycles = import_cycles(read_structure(PACKAGE))
    assert not cycles, "import cycles (imports inside functions count):" + _listing(
        " <-> ".join(c) for c in cycles)


def test_no_private_name_from_another_module():
    private = sorted(read_structure(PACKAGE).private)
    assert not private, "private names imported from another pcmx module:" + _listing(private)


def test_library_does_not_import_the_command_line():
    cli_up = sorted(read_structure(PACKAGE).cli_up)
    assert not cli_up, "library modules importing the command-line layer:" + _listing(cli_up)


def test_reader_sees_the_whole_package():
    """Guards the rules above against passing vacuously (a wrong path, an empty graph)."""
    s = read_structure(PACKAGE)
    assert {"pcmx", "pcmx.io", "pcmx.io.store", "pcmx.operator", "pcmx.cli", "pcmx._backend"} <= set(s.files)
    assert "pcmx.io.store" in s.edges["pcmx.io"]  # from .store import open_store
    assert "pcmx.schema" in s.edges["pcmx.io.store"]  # from ..schema import validate
    assert "pcmx._backend" in s.edges["pcmx.operator"]
    assert any(w.startswith("pcmx.commands") for w in s.edges["pcmx.cli"])  # by import_module(f"...")


# ---- the checker on synthetic packages ---------------------------------------------------------


def _package(tmp_path: Path, modules: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, src in {"__init__.py": "", **modules}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))
    return root


CLEAN = {
    "__init__.py": """
        import importlib
        from . import api as _api
        from .io import load
        _LAZY = {"heavy": "pkg.heavy"}
        def __getattr__(name):
            return importlib.import_module(_LAZY[name])
    """,
    "_backend.py": "import numpy as np\n",
    "core.py": "from ._backend import np\nfrom . import _backend\ndef f():\n    return _backend.np\n",
    "heavy.py": "from .core import f\n",
    "api.py": "def g():\n    from .heavy import f\n    return f\n",
    "io/__init__.py": "from ._read import load, _helper\n",
    "io/_read.py": "from ..core import f\ndef load():\n    return f()\ndef _helper():\n    pass\n",
    "cli.py": "import importlib\nfrom .api import g\ndef main(name):\n    return importlib.import_module(f'pkg.commands.{name}')\n",
    "commands/__init__.py": "",
    "commands/run.py": "from ..cli import main\nfrom ..heavy import f\n",
}


def test_checker_passes_a_clean_package(tmp_path):
    s = read_structure(_package(tmp_path, CLEAN))
    assert import_cycles(s) == []
    assert s.private == set()
    assert s.cli_up == set()
    # and it did read the edges: lazy, dynamic and package-level ones
    assert s.edges["pkg.api"] == {"pkg.heavy"}
    assert "pkg.heavy" in s.edges["pkg"]
    assert s.edges["pkg.io"] == {"pkg.io._read"}
    assert s.edges["pkg.cli"] == {"pkg.api", "pkg.commands"}
    assert s.edges["pkg.commands.run"] == {"pkg.cli", "pkg.heavy"}


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    s = read_structure(_package(tmp_path, {
        **CLEAN,
        "core.py": "from ._backend import np\ndef f():\n    from .api import g\n    return g\n",
    }))
    assert import_cycles(s) == [["pkg.api", "pkg.core", "pkg.heavy"]]
    assert s.private == set() and s.cli_up == set()


def test_checker_finds_a_cycle_through_a_package_init(tmp_path):
    """``from .io import load`` imports ``pkg.io`` (its ``__init__``), which imports ``_read``."""
    s = read_structure(_package(tmp_path, {**CLEAN, "core.py": "def f():\n    from .io import load\n"}))
    assert import_cycles(s) == [["pkg.core", "pkg.io", "pkg.io._read"]]


def test_checker_finds_a_cycle_of_a_module_with_itself_through_from_dot_import(tmp_path):
    s = read_structure(_package(tmp_path, {
        **CLEAN, "a.py": "from . import b\n", "b.py": "def f():\n    from . import a\n"}))
    assert import_cycles(s) == [["pkg.a", "pkg.b"]]


def test_checker_finds_private_names(tmp_path):
    s = read_structure(_package(tmp_path, {
        **CLEAN,
        "heavy.py": "from .core import f\nfrom .io._read import _helper\n",
        "api.py": "from . import core\ndef g():\n    return core._secret(), core.f()\n",
        "other.py": "import pkg.core\nx = pkg.core._hidden\n",
    }))
    assert s.private == {
        "pkg.heavy <- pkg.io._read._helper",
        "pkg.api <- pkg.core._secret",
        "pkg.other <- pkg.core._hidden",
    }
    assert import_cycles(s) == [] and s.cli_up == set()


def test_checker_finds_a_private_name_of_a_sibling_package(tmp_path):
    """``pkg.io`` may re-export ``_helper`` of its own ``_read``; another package may not."""
    s = read_structure(_package(tmp_path, {
        **CLEAN, "sim/__init__.py": "from ..io._read import _helper\nfrom ._x import y\n", "sim/_x.py": "y = 1\n"}))
    assert s.private == {"pkg.sim <- pkg.io._read._helper"}


def test_checker_finds_the_library_importing_the_command_line(tmp_path):
    s = read_structure(_package(tmp_path, {
        **CLEAN,
        "heavy.py": "def h():\n    from .commands.run import main\n",
        "api.py": "import importlib\ndef _mod(n):\n    return importlib.import_module(f'pkg.{n}')\n"
                  "def g():\n    return _mod('cli').main\n",
        "io/_read.py": "import importlib\ndef load():\n    return importlib.import_module('pkg.commands')\n",
        "demo.py": "from .cli import main\n",  # the demo script belongs to the command-line layer
    }))
    assert s.cli_up == {"pkg.heavy -> pkg.commands.run", "pkg.api -> pkg.cli", "pkg.io._read -> pkg.commands"}
