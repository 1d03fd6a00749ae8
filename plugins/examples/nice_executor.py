"""An example executor and executor choice: ``nice`` runs commands as the ``local``
executor does, at a lower CPU priority, and ``dtbuild_select_executor`` gives it every
genrule that asked for no executor, so a big build leaves the desktop responsive.

After ``[plugins] modules = ["tools/nice_executor.py"]``, ``genrule(cmd = "nice > $OUTS")``
writes ``10``.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence

from dtbuild.plugins import hookimpl
from dtbuild.plugins.builtin.executors import LocalExecutor
from dtbuild.plugins.interfaces import CancelToken, CommandRequest, CommandResult, Executor

NICENESS = 10


class NiceExecutor(Executor):
    NAME = "nice"

    def unavailable_reason(self) -> str | None:
        # Called before the executor is offered: say what is missing and how to get it.
        return None if shutil.which("nice") else "the nice program is not installed (it is part of coreutils)"

    def run(self, request: CommandRequest, cancel: CancelToken) -> CommandResult:
        # The same request with a prefix: the sandbox, timeouts and cancelling stay LocalExecutor's.
        niced = dataclasses.replace(request, argv=["nice", "-n", str(NICENESS), *request.argv])
        return LocalExecutor(self.context).run(niced, cancel)


@hookimpl
def dtbuild_register_executors() -> list[type[Executor]]:
    return [NiceExecutor]


@hookimpl
def dtbuild_select_executor(mnemonic: str, requested: str, available: Sequence[str]) -> str | None:
    # The first plugin to answer wins; None leaves the choice to the others (the built-in
    # one honours the target's request and knows root layers' needs).
    if mnemonic == "Genrule" and requested == "auto" and NiceExecutor.NAME in available:
        return NiceExecutor.NAME
    return None
