"""docs/rules.md, generated from the rules' attribute schemas (``python -m
dtbuild.engine.docgen > docs/rules.md``), the rules the engine makes from layer kinds
among them; a test keeps the file up to date."""

from __future__ import annotations

import sys

from dtbuild.engine.plugin_manager import collect_registry, make_plugin_manager
from dtbuild.rules.api import BUILD_FUNCTION_DOCS, COMMON_ATTR_DOCS
from dtbuild.rules.attrs import MISSING


def _default(value: object) -> str:
    if value is MISSING:
        return "(mandatory)"
    return f"`{value!r}`".replace("'", '"') if value is not None else "`None`"


def rules_markdown() -> str:
    registry = collect_registry(make_plugin_manager(autoload=False), ["rules", "layer_kinds"])
    layer_kinds = {name for name, kind in registry.get("layer_kinds").items() if not getattr(kind, "ACTION_KIND", None)}
    lines = ["# Rules", "", "Generated from the built-in rules' attribute schemas by "
             "`python -m dtbuild.engine.docgen`; do not edit by hand.", "",
             "Every rule also takes `visibility` and `tags`:", "",
             "| attribute | type | default | meaning |", "|---|---|---|---|",
             f"| `visibility` | a list of labels | the package's default, else `[\"//visibility:public\"]` | "
             f"{COMMON_ATTR_DOCS['visibility']} |",
             f"| `tags` | a list of strings | `[]` | {COMMON_ATTR_DOCS['tags']} |", "",
             "BUILD files call these functions besides rules:", "",
             *(f"- {BUILD_FUNCTION_DOCS[name]}" for name in sorted(BUILD_FUNCTION_DOCS)), ""]
    for name, rule in sorted(registry.get("rules").items()):
        doc = rule.doc
        if name in layer_kinds:
            doc += (f" Made from the layer kind `{name}`: a target outputs `NAME.tar` and provides `LayerInfo`, "
                    "for `image(layers = [...])`.")
        lines += [f"## {name}", "", doc, "", "| attribute | type | default | meaning |", "|---|---|---|---|",
                  f"| `name` | a string | (mandatory) | {COMMON_ATTR_DOCS['name']} |"]
        for attr_name, attr in rule.attrs.items():
            lines.append(f"| `{attr_name}` | {attr.describe_type()} | {_default(attr.default)} | "
                         f"{attr.doc.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(rules_markdown())
