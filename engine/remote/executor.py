"""The ``remote`` executor: commands run on a REAPI v2 Execution service
(``[remote] executor``, ``$DTBUILD_REMOTE_EXECUTOR`` or ``--remote-executor``).

It belongs to the engine, not to a plugin: the engine adds it to the build's executors
when a remote executor is configured (a plugin that registers an executor named
``remote`` replaces it) and sends it the commands of action kinds that declare
``COMMAND = True`` (``Genrule``), never through ``auto``: with a remote executor configured they go there,
and when it fails (unreachable, the service could not run the command) the engine warns
once and runs them here. A non-zero exit code is the command's own result and is not
retried.

A request becomes one REAPI action: the *input root* is the deepest directory holding
the request's ``cwd`` and every ``writable`` path (for a genrule: its scratch directory
with ``execroot``, ``home`` and ``tmp``), sent whole; the working directory is ``cwd``
relative to it; ``outputs`` are the output paths fetched back into ``cwd``; environment
values naming paths in the input root are rewritten to where the sandbox shows them
(see :mod:`dtbuild.engine.remote.execute`). ``[remote] platform`` becomes the action's
platform properties, which is how a cluster picks workers (``OSFamily``,
``container-image``, ...). docs/remote-execution.md has the whole picture.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from dtbuild.engine.remote import RemoteError
from dtbuild.plugins.interfaces import CancelToken, CommandRequest, CommandResult, Executor

if TYPE_CHECKING:
    from dtbuild.engine.remote.execute import RemoteExecution

#: unavailable_reason() without ``[remote] executor``.
NOT_CONFIGURED = ("no remote executor is configured ([remote] executor, $DTBUILD_REMOTE_EXECUTOR or "
                  "--remote-executor)")


class RemoteExecutor(Executor):
    NAME = "remote"

    def __init__(self, context: Any = None) -> None:
        super().__init__(context)
        self._lock = threading.Lock()
        self._execution: RemoteExecution | None = None

    def unavailable_reason(self) -> str | None:
        from dtbuild.engine.errors import WorkspaceError
        from dtbuild.engine.remote.config import remote_config

        try:
            return None if remote_config(self.settings).executor is not None else NOT_CONFIGURED
        except WorkspaceError as e:
            return str(e)

    def _remote(self) -> RemoteExecution:
        from dtbuild.engine.remote.config import remote_config
        from dtbuild.engine.remote.execute import RemoteExecution

        with self._lock:
            if self._execution is None:
                endpoint = remote_config(self.settings).executor
                if endpoint is None:
                    raise RemoteError(NOT_CONFIGURED)
                self._execution = RemoteExecution.open(endpoint)
            return self._execution

    def run(self, request: CommandRequest, cancel: CancelToken) -> CommandResult:
        """Run ``request`` remotely.

        :raises RemoteError: when it cannot run there (the engine then runs it here).
        """
        from dtbuild.engine.remote.config import remote_config

        if request.network:
            raise RemoteError("the command needs network access, which remote execution does not give")
        cwd = os.path.abspath(request.cwd)
        root = os.path.commonpath([cwd, *(os.path.abspath(p) for p in request.writable)])
        for path in request.readonly:
            if os.path.commonpath([root, os.path.abspath(path)]) != root:
                raise RemoteError(f"the command reads {path}, which is outside its input root {root}")
        if root == os.path.dirname(root):
            raise RemoteError(f"the command's directories have no common parent but {root}: it is not sent")
        result = self._remote().execute(root, os.path.relpath(cwd, root), list(request.argv), dict(request.env),
                                        list(request.outputs), dict(remote_config(self.settings).platform),
                                        request.timeout, cancel)
        return CommandResult(result.exit_code, result.output)
