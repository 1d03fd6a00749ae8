"""Remote execution against a real REAPI Execution service: buildbox-casd on loopback
with its local execution (each action run by buildbox-run in a bubblewrap sandbox whose
``/`` is the action's input root, the host's /usr, /bin, /lib and /lib64 bound
read-only into it).

What a user checks: a command that reads an input and writes an output gives the same
bytes and executable bit as a local run; a failing command gives its exit code and its
output's tail; HOME, TMPDIR and other paths in the environment work in the sandbox; a
cancelled build stops a long command on the worker; and ``dtbuild build
--remote-executor`` builds a genrule remotely with the same output digest as a local
build."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dtbuild.engine.remote import RemoteError
from dtbuild.engine.remote.executor import NOT_CONFIGURED, RemoteExecutor
from dtbuild.plugins.builtin.executors import LocalExecutor
from dtbuild.plugins.interfaces import CommandRequest, ExecutorContext, Settings
from servers_casd import CasdServer, require, require_buildbox, start_casd

pytestmark = pytest.mark.e2e

HOST_TOOLS = ("/usr", "/bin", "/lib", "/lib64")
PATH = "/usr/local/bin:/usr/bin:/bin"


def runner_args() -> list[str]:
    """The host's tools, read-only, at their usual paths in the sandbox. buildbox-run
    resolves a symlinked source relative to nothing, so /bin -> usr/bin is given as
    /usr/bin:/bin."""
    return [f"--ro-bind-mount={os.path.realpath(p)}:{p}" for p in HOST_TOOLS if os.path.exists(p)]


@pytest.fixture(scope="module")
def casd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasdServer]:
    require_buildbox("buildbox-casd")
    require_buildbox("buildbox-run")
    require(next((p for p in ("/usr/bin/bwrap", "/bin/bwrap") if os.path.exists(p)), None), "bwrap")
    with start_casd(tmp_path_factory.mktemp("casd"), runner=True, runner_args=runner_args(),
                    log_level="info") as server:
        yield server


def _executor(url: str, tmp_path: Path, **remote: Any) -> RemoteExecutor:
    settings = Settings({"remote": {"executor": url, **remote}}, {"remote.executor": "--remote-executor"})
    return RemoteExecutor(ExecutorContext(str(tmp_path), str(tmp_path / "cache"), settings))


class _Cancel:
    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


def _scratch(root: Path) -> tuple[Path, Path, Path]:
    """A genrule-like scratch directory: execroot (with an input), home, tmp."""
    execroot, home, tmp = root / "execroot", root / "home", root / "tmp"
    for d in (execroot / "src", execroot / "out", home, tmp):
        d.mkdir(parents=True)
    (execroot / "src" / "in.txt").write_bytes(b"alpha\nbeta\n")
    tool = execroot / "src" / "tool.sh"
    tool.write_bytes(b"#!/bin/sh\ntr a-z A-Z\n")
    tool.chmod(0o755)
    return execroot, home, tmp


def _request(execroot: Path, home: Path, tmp: Path, script: str, outputs: list[str],
             **kw: Any) -> CommandRequest:
    env = {"PATH": PATH, "HOME": str(home), "TMPDIR": str(tmp), "LC_ALL": "C"}
    env.update(kw.pop("env", {}))
    return CommandRequest(argv=["/bin/sh", "-c", "umask 022\n" + script], cwd=str(execroot), env=env,
                          writable=[str(home), str(tmp)], outputs=outputs, **kw)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SCRIPT = ("src/tool.sh < src/in.txt > out/upper.txt\n"
          "printf '#!/bin/sh\\necho hi\\n' > out/run.sh\nchmod +x out/run.sh\n"
          "mkdir -p out/tree/sub && cp src/in.txt out/tree/sub/copy.txt\n")
OUTPUTS = ["out/upper.txt", "out/run.sh", "out/tree"]


def test_outputs_match_a_local_run(casd: CasdServer, tmp_path: Path) -> None:
    remote_root, local_root = tmp_path / "remote", tmp_path / "local"
    results = []
    for root, executor in ((remote_root, _executor(casd.url, tmp_path)), (local_root, LocalExecutor(None))):
        execroot, home, tmp = _scratch(root)
        results.append(executor.run(_request(execroot, home, tmp, SCRIPT, OUTPUTS), _Cancel()))
    assert [r.exit_code for r in results] == [0, 0], results
    for rel in ("out/upper.txt", "out/run.sh", "out/tree/sub/copy.txt"):
        remote, local = remote_root / "execroot" / rel, local_root / "execroot" / rel
        assert remote.read_bytes() == local.read_bytes(), rel
        assert stat.S_IMODE(remote.stat().st_mode) == stat.S_IMODE(local.stat().st_mode), rel
    assert (remote_root / "execroot/out/upper.txt").read_bytes() == b"ALPHA\nBETA\n"
    assert stat.S_IMODE((remote_root / "execroot/out/run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((remote_root / "execroot/out/upper.txt").stat().st_mode) == 0o644


def test_failing_command_gives_its_exit_code_and_output_tail(casd: CasdServer, tmp_path: Path) -> None:
    execroot, home, tmp = _scratch(tmp_path / "s")
    script = "for i in $(seq 1 100); do echo line $i; done\necho 'no such thing' >&2\nexit 7\n"
    result = _executor(casd.url, tmp_path).run(_request(execroot, home, tmp, script, []), _Cancel())
    assert result.exit_code == 7
    assert "no such thing" in result.output
    assert "line 100" in result.output
    assert "line 1\n" not in result.output  # a tail, not the whole output


def test_environment_paths_work_in_the_sandbox(casd: CasdServer, tmp_path: Path) -> None:
    execroot, home, tmp = _scratch(tmp_path / "s")
    script = ('echo home > "$HOME/h" && echo tmp > "$TMPDIR/t"\n'
              'cat "$HOME/h" "$TMPDIR/t" "$INPUT" > out/env.txt\n'
              'for d in $(echo "$DIRS" | tr : " "); do ls "$d" >> out/env.txt; done\n'
              'test "$(pwd)" = "$(cd "$WORKDIR" && pwd)" && echo same-dir >> out/env.txt\n'
              'echo "$OTHER" >> out/env.txt\n')
    env = {"INPUT": str(execroot / "src" / "in.txt"), "DIRS": f"{execroot / 'src'}:{execroot / 'out'}",
           "WORKDIR": str(execroot), "OTHER": "/not/in/the/root"}
    result = _executor(casd.url, tmp_path).run(_request(execroot, home, tmp, script, ["out/env.txt"], env=env),
                                               _Cancel())
    assert result.exit_code == 0, result.output
    assert (execroot / "out/env.txt").read_text() == (
        "home\ntmp\nalpha\nbeta\nin.txt\ntool.sh\nenv.txt\nsame-dir\n/not/in/the/root\n")


def _sleeping(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.split(b"\0")[:2] == [b"sleep", marker.encode()]:
                pids.append(int(entry))
    return pids


def test_cancel_stops_a_long_command(casd: CasdServer, tmp_path: Path) -> None:
    execroot, home, tmp = _scratch(tmp_path / "s")
    marker = str(4000 + os.getpid() % 1000)
    cancel = _Cancel()
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(_executor(casd.url, tmp_path).run(
        _request(execroot, home, tmp, f"exec sleep {marker}", []), cancel)))
    started = time.monotonic()
    thread.start()
    deadline = time.monotonic() + 20
    while not _sleeping(marker):
        assert time.monotonic() < deadline, "the command never started on the worker"
        time.sleep(0.1)
    cancel.set()
    thread.join(20)
    assert not thread.is_alive(), "the executor did not return after cancellation"
    assert done and done[0].exit_code != 0
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 10
    while _sleeping(marker):
        assert time.monotonic() < deadline, "the sandboxed sleep still runs after cancellation"
        time.sleep(0.1)


def test_unconfigured_and_unreachable(casd: CasdServer, tmp_path: Path) -> None:
    assert RemoteExecutor(ExecutorContext(str(tmp_path), str(tmp_path))).unavailable_reason() == NOT_CONFIGURED
    assert "grpc://HOST:PORT" in (_executor("http://127.0.0.1:1", tmp_path).unavailable_reason() or "")
    with socket_port() as port:
        executor = _executor(f"grpc://127.0.0.1:{port}", tmp_path, timeout=5)
        assert executor.unavailable_reason() is None
        execroot, home, tmp = _scratch(tmp_path / "s")
        started = time.monotonic()
        with pytest.raises(RemoteError, match=r"127\.0\.0\.1"):
            executor.run(_request(execroot, home, tmp, "true", []), _Cancel())
        assert time.monotonic() - started < 15


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    """A port on 127.0.0.1 that nothing listens on (bound, not listening, while held)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


GENRULE_BUILD = '''genrule(
    name = "shout",
    srcs = ["words.txt"],
    outs = ["shout.txt"],
    cmd = "tr a-z A-Z < $SRCS > $OUT && test -d $HOME && test -w $TMPDIR && echo ok >> $OUT",
)
'''


def test_cli_builds_a_genrule_remotely(casd: CasdServer, write_workspace: Callable[..., Path],
                                       run_dtbuild: Any) -> None:
    files = {"pkg/BUILD": GENRULE_BUILD, "pkg/words.txt": "some words\n"}
    local_ws = write_workspace(files, name="local")
    remote_ws = write_workspace(files, name="remote")
    local = run_dtbuild.build(local_ws, "//pkg:shout", check=True)
    remote = run_dtbuild.build(remote_ws, "//pkg:shout", "--remote-executor", casd.url, check=True,
                               env={"DTBUILD_CACHE_DIR": str(remote_ws.parent / "remote-cache")})
    assert remote.summary is not None and local.summary is not None
    assert remote.summary["actions"]["remote_executed"] >= 1, remote.summary
    assert "remote executor cannot be used" not in remote.stderr
    out = "dtbuild-out/pkg/shout.txt"
    assert (remote_ws / out).read_bytes() == b"SOME WORDS\nok\n"
    assert _sha(remote_ws / out) == _sha(local_ws / out)


def test_large_blobs_stream_both_ways(casd: CasdServer, tmp_path: Path) -> None:
    execroot, home, tmp = _scratch(tmp_path / "s")
    big = os.urandom(3 * 1024 * 1024 + 17)  # above the batch size: ByteStream up and down
    (execroot / "src" / "big.bin").write_bytes(big)
    result = _executor(casd.url, tmp_path).run(
        _request(execroot, home, tmp, "cat src/big.bin src/big.bin > out/double.bin", ["out/double.bin"]),
        _Cancel())
    assert result.exit_code == 0, result.output
    assert (execroot / "out/double.bin").read_bytes() == big + big


def test_timeout_stops_the_command(casd: CasdServer, tmp_path: Path) -> None:
    execroot, home, tmp = _scratch(tmp_path / "s")
    started = time.monotonic()
    result = _executor(casd.url, tmp_path).run(
        _request(execroot, home, tmp, "echo started; sleep 30", [], timeout=1), _Cancel())
    assert time.monotonic() - started < 20
    assert result.exit_code != 0
    assert "started" in result.output and "timed out" in result.output


def test_executor_killed_mid_command_is_a_remote_error(tmp_path: Path) -> None:
    require_buildbox("buildbox-casd")
    require_buildbox("buildbox-run")
    server = start_casd(tmp_path / "casd", runner=True, runner_args=runner_args())
    marker = str(5000 + os.getpid() % 1000)
    try:
        execroot, home, tmp = _scratch(tmp_path / "s")
        executor = _executor(server.url, tmp_path, timeout=5)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                executor.run(_request(execroot, home, tmp, f"exec sleep {marker}", []), _Cancel())
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 20
        while not _sleeping(marker):
            assert time.monotonic() < deadline, "the command never started on the worker"
            time.sleep(0.1)
        server.kill()
        thread.join(30)
        assert not thread.is_alive(), "the executor hangs after the service went away"
        assert len(errors) == 1 and isinstance(errors[0], RemoteError), errors
    finally:
        server.kill()
        for pid in _sleeping(marker):  # the sandbox casd left behind, started by this test
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def test_a_cache_without_execution_is_named(tmp_path: Path) -> None:
    require_buildbox("buildbox-casd")
    with start_casd(tmp_path / "casd") as cache_only:
        execroot, home, tmp = _scratch(tmp_path / "s")
        with pytest.raises(RemoteError, match="does not run commands"):
            _executor(cache_only.url, tmp_path).run(_request(execroot, home, tmp, "true", []), _Cancel())
