"""The plugin API stays documented and exercised: every hook has a complete docstring,
appears in docs/plugins.md and is used by some test; every built-in rule attribute has
a doc, and docs/rules.md is what the schemas generate."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from dtbuild.plugins import hookspecs

ROOT = Path(__file__).resolve().parents[2]
HOOKS = sorted(name for name, fn in vars(hookspecs).items() if name.startswith("dtbuild_") and callable(fn))


def test_there_are_hooks() -> None:
    assert "dtbuild_register_rules" in HOOKS and "dtbuild_action_finished" in HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_docstring_names_every_parameter(hook: str) -> None:
    fn = getattr(hookspecs, hook)
    doc = inspect.getdoc(fn) or ""
    assert len(doc) > 40, f"{hook} needs a docstring saying what it does and when it is called"
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{hook}'s docstring does not describe '{param}'"
    if hook.startswith("dtbuild_register_"):
        assert ":return:" in doc, f"{hook}'s docstring does not say what it returns"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_in_the_plugin_guide(hook: str) -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text()
    fn = getattr(hookspecs, hook)
    params = ", ".join(inspect.signature(fn).parameters)
    assert f"`{hook}({params})`" in guide, f"docs/plugins.md must list `{hook}({params})`"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook: str) -> None:
    here = Path(__file__).resolve()
    users = [p for p in (ROOT / "tests").rglob("*.py")
             if p != here and re.search(rf"def {hook}\(", p.read_text())]
    assert users, f"no test implements {hook}"


def _rules():
    from dtbuild.engine.plugin_manager import collect_registry, make_plugin_manager

    return collect_registry(make_plugin_manager(autoload=False), ["rules"]).get("rules")


def test_every_builtin_attribute_has_a_doc() -> None:
    missing = [f"{rule}.{attr}" for rule, r in _rules().items() for attr, a in r.attrs.items()
               if len(a.doc.strip()) < 10]
    assert not missing, f"attributes without a doc: {missing}"
    assert all(len(r.doc) > 20 for r in _rules().values())


def test_rules_reference_is_up_to_date() -> None:
    from dtbuild.engine.docgen import rules_markdown

    current = (ROOT / "docs" / "rules.md").read_text()
    assert current == rules_markdown(), "docs/rules.md is stale: run `python -m dtbuild.engine.docgen > docs/rules.md`"


def test_every_builtin_layer_kind_has_a_documented_rule() -> None:
    from dtbuild.engine.plugin_manager import collect_registry, make_plugin_manager

    registry = collect_registry(make_plugin_manager(autoload=False), ["rules", "layer_kinds"])
    kinds = registry.get("layer_kinds")
    assert "pure_layer" in kinds and "root_layer" in kinds
    reference = (ROOT / "docs" / "rules.md").read_text()
    for name, kind in kinds.items():
        assert name in registry.get("rules"), f"layer kind {name} has no rule"
        assert f"\n## {name}\n" in reference, f"docs/rules.md does not document the layer kind {name}"
        if getattr(kind, "ACTION_KIND", None) is None:
            assert registry.get("rules")[name].attrs.keys() == kind.ATTRS.keys()
            for attr_name, attr in kind.ATTRS.items():
                assert len(attr.doc.strip()) >= 10, f"layer kind {name}: attribute {attr_name} has no doc"
                assert f"| `{attr_name}` |" in reference.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
