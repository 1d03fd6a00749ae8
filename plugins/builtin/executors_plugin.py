"""The built-in plugin ``executors``: the ``local``, ``namespace`` and ``vm`` executors,
and the choice of one for an action that asks for ``auto``. Another plugin may replace
one of them by registering an executor of the same NAME with ``REPLACES = True``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dtbuild.plugins import hookimpl

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import Executor


@hookimpl
def dtbuild_register_executors() -> Sequence[type[Executor]]:
    from dtbuild.plugins.builtin.executors import LocalExecutor
    from dtbuild.plugins.builtin.namespace_executor import NamespaceExecutor
    from dtbuild.plugins.builtin.vm_executor import VmExecutor

    return [LocalExecutor, NamespaceExecutor, VmExecutor]


#: Action kinds whose commands need an executor that builds root layers.
ROOT_LAYER_MNEMONICS = frozenset({"RootLayerWrite"})


@hookimpl
def dtbuild_select_executor(mnemonic: str, requested: str, available: Sequence[str]) -> str | None:
    if requested != "auto":
        return None
    if mnemonic in ROOT_LAYER_MNEMONICS:
        # namespace where it works, else a VM; when neither does, namespace, so that the
        # error says what is missing for it.
        for name in ("namespace", "vm"):
            if name in available:
                return name
        return "namespace"
    return "local" if "local" in available else None
