"""The ``pure_layer`` layer kind (mkPureLayer): packages' files at their destinations.

It is a layer kind like a third-party one: the engine makes its rule, and
``LayerKindWrite`` writes its layers. Its attribute schema, doc and analysis half
(:func:`dtbuild.rules.builtin.image.pure_layer_plan`) live with the image rules, which
share them; its members are LayerWrite's, so its layers are byte for byte what
LayerWrite writes for the same packages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dtbuild.plugins.interfaces import ActionContext, LayerKind
from dtbuild.rules.builtin.image import PURE_LAYER_ATTRS, PURE_LAYER_DOC, pure_layer_plan

if TYPE_CHECKING:
    from dtbuild.plugins.builtin.layertar import LayerEntry
    from dtbuild.rules.api import LayerPlan, RuleContext


class PureLayer(LayerKind):
    NAME = "pure_layer"
    VERSION = "1"
    DOC = PURE_LAYER_DOC
    ATTRS = MappingProxyType(dict(PURE_LAYER_ATTRS))

    @classmethod
    def plan(cls, ctx: RuleContext) -> LayerPlan:
        return pure_layer_plan(ctx)

    def entries(self, ctx: ActionContext, attrs: Mapping[str, Any]) -> Iterable[LayerEntry]:  # type: ignore[override]
        # Imported here: registering the layer kind must not load the image writers.
        from dtbuild.plugins.builtin.image_actions import LayerWrite

        return LayerWrite.package_entries(ctx, attrs)[0]
