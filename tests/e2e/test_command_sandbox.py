"""Commands of actions (genrule ``cmd``, ``extra_commands`` and ``fakeroot_commands`` of
images and layered images) run in the command sandbox: a hostile command tries to write
host files (a canary outside the workspace, the user's home, the workspace's sources,
dtbuild-out, the cache) and to read secrets (a 0600 file, /etc/shadow, the home), and
the host is untouched. ``[sandbox] commands = "none"`` (or DTBUILD_SANDBOX=none) turns
the sandbox off, and then the same command does reach the host: the checks can fail."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

UNCONFINED = '[sandbox]\ncommands = "none"\n'
CANARY_MTIME_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09, so that a touch shows


@dataclass
class Host:
    """What a hostile command aims at, and the state to compare after the build."""

    ws: Path
    cache: Path
    host_dir: Path  # outside the workspace and the cache
    canary: Path
    secret: Path
    secret_text: str
    home: Path  # the user's real home
    home_marker: Path

    def attack(self, *, leak_to: str, everything: bool = True) -> str:
        """Shell lines (for a command whose working directory it may write) that try
        every escape; each may fail. ``leak_to``: where what it read goes."""
        lines = [
            f"echo pwned > {self.canary} || true",
            f"chmod 0777 {self.canary} || true",
            f"touch {self.host_dir}/new-file || true",
            f"echo planted > {self.ws}/pkg/planted.txt || true",
            f"echo '# planted' >> {self.ws}/pkg/BUILD || true",
            f"echo planted > {self.ws}/dtbuild-out/planted || true",
            f"echo planted > {self.cache}/planted || true",
            f"cat {self.secret} >> {leak_to} 2>/dev/null || true",
        ]
        if everything:
            lines += [
                f"touch {self.home_marker} || true",
                f"for f in $(find {self.cache}/cas {self.cache}/ac -type f 2>/dev/null); do "
                "echo tampered >> $f 2>/dev/null || true; done",
                f"cat /etc/shadow /etc/gshadow >> {leak_to} 2>/dev/null || true",
                # Markers computed by the shell, so that only the command's output holds them.
                f"echo HOME-LISTING-$((6*7))-BEGIN >> {leak_to}",
                f"ls -a {self.home} >> {leak_to} 2>/dev/null || true",
                f"echo HOME-LISTING-$((6*7))-END >> {leak_to}",
            ]
        return "\n".join(lines) + "\n"


def _stat_of(path: Path) -> tuple[bytes, int, int, int, int]:
    st = path.lstat()
    return path.read_bytes(), st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns


def _files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.fixture
def host(tmp_path: Path, write_workspace, run_dtbuild, require_tool):
    require_tool("bwrap")
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    canary = host_dir / "canary.txt"
    canary.write_text("canary\n")
    os.chmod(canary, 0o644)
    os.utime(canary, ns=(CANARY_MTIME_NS, CANARY_MTIME_NS))
    secret = host_dir / "secret.txt"
    secret_text = f"SECRET-{uuid.uuid4().hex}"
    secret.write_text(secret_text + "\n")
    os.chmod(secret, 0o600)
    home = Path(os.path.expanduser("~")).resolve()
    marker = home / f".dtbuild-sandbox-canary-{uuid.uuid4().hex}"
    ws = write_workspace({"pkg/data.txt": "data\n", "pkg/BUILD": ""})
    (ws / "dtbuild-out").mkdir()
    h = Host(ws, run_dtbuild.cache_dir, host_dir, canary, secret, secret_text, home, marker)
    try:
        yield h
    finally:
        if marker.exists():
            marker.unlink()


def _prime(h: Host, run_dtbuild, build_text: str) -> None:
    """Write the BUILD file and fill the cache with a harmless target's entries."""
    (h.ws / "pkg" / "BUILD").write_text(
        'genrule(name = "prime", srcs = ["data.txt"], outs = ["prime.txt"], cmd = "cat $SRCS > $OUT")\n'
        + build_text)
    run_dtbuild.build(h.ws, "//pkg:prime", check=True)


def _assert_host_untouched(h: Host, before: dict) -> None:
    assert _stat_of(h.canary) == before["canary"], "the command changed a host file"
    assert sorted(p.name for p in h.host_dir.iterdir()) == ["canary.txt", "secret.txt"], "it made a host file"
    assert not h.home_marker.exists(), "the command wrote into the user's home"
    assert not (h.ws / "pkg" / "planted.txt").exists(), "the command wrote into the source tree"
    assert (h.ws / "pkg" / "BUILD").read_bytes() == before["build"], "the command changed a BUILD file"
    assert not list(h.ws.rglob("planted*")), "the command wrote into dtbuild-out"
    assert not (h.cache / "planted").exists(), "the command wrote into the cache"
    cache_now = _files_under(h.cache)
    for rel, data in before["cache"].items():
        if rel in cache_now:
            assert cache_now[rel] == data, f"the command changed the cache's {rel}"
    for blob in (h.cache / "cas").rglob("*"):
        if blob.is_file():
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"the cache's {blob} was changed"


def _assert_nothing_leaked(h: Host) -> None:
    secrets = [h.secret_text.encode()]
    for name in ("/etc/shadow", "/etc/gshadow"):
        try:
            secrets += [line for line in Path(name).read_bytes().splitlines() if b":" in line]
        except OSError:  # not root: the test cannot read it either
            pass
    for root in (h.ws / "dtbuild-out", h.cache):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                for secret in secrets:
                    assert secret not in data, f"{path} holds a secret the command read"
                if b"HOME-LISTING-42-BEGIN" in data:
                    listing = data.split(b"HOME-LISTING-42-BEGIN", 1)[1].split(b"HOME-LISTING-42-END", 1)[0]
                    seen = set(listing.decode().split()) - {".", ".."} - _interpreter_dirs_in(h.home)
                    assert not seen, f"{path}: the command listed the user's home: {sorted(seen)}"


def _interpreter_dirs_in(home: Path) -> set[str]:
    """Entries of ``home`` that lead to the Python running dtbuild (the same as ours):
    commands of dtbuild's own (fakeroot's prologue) see it read-only, so its mount
    point shows; nothing else of the home does."""
    names = set()
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        path = Path(prefix).resolve()
        if path.is_relative_to(home) and path != home:
            names.add(path.relative_to(home).parts[0])
    return names


def _before(h: Host) -> dict:
    return {"canary": _stat_of(h.canary), "build": (h.ws / "pkg" / "BUILD").read_bytes(),
            "cache": _files_under(h.cache)}


# --------------------------------------------------------------------------- genrule


def test_a_genrule_command_cannot_reach_the_host(host: Host, run_dtbuild) -> None:
    _prime(host, run_dtbuild, f"""
genrule(name = "hostile", srcs = [":prime"], outs = ["hostile.txt"], cmd = '''
{host.attack(leak_to="$OUT")}
echo done >> $OUT
''')
""")
    before = _before(host)
    result = run_dtbuild.build(host.ws, "//pkg:hostile")
    _assert_host_untouched(host, before)
    _assert_nothing_leaked(host)
    assert result.exit_code == 0, result.stderr  # every attempt failed inside; the build did not
    out = (host.ws / "dtbuild-out" / "pkg" / "hostile.txt").read_text()
    assert out.endswith("done\n") and "pwned" not in out


def test_a_genrule_still_reads_its_inputs_and_uses_the_hosts_tools(write_workspace, run_dtbuild,
                                                                   require_tool) -> None:
    require_tool("bwrap")
    ws = write_workspace({"pkg/in.txt": "hello\n", "pkg/BUILD": '''
genrule(name = "tools", srcs = ["in.txt"], outs = ["out.txt"], cmd = """
tr a-z A-Z < $SRCS > $TMPDIR/upper
echo scratch > $HOME/note
cat $TMPDIR/upper $HOME/note > $OUT
echo private > /tmp/x && cat /tmp/x >> $OUT
""")
'''})
    run_dtbuild.build(ws, "//pkg:tools", check=True)
    assert (ws / "dtbuild-out" / "pkg" / "out.txt").read_text() == "HELLO\nscratch\nprivate\n"


@pytest.mark.parametrize("how", ["config", "env"])
def test_the_opt_out_lets_the_command_reach_the_host(host: Host, run_dtbuild, how) -> None:
    if how == "config":
        (host.ws / "dtbuild.toml").write_text(UNCONFINED)
    _prime(host, run_dtbuild, f"""
genrule(name = "hostile", outs = ["hostile.txt"], cmd = '''
{host.attack(leak_to="$OUT", everything=False)}
echo done >> $OUT
''')
""")
    env = {"DTBUILD_SANDBOX": "none"} if how == "env" else None
    run_dtbuild.build(host.ws, "//pkg:hostile", check=True, env=env)
    assert host.canary.read_text() == "pwned\n"
    assert (host.host_dir / "new-file").exists()
    assert (host.ws / "pkg" / "planted.txt").exists()
    assert (host.cache / "planted").exists()
    assert host.secret_text in (host.ws / "dtbuild-out" / "pkg" / "hostile.txt").read_text()


def test_the_environment_overrides_the_setting(host: Host, run_dtbuild) -> None:
    (host.ws / "dtbuild.toml").write_text(UNCONFINED)
    _prime(host, run_dtbuild, f"""
genrule(name = "hostile", outs = ["hostile.txt"], cmd = '''
{host.attack(leak_to="$OUT", everything=False)}
echo done >> $OUT
''')
""")
    before = _before(host)
    run_dtbuild.build(host.ws, "//pkg:hostile", check=True, env={"DTBUILD_SANDBOX": "bwrap"})
    _assert_host_untouched(host, before)
    _assert_nothing_leaked(host)


# --------------------------------------------------------------------------- images


def test_extra_commands_of_an_image_cannot_reach_the_host(host: Host, run_dtbuild) -> None:
    _prime(host, run_dtbuild, f"""
files(name = "data", srcs = ["data.txt"], prefix = "/srv")
image(name = "img", tag = "x", copy_to_root = [":data"], compressor = "none", extra_commands = '''
{host.attack(leak_to="srv/leaked.txt")}
''')
""")
    before = _before(host)
    run_dtbuild.build(host.ws, "//pkg:img", check=True)
    _assert_host_untouched(host, before)
    _assert_nothing_leaked(host)


@pytest.mark.parametrize("slot", ["extra_commands", "fakeroot_commands"])
def test_commands_of_a_layered_image_cannot_reach_the_host(host: Host, run_dtbuild, require_tool, slot) -> None:
    if slot == "fakeroot_commands":
        require_tool("fakeroot")
    _prime(host, run_dtbuild, f"""
files(name = "data", srcs = ["data.txt"], prefix = "/srv")
layered_image(name = "img", contents = [":data"], compressor = "none", {slot} = '''
{host.attack(leak_to="srv/leaked.txt")}
''')
""")
    before = _before(host)
    run_dtbuild.build(host.ws, "//pkg:img", check=True)
    _assert_host_untouched(host, before)
    _assert_nothing_leaked(host)


def test_the_opt_out_lets_extra_commands_reach_the_host(host: Host, run_dtbuild) -> None:
    (host.ws / "dtbuild.toml").write_text(UNCONFINED)
    _prime(host, run_dtbuild, f"""
files(name = "data", srcs = ["data.txt"], prefix = "/srv")
layered_image(name = "img", contents = [":data"], compressor = "none", extra_commands = '''
{host.attack(leak_to="srv/leaked.txt", everything=False)}
''')
""")
    run_dtbuild.build(host.ws, "//pkg:img", check=True)
    assert host.canary.read_text() == "pwned\n"
    assert (host.ws / "pkg" / "planted.txt").exists()


# --------------------------------------------------------------------------- stopping


def _processes_with(token: str, program: str | None = None) -> list[int]:
    """Processes whose command line holds ``token`` (and whose program is ``program``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(token.encode() in arg for arg in argv) and program in (None, argv[0].decode()):
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_stopped_build_takes_its_sandboxed_commands_with_it(write_workspace, run_dtbuild, require_tool,
                                                              reaped, tmp_path, signum) -> None:
    require_tool("bwrap")
    token = f"token-{uuid.uuid4().hex}"
    ws = write_workspace({"pkg/BUILD": f'genrule(name = "slow", outs = ["slow.txt"], '
                                       f'cmd = "sleep 120; echo {token} > $OUT")\n'})
    with open(tmp_path / "slow.err", "wb") as err:
        proc = run_dtbuild.popen(ws, "build", "//pkg:slow", start_new_session=True, stdout=subprocess.DEVNULL,
                                 stderr=err)
        reaped.append(proc)
        deadline = time.monotonic() + 60
        while not _processes_with(token, "/bin/bash"):  # the command itself: the sandbox is up
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "slow.err").read_text()
            time.sleep(0.05)
        if signum == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)  # dtbuild's group: the sandbox has a session of its own
        else:
            os.kill(proc.pid, signum)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _processes_with(token)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "the sandboxed command outlived its build"


# --------------------------------------------------------------------------- the setting


def test_a_bad_sandbox_setting_is_a_clear_error(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"pkg/BUILD": 'genrule(name = "a", outs = ["a.txt"], cmd = "echo > $OUT")\n'},
                         config='[sandbox]\ncommands = "bwarp"\n')
    code, _, err = run_dtbuild(ws, "build", "//pkg:a")
    assert code != 0
    assert "[sandbox] commands must be one of bwrap, none, but was 'bwarp'" in err
    assert "did you mean 'bwrap'?" in err and "Traceback" not in err
    (ws / "dtbuild.toml").write_text('[sandbox]\ncomands = "none"\n')
    code, _, err = run_dtbuild(ws, "build", "//pkg:a")
    assert code != 0 and "[sandbox] has no setting 'comands'" in err and "Traceback" not in err
    (ws / "dtbuild.toml").write_text("")
    code, _, err = run_dtbuild(ws, "build", "//pkg:a", env={"DTBUILD_SANDBOX": "off"})
    assert code != 0 and "DTBUILD_SANDBOX must be one of bwrap, none, but was 'off'" in err
