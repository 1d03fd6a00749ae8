"""The ``local`` executor: commands run as host processes in their own session, confined
by the command sandbox (:mod:`dtbuild.plugins.builtin.sandbox`) to their working
directory, the paths their request declares and the host's tools, killed as a group when
the build stops. With the sandbox turned off (``[sandbox] commands = "none"``) they run
unconfined, without network access where ``unshare`` allows it."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence

from dtbuild.plugins.builtin.sandbox import confine_argv, sandbox_mode
from dtbuild.plugins.interfaces import CancelToken, CommandRequest, CommandResult, Executor

OUTPUT_TAIL_LINES = 40
_TAIL_BYTES = 64 * 1024


@functools.cache
def network_isolation_prefix() -> tuple[str, ...]:
    """The command prefix that gives a process an empty network namespace here, or ()
    where the machine allows none (unprivileged user namespaces disabled)."""
    for prefix in (("unshare", "--net"), ("unshare", "--map-root-user", "--net")):
        try:
            done = subprocess.run([*prefix, "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return ()


def output_tail(data: bytes, lines: int = OUTPUT_TAIL_LINES) -> str:
    text = data.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


class LocalExecutor(Executor):
    NAME = "local"

    def run(self, request: CommandRequest, cancel: CancelToken) -> CommandResult:
        argv = list(request.argv)
        if sandbox_mode(self.settings) == "bwrap":
            argv = confine_argv(argv, writable=[request.cwd, *request.writable], readonly=request.readonly,
                                network=request.network)
        elif not request.network:
            argv = [*network_isolation_prefix(), *argv]
        return run_supervised(argv, cwd=request.cwd, env=request.env, cancel=cancel, timeout=request.timeout)


def run_supervised(argv: Sequence[str], *, cwd: str, env: Mapping[str, str], cancel: CancelToken,
                   timeout: float | None = None) -> CommandResult:
    """Run ``argv`` in its own session, its output (stdout and stderr) kept in a file;
    kill its process group when ``cancel`` is set or ``timeout`` passes. Returns the exit
    code (negative for a signal) and the output's last lines."""
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                try:
                    code = proc.wait(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    if cancel.is_set() or (deadline is not None and time.monotonic() > deadline):
                        kill_group(proc)
                        code = proc.wait()
                        break
        except BaseException:
            kill_group(proc)
            proc.wait()
            raise
        size = log.seek(0, os.SEEK_END)
        log.seek(max(0, size - _TAIL_BYTES))
        tail = log.read()
    return CommandResult(code, output_tail(tail))

def kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

