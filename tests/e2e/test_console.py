"""What `dtbuild build` shows while it works: a live display on a terminal (driven here
under a pseudo-terminal), one line per finished action in a pipe, every failure's reason
with --keep-going, --verbose and --quiet, and NO_COLOR / TERM=dumb honoured."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

#: Any escape sequence (CSI, as rich writes for styles and cursor moves, or another ESC).
ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|.)")
#: A style (SGR) sequence: colour, bold, ...
STYLE = re.compile(r"\x1b\[[0-9;]*m")

SLOW_BUILD = {
    "pkg/BUILD": 'genrule(name = "slow", outs = ["slow.txt"], cmd = "sleep 3; echo done > $OUT")\n',
}
CHAIN_BUILD = {
    "pkg/a.txt": "a\n",
    "pkg/BUILD": """
genrule(name = "one", srcs = ["a.txt"], outs = ["one.txt"], cmd = "cp $SRCS $OUT")
genrule(name = "two", srcs = [":one"], outs = ["two.txt"], cmd = "cp $SRCS $OUT")
genrule(name = "three", srcs = [":two"], outs = ["three.txt"], cmd = "cp $SRCS $OUT")
""",
}
TWO_FAILURES_BUILD = {
    "pkg/BUILD": """
genrule(name = "bad_one", outs = ["one.txt"], cmd = "echo the first reason >&2; exit 3")
genrule(name = "bad_two", outs = ["two.txt"], cmd = "echo the second reason >&2; exit 4")
genrule(name = "good", outs = ["good.txt"], cmd = "echo good > $OUT")
""",
}


def run_in_pty(run_dtbuild, cwd: Path, *args: str, env: dict[str, str] | None = None,
               timeout: float = 120.0) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as its standard output and error, as a user's
    shell would; return its exit code and everything it wrote, read as it was written."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    full_env = {"TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40", **(env or {})}
    proc = subprocess.Popen(run_dtbuild.argv(*args), cwd=cwd, env=run_dtbuild.env(full_env),
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            pytest.fail(f"dtbuild {' '.join(args)} did not finish in {timeout}s under a terminal")
        code = proc.wait(timeout=30)
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    return code, b"".join(chunks).decode("utf-8", "replace")


def plain(text: str) -> str:
    return ESCAPE.sub("", text.replace("\r", ""))


@pytest.mark.slow
def test_on_a_terminal_the_running_action_timer_advances(write_workspace, run_dtbuild) -> None:
    ws = write_workspace(SLOW_BUILD)
    code, out = run_in_pty(run_dtbuild, ws, "build", "//pkg:slow")
    assert code == 0, out
    text = plain(out)
    timers = re.findall(r"Genrule //pkg:slow +(\d+\.\d)s", text)
    # Redrawn while the action runs: its elapsed time moves on (it froze once).
    assert len(set(timers)) >= 2, text
    counters = re.findall(r"\[0/1\] 0 cached, (\d+\.\d)s", text)
    assert len(set(counters)) >= 2, text
    assert "Built 1 target(s): 1 action(s) executed" in text
    assert STYLE.search(out), "a terminal without NO_COLOR gets styles"
    # The summary ends with the elapsed time, the slowest action and the critical path.
    tail = text.strip().splitlines()[-2:]
    assert tail[0].startswith("Elapsed ") and "Slowest: Genrule //pkg:slow" in tail[0], text
    assert tail[1].startswith("critical path: ") and "Genrule //pkg:slow" in tail[1], text


def test_no_color_on_a_terminal_has_no_styles(write_workspace, run_dtbuild) -> None:
    ws = write_workspace(CHAIN_BUILD)
    code, out = run_in_pty(run_dtbuild, ws, "build", "//pkg:three", env={"NO_COLOR": "1"})
    assert code == 0, out
    assert not STYLE.search(out), repr(out)
    assert "Built 1 target(s): 3 action(s) executed" in plain(out)


def test_term_dumb_gets_plain_lines_without_any_escape_sequence(write_workspace, run_dtbuild) -> None:
    ws = write_workspace(CHAIN_BUILD)
    code, out = run_in_pty(run_dtbuild, ws, "build", "//pkg:three", env={"TERM": "dumb"})
    assert code == 0, out
    assert "\x1b" not in out, repr(out)
    lines = out.replace("\r", "").splitlines()
    assert [line.split()[0] for line in lines if line.startswith("[")] == ["[1/3]", "[2/3]", "[3/3]"], out


def test_in_a_pipe_one_line_per_finished_action(write_workspace, run_dtbuild) -> None:
    ws = write_workspace(CHAIN_BUILD)
    code, _, err = run_dtbuild(ws, "build", "//pkg:three")
    assert code == 0, err
    assert "\x1b" not in err
    lines = err.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert [line.split()[0] for line in progress] == ["[1/3]", "[2/3]", "[3/3]"], err
    assert [line.split()[2] for line in progress] == ["//pkg:one", "//pkg:two", "//pkg:three"], err
    assert all(re.fullmatch(r"\[\d/3\] Genrule //pkg:\w+ \d+\.\ds", line) for line in progress), err
    assert lines[-2].startswith("Elapsed ") and "Slowest: Genrule //pkg:" in lines[-2], err
    assert lines[-1].startswith("critical path: ") and "through 3 action(s)" in lines[-1], err

    # Again: every action is a cache hit, each said once.
    code, _, err = run_dtbuild(ws, "build", "//pkg:three")
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("[")] == [
        "[1/3] Genrule //pkg:one cached", "[2/3] Genrule //pkg:two cached", "[3/3] Genrule //pkg:three cached"]


def test_keep_going_shows_every_failure_and_lists_the_failed_targets(write_workspace, run_dtbuild) -> None:
    ws = write_workspace(TWO_FAILURES_BUILD)
    code, _, err = run_dtbuild(ws, "build", "//pkg:all", "--keep-going", "--jobs", "1")
    assert code == 1, err
    # Each reason once, with its command and output.
    for target, reason, command in (("//pkg:bad_one", "the first reason", "exit 3"),
                                    ("//pkg:bad_two", "the second reason", "exit 4")):
        assert err.count(reason) == 2, err  # once: in the command, and in the output tail
        assert f"in genrule {target}: Genrule failed: command exited with status {command[-1]}" in err, err
        assert f"command: echo {reason} >&2; {command}" in err, err
    # The summary lists both failed targets, one line each.
    summary = err[err.index("Build FAILED: 2 action(s) failed"):].splitlines()
    assert sorted(summary[1:3]) == ["  //pkg:bad_one: Genrule failed: command exited with status 3",
                                    "  //pkg:bad_two: Genrule failed: command exited with status 4"], err
    assert summary[3].startswith("Elapsed "), err
    assert (ws / "dtbuild-out/pkg/good.txt").read_text() == "good\n"


def test_without_the_reporter_the_command_line_still_says_why(write_workspace, run_dtbuild) -> None:
    ws = write_workspace(TWO_FAILURES_BUILD)
    code, _, err = run_dtbuild(ws, "-p", "no:reporter", "build", "//pkg:all", "-k", "-j", "1")
    assert code == 1, err
    assert "[1/" not in err
    assert err.count("ERROR: ") == 2 and "the first reason" in err and "the second reason" in err, err


def test_verbose_shows_commands_and_cache_keys(write_workspace, run_dtbuild) -> None:
    ws = write_workspace(CHAIN_BUILD)
    code, _, err = run_dtbuild(ws, "build", "//pkg:one", "--verbose")
    assert code == 0, err
    assert "Genrule //pkg:one: $ /bin/bash -c" in err and "cp $SRCS $OUT" in err, err
    assert re.search(r"^\[1/1\] Genrule //pkg:one \d+\.\ds  key [0-9a-f]{64}$", err, re.M), err
    # The key is the action's: the same on a cache hit (flags before the command work too).
    key = re.search(r"key ([0-9a-f]{64})", err)
    code, _, again = run_dtbuild(ws, "-v", "build", "//pkg:one")
    assert code == 0, again
    assert key is not None and f"[1/1] Genrule //pkg:one cached  key {key.group(1)}" in again, again


def test_quiet_shows_only_errors_and_the_summary(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({**CHAIN_BUILD,
                          "bad/BUILD": 'genrule(name = "bad", outs = ["x"], cmd = "echo why >&2; false")\n'})
    code, _, err = run_dtbuild(ws, "-q", "build", "//pkg:three")
    assert code == 0, err
    assert err.splitlines()[0].startswith("Built 1 target(s): 3 action(s) executed"), err
    code, _, err = run_dtbuild(ws, "build", "//bad:bad", "--quiet")
    assert code == 1, err
    assert err.startswith("ERROR: bad/BUILD:1: in genrule //bad:bad: Genrule failed"), err
    assert "why" in err and "[1/1]" not in err


@pytest.mark.slow
def test_on_a_terminal_a_download_has_a_bar_that_moves(write_workspace, run_dtbuild) -> None:
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    data = bytes(range(256)) * (4 * 4096)  # 4 MiB, sent over about 2 s
    sha = hashlib.sha256(data).hexdigest()

    class Slow(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for start in range(0, len(data), 128 << 10):
                self.wfile.write(data[start:start + (128 << 10)])
                self.wfile.flush()
                time.sleep(0.06)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/big.bin"
        ws = write_workspace({"BUILD": f'fetch_url(name = "big", urls = ["{url}"], sha256 = "{sha}")\n'})
        code, out = run_in_pty(run_dtbuild, ws, "build", "//:big")
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0, out
    text = plain(out)
    # The bar's byte counts, redrawn as the download goes: "download big.bin ... 1.2/4.0 MiB".
    shown = re.findall(r"download big\.bin.*?(\d+\.\d)/4\.0 MiB", text)
    assert len(set(shown)) >= 3, text
    assert [float(x) for x in shown] == sorted(float(x) for x in shown), shown
    assert (ws / "dtbuild-out" / "big").read_bytes() == data
