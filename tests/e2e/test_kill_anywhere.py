"""A build killed at any moment leaves nothing that a rebuild does not repair: builds of
``tests/fixtures/every_kind`` (every built-in action kind but pull_image, root layers in
the namespace executor included) are killed over and over, at moments drawn from a seeded
random generator over the build's duration, and at moments picked to land in a root layer
and in the writing of dtbuild-out/. Most kills are SIGKILL (``kill -9``); some are SIGINT
(Ctrl-C, once or twice) or SIGTERM. Most rounds first change a source, so that each
interrupted build has real work to do and the killed builds leave results of several
versions in the cache and dtbuild-out/.

Then the sources are restored and a last build must exit 0 with outputs byte-identical
(and mode-identical) to a reference build made in another copy with another cache, and
leave no temporary in the workspace or the cache, no mount and no process behind.

The test process makes itself a child subreaper for its duration, so processes that a
killed build leaves behind are reparented to it and are seen (and, at the end, killed by
their pid) instead of escaping to init.
"""

from __future__ import annotations

import ctypes
import gzip
import hashlib
import io
import os
import random
import re
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

APPLETS = ["sh", "cat", "echo", "id", "ls", "mkdir", "rm", "chown", "chmod", "stat", "test", "touch", "sleep",
           "env", "wc"]
SEED = 20240611
#: Signals actually delivered to a running build: rounds go on until there are this many
#: (a build that finished before its moment came is not a kill), at most MAX_ROUNDS.
KILLS = 24
MAX_ROUNDS = 60
#: One cycle of rounds: where the signal is meant to land.
MODES = ["random"] * 6 + ["loading", "execution", "root layer", "root layer", "output writing", "output writing"]
#: How long a process left behind by a killed build may take to go away.
ORPHAN_GRACE = 3.0
#: How long a build may take to stop after SIGINT or SIGTERM.
STOP_TIMEOUT = 60.0
TEMP_NAME = re.compile(r"\.dtbuild-(tmp|old)-")
PROGRESS = re.compile(r"^\[(\d+)/(\d+)\] ([A-Z][A-Za-z0-9]*) ", re.MULTILINE)
ROOT_MNEMONICS = {"RootfsUnpack", "RootLayerWrite"}
PR_SET_CHILD_SUBREAPER = 36


# --------------------------------------------------------------------------- the workspace


def _add_busybox(ws: Path) -> None:
    bindir = ws / "base" / "rootfs" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", bindir / "busybox")
    for applet in APPLETS:
        (bindir / applet).symlink_to("busybox")


def _write_remote(ws: Path, files: Path) -> None:
    """remote/BUILD: fetch_url from file:// URLs of files made once for both copies."""
    if not files.exists():
        files.mkdir(parents=True)
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            data = b"fetched\n"
            info = tarfile.TarInfo("share/a.txt")
            info.size, info.mode, info.mtime = len(data), 0o644, 1
            tar.addfile(info, io.BytesIO(data))
        (files / "payload.tar.gz").write_bytes(gzip.compress(raw.getvalue(), mtime=0))
        (files / "note.txt").write_bytes(b"a plain fetched file\n")
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files.iterdir()}
    (ws / "remote").mkdir()
    (ws / "remote" / "BUILD").write_text(f"""
fetch_url(name = "payload", urls = ["file://{files}/payload.tar.gz"], sha256 = "{sums['payload.tar.gz']}",
          extract = True, prefix = "/opt/fetched")
fetch_url(name = "note", urls = ["file://{files}/note.txt"], sha256 = "{sums['note.txt']}", executable = True)
image(name = "fetched", tag = "1", copy_to_root = [":payload", ":note"], compressor = "none")
""")


# --------------------------------------------------------------------------- processes


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _children(parent: int) -> list[int]:
    return [pid for pid in _pids() if (st := _stat(pid)) is not None and st[1] == parent]


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for pid in _pids():
        st = _stat(pid)
        if st is not None:
            parents[pid] = st[1]
    found, frontier = [], [root]
    while frontier:
        current = frontier.pop()
        kids = [pid for pid, ppid in parents.items() if ppid == current]
        found += kids
        frontier += kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _pointing_into(top: Path) -> list[str]:
    """Processes (but this one) whose command line, working directory or root is under ``top``."""
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        places = [_cmdline(pid)]
        for link in ("cwd", "root"):
            try:
                places.append(os.readlink(f"/proc/{pid}/{link}"))
            except OSError:
                pass
        if any(str(top) in place for place in places):
            found.append(f"{pid}: {places}")
    return found


def _reap_orphans() -> list[str]:
    """Processes reparented to this (subreaper) process: the zombies are reaped, the live
    ones returned (pid and command line)."""
    alive = []
    for pid in _children(os.getpid()):
        st = _stat(pid)
        if st is None:
            continue
        if st[0] == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        else:
            alive.append(f"{pid}: {_cmdline(pid)}")
    return alive


@pytest.fixture
def subreaper() -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.fail(f"prctl(PR_SET_CHILD_SUBREAPER): errno {ctypes.get_errno()}")
    try:
        yield
    finally:
        for line in _reap_orphans():  # a failed test leaves none running
            pid = int(line.split(":", 1)[0])
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _mounts_under(top: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.strip() for line in f if str(top) in line.split()[4]]


# --------------------------------------------------------------------------- killing


def _progress(err_path: Path) -> list[tuple[int, int, str]]:
    try:
        text = err_path.read_text(errors="replace")
    except OSError:
        return []
    return [(int(a), int(b), m) for a, b, m in PROGRESS.findall(text)]


def _writing_outputs(pid: int, ws: Path) -> bool:
    """Whether the build has a file open under a temporary name in dtbuild-out/ (writing
    an output, or a tree output's directory)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    out = str(ws / "dtbuild-out")
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(out) and TEMP_NAME.search(target):
            return True
    return False


def _in_root_layer(pid: int) -> bool:
    return any("unshare" in (cmd := _cmdline(kid)) or "namespace_executor" in cmd for kid in _descendants(pid))


def _executing(proc: subprocess.Popen[bytes], err_path: Path, ws: Path) -> bool:
    """Whether the build has started actions and is neither in a root layer nor writing
    dtbuild-out/."""
    return bool(_progress(err_path)) and not _writing_outputs(proc.pid, ws) and not _in_root_layer(proc.pid)


def _phase(proc: subprocess.Popen[bytes], err_path: Path, ws: Path) -> str:
    if _writing_outputs(proc.pid, ws):
        return "output writing"
    if _in_root_layer(proc.pid):
        return "root layer"
    if not _progress(err_path):
        return "loading"
    return "execution"


def _wait_until(proc: subprocess.Popen[bytes], condition, timeout: float, step: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(step)
    return False


# --------------------------------------------------------------------------- the test


@pytest.mark.slow
def test_builds_killed_anywhere_leave_nothing_a_rebuild_does_not_repair(
        workspace, run_dtbuild, require_tool, tree_snapshot, tmp_path, subreaper, reaped) -> None:
    for tool in ("busybox", "unshare", "fakeroot", "bash", "tar"):
        require_tool(tool)
    files = tmp_path / "served"
    reference = workspace("every_kind", tmp_path / "reference")
    _add_busybox(reference)
    _write_remote(reference, files)
    started = time.monotonic()
    run_dtbuild.build(reference, "//...", check=True, env={"DTBUILD_CACHE_DIR": str(tmp_path / "reference-cache")})
    duration = time.monotonic() - started
    expected = tree_snapshot(reference / "dtbuild-out")

    ws = workspace("every_kind", tmp_path / "killed")
    _add_busybox(ws)
    _write_remote(ws, files)
    cache = tmp_path / "killed-cache"
    env = {"DTBUILD_CACHE_DIR": str(cache)}
    source = ws / "pkgs" / "site" / "index.html"
    original = source.read_bytes()

    rng = random.Random(SEED)
    kills: list[tuple[str, str]] = []  # (signal, phase)
    problems: list[str] = []
    modes: list[str] = []
    for round_no in range(MAX_ROUNDS):
        if len(kills) >= KILLS:
            break
        if not modes:
            modes = rng.sample(MODES, len(MODES))
        mode = modes.pop()
        # Most rounds (and all that wait for a root layer or for outputs to be written)
        # change a source that every image and the root layers depend on.
        if rng.random() < 0.8 or mode in ("root layer", "output writing"):
            source.write_bytes(original + f"<p>round {round_no}</p>\n".encode())
        sig = signal.SIGKILL
        if mode == "random":
            sig = rng.choice([signal.SIGKILL] * 4 + [signal.SIGINT, signal.SIGTERM])
        double = sig == signal.SIGINT and rng.random() < 0.5
        err_path = tmp_path / f"round-{round_no}.err"
        with open(err_path, "wb") as err:
            proc = run_dtbuild.popen(ws, "build", "//...", env=env, stdout=subprocess.DEVNULL, stderr=err)
        reaped.append(proc)
        if mode == "random":
            time.sleep(rng.uniform(0.0, duration))
        elif mode == "loading":
            time.sleep(rng.uniform(0.0, 0.4))
        elif mode == "root layer":
            _wait_until(proc, lambda p=proc.pid: _in_root_layer(p), timeout=duration * 3)
            time.sleep(rng.uniform(0.0, 0.2))
        else:
            _wait_until(proc, lambda p=proc.pid: _writing_outputs(p, ws), timeout=duration * 3, step=0.0005)
        if proc.poll() is not None:
            continue  # it finished first: no kill this round
        phase = _phase(proc, err_path, ws)
        proc.send_signal(sig)
        if double:
            time.sleep(0.1)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        kills.append((sig.name + (" twice" if double else ""), phase))
        try:
            code = proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            problems.append(f"round {round_no}: the build did not stop within {STOP_TIMEOUT:.0f} s of {sig.name}")
            continue
        stderr = err_path.read_text(errors="replace")
        if sig != signal.SIGKILL and "Traceback" in stderr:
            problems.append(f"round {round_no}: {sig.name} in {phase} gave a traceback:\n{stderr[-3000:]}")
        if sig != signal.SIGKILL and code == 0 and "stopping" in stderr:
            problems.append(f"round {round_no}: a build stopped by {sig.name} exited 0")
        deadline = time.monotonic() + ORPHAN_GRACE
        while (left := _reap_orphans()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            problems.append(f"round {round_no}: {sig.name} in {phase} left processes running: {left}")
            for line in left:
                os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)

    assert len(kills) >= KILLS, f"only {len(kills)} of {MAX_ROUNDS} builds were still running when signalled"
    phases = {phase for _, phase in kills}
    assert phases >= {"loading", "execution", "root layer", "output writing"}, kills
    assert {s for s, _ in kills} >= {"SIGKILL", "SIGINT", "SIGTERM"}, kills

    source.write_bytes(original)
    final = run_dtbuild.build(ws, "//...", env=env, check=True)
    assert final.summary["actions"]["failed"] == 0
    actual = tree_snapshot(ws / "dtbuild-out")
    differing = sorted(p for p in set(expected) | set(actual) if expected.get(p) != actual.get(p))
    assert differing == [], f"after {kills}: these differ from the reference build: {differing}"
    left_temps = [str(Path(d, n).relative_to(ws)) for d, dirs, names in os.walk(ws) for n in dirs + names
                  if TEMP_NAME.search(n)]
    assert left_temps == [], f"temporaries left in the workspace after {kills}: {left_temps}"
    tmp_dir = cache / "tmp"
    assert not tmp_dir.exists() or os.listdir(tmp_dir) == [], f"left in the cache's tmp/: {os.listdir(tmp_dir)}"
    assert _mounts_under(tmp_path) == [], "a mount was left behind"
    assert _reap_orphans() == [], "processes left behind"
    assert _pointing_into(tmp_path) == [], "processes left behind"
    assert problems == [], "\n".join(problems)


def test_a_build_removes_the_temporaries_of_dead_builds_but_not_those_of_live_ones(monorepo, run_dtbuild) -> None:
    run_dtbuild.build(monorepo, "//app:report", "//data:static", check=True)
    out = monorepo / "dtbuild-out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    planted = [out / "app" / f"report.txt.dtbuild-tmp-{dead.pid}-1",  # a half-written file output
               out / "data" / f"static.dtbuild-tmp-{dead.pid}-7",  # a half-written tree output
               out / "data" / f"static.dtbuild-old-{dead.pid}",  # a replaced tree not yet removed
               out / ".dtbuild" / f"outputs.json.dtbuild-tmp-{dead.pid}-3"]  # a state file
    live = out / ".dtbuild" / f"source-digests.json.dtbuild-tmp-{os.getpid()}-1"  # being written by `explain`
    for path in planted[1:3]:
        (path / "srv").mkdir(parents=True)
        (path / "srv" / "x").write_text("half")
    for path in (planted[0], planted[3], live):
        path.write_text("half")
    run_dtbuild.build(monorepo, "//app:report", "//data:static", check=True)
    assert [p for p in planted if os.path.lexists(p)] == []
    assert live.exists()
