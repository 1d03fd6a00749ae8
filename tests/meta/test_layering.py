"""The import directions of the house style hold: each layer imports only what the table
"Import direction" in STYLE.md lets it, counting lazy imports inside functions too.

The checker reads the sources with `ast` (no import runs), and names each file the way
pyproject's `package-dir` does (`engine/cli.py` is `dtbuild.engine.cli`). Imports that break
a contract today are listed, exactly, in KNOWN_VIOLATIONS: a new one fails the test, and so
does a listed one that no longer exists, so the list can only shrink."""

from __future__ import annotations

import ast
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = ("engine", "rules", "plugins")


@dataclass(frozen=True, slots=True)
class Contract:
    """One row of the table: modules under `layer` must not import `forbidden`; when `only`
    is given they may import nothing but the standard library and `only`."""

    name: str
    layer: tuple[str, ...]
    forbidden: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None


CONTRACTS = (
    Contract(
        "the rule API and built-in rules import only the standard library and dtbuild.rules",
        layer=("dtbuild.rules",),
        forbidden=("dtbuild.engine", "dtbuild.plugins", "rich", "networkx", "zstandard"),
        only=("dtbuild.rules",),
    ),
    Contract(
        "the plugin API (hookspecs, interfaces) does not import the engine",
        layer=("dtbuild.plugins.hookspecs", "dtbuild.plugins.interfaces"),
        forbidden=("dtbuild.engine",),
    ),
    Contract(
        "built-in plugins do not import the engine",
        layer=("dtbuild.plugins.builtin",),
        forbidden=("dtbuild.engine",),
    ),
    Contract(
        "engine.load does not import analysis, execution or rich",
        layer=("dtbuild.engine.load",),
        forbidden=("dtbuild.engine.analysis", "dtbuild.engine.execution", "rich"),
    ),
    Contract(
        "engine.analysis does not import execution or rich",
        layer=("dtbuild.engine.analysis",),
        forbidden=("dtbuild.engine.execution", "rich"),
    ),
    Contract(
        "engine.execution does not import load or rich (it reports through a Reporter)",
        layer=("dtbuild.engine.execution",),
        forbidden=("dtbuild.engine.load", "rich"),
    ),
    Contract(
        "the engine knows builds, not images: it does not import the built-in plugins",
        layer=("dtbuild.engine",),
        forbidden=("dtbuild.plugins.builtin",),
    ),
)

# importer -> the modules it imports against a contract today: none. The engine knows
# builds, not images (image commands come from the image plugins through
# dtbuild_register_commands), and the built-ins are entry points. Keep it empty: reach
# the other layer through a hook or a public type instead.
KNOWN_VIOLATIONS: dict[str, frozenset[str]] = {}


@dataclass(frozen=True, slots=True)
class Violation:
    importer: str
    imported: str
    path: str
    line: int
    contract: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}, but {self.contract}"


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def is_stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names


def source_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module under the source roots, by the dotted name pyproject's package-dir gives it."""
    package_dir: dict[str, str] = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    # Longest directory first, so plugins/builtin/x.py maps through "plugins/builtin".
    mapping = sorted(((Path(d).parts, pkg) for pkg, d in package_dir.items()), key=lambda m: -len(m[0]))
    modules: dict[str, Path] = {}
    for top in SOURCE_ROOTS:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("").parts
            if "__pycache__" in rel:
                continue
            for dir_parts, package in mapping:
                if rel[: len(dir_parts)] == dir_parts:
                    parts = [*package.split("."), *rel[len(dir_parts) :]]
                    break
            else:
                raise AssertionError(f"{path} is under no package-dir entry of pyproject.toml")
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(source: str, module: str, is_package: bool, known: set[str] | frozenset[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in `source`, at any depth: module level, inside
    functions, under `if TYPE_CHECKING`, and `importlib.import_module("literal")`. For
    `from X import Y`, Y counts as the module X.Y when `known` has it, else X is what is imported."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((candidate if candidate in known else base, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
        ):
            found.append((node.args[0].value, node.lineno))
    return found


def check_module(
    source: str, module: str, path: str, *, is_package: bool = False, known: set[str] | frozenset[str] = frozenset()
) -> list[Violation]:
    violations = []
    for imported, line in imports_of(source, module, is_package, known):
        for contract in CONTRACTS:
            if not within(module, contract.layer):
                continue
            broken = within(imported, contract.forbidden) or (
                contract.only is not None and not is_stdlib(imported) and not within(imported, contract.only)
            )
            if broken:
                violations.append(Violation(module, imported, path, line, contract.name))
    return violations


def current_violations() -> list[Violation]:
    modules = source_modules()
    known = set(modules)
    found = []
    for module, path in modules.items():
        found += check_module(
            path.read_text(),
            module,
            str(path.relative_to(ROOT)),
            is_package=path.name == "__init__.py",
            known=known,
        )
    return found


def test_the_checker_sees_the_whole_tree() -> None:
    modules = source_modules()
    for expected in (
        "dtbuild.engine.cli",
        "dtbuild.engine.load",
        "dtbuild.rules.api",
        "dtbuild.rules.builtin",
        "dtbuild.plugins.hookspecs",
        "dtbuild.plugins.builtin.imageformat",
    ):
        assert expected in modules, f"{expected} not found: is package-dir in pyproject.toml still read right?"
    assert modules["dtbuild.engine.cli"] == ROOT / "engine" / "cli.py"


def test_import_directions_hold() -> None:
    violations = current_violations()
    allowed = {(importer, imported) for importer, imports in KNOWN_VIOLATIONS.items() for imported in imports}
    new = sorted({str(v) for v in violations if (v.importer, v.imported) not in allowed})
    assert not new, (
        "imports against the layering of STYLE.md ('Import direction'):\n  "
        + "\n  ".join(new)
        + "\nreach the other layer through a hook or a public type instead"
    )
    seen = {(v.importer, v.imported) for v in violations}
    gone = sorted(f"{importer} -> {imported}" for importer, imported in allowed - seen)
    assert not gone, (
        "these imports are gone: remove them from KNOWN_VIOLATIONS in tests/meta/test_layering.py:\n  "
        + "\n  ".join(gone)
    )


@pytest.mark.parametrize(
    ("module", "source", "imported", "contract_word"),
    [
        (
            "dtbuild.engine.load",
            "from dtbuild.plugins.builtin import imageformat\n",
            "dtbuild.plugins.builtin.imageformat",
            "images",
        ),
        ("dtbuild.engine.load", "def f():\n    import rich.console\n", "rich.console", "engine.load"),
        (
            "dtbuild.engine.analysis",
            "from dtbuild.engine.execution import ActionRunner\n",
            "dtbuild.engine.execution",
            "analysis",
        ),
        ("dtbuild.engine.execution", "from . import load\n", "dtbuild.engine.load", "execution"),
        ("dtbuild.rules.api", "def f():\n    import networkx\n", "networkx", "rule API"),
        ("dtbuild.rules.api", "import urllib3\n", "urllib3", "only the standard library"),
        ("dtbuild.rules.builtin", "from ...engine import errors\n", "dtbuild.engine.errors", "rule API"),
        (
            "dtbuild.plugins.interfaces",
            "import importlib\nimportlib.import_module('dtbuild.engine.store')\n",
            "dtbuild.engine.store",
            "plugin API",
        ),
        (
            "dtbuild.plugins.builtin.fetch",
            "from dtbuild.engine.store import atomic_write\n",
            "dtbuild.engine.store",
            "built-in plugins",
        ),
    ],
)
def test_the_checker_reports_a_broken_contract(module: str, source: str, imported: str, contract_word: str) -> None:
    known = {"dtbuild.plugins.builtin.imageformat", "dtbuild.engine.load", "dtbuild.engine.errors"}
    is_package = module == "dtbuild.rules.builtin"
    violations = check_module(source, module, "synthetic.py", is_package=is_package, known=known)
    assert any(v.imported == imported and contract_word in v.contract for v in violations), violations


def test_the_checker_lets_allowed_imports_pass() -> None:
    source = (
        "from __future__ import annotations\nimport dataclasses\nfrom typing import TYPE_CHECKING\n"
        "from dtbuild.rules import attrs\nfrom .providers import ImageInfo\n"
    )
    assert check_module(source, "dtbuild.rules.api", "synthetic.py", known={"dtbuild.rules.attrs"}) == []
    engine_source = "from dtbuild.engine.errors import ActionError\nfrom dtbuild.plugins.interfaces import Executor\n"
    assert check_module(engine_source, "dtbuild.engine.execution", "synthetic.py") == []


def test_the_engine_names_no_builtin_plugin_module() -> None:
    """`grep -r "plugins.builtin" engine/` finds nothing: not an import, not a string
    handed to importlib, not a path. The engine knows builds; image commands and image
    summary fields come from the image plugins through hooks."""
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in sorted((ROOT / "engine").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if "plugins.builtin" in line]
    assert not found, "the engine names built-in plugin modules:\n  " + "\n  ".join(found)
