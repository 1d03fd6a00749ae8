"""BUILD files that would crash, hang or exhaust the interpreter end in a clear exit-2
error at the BUILD line, never a traceback, a Rust backtrace or a signal; Ctrl-C stops
an evaluation that runs long; and a very deep dependency chain analyses."""

from __future__ import annotations

import signal
import time

import pytest

pytestmark = pytest.mark.e2e


def _clean_error(run, where: str, *words: str) -> None:
    assert run.exit_code == 2, (run.exit_code, run.stderr[-2000:])
    assert "Traceback" not in run.stderr and "panicked" not in run.stderr and "stack backtrace" not in run.stderr
    assert f"ERROR: {where}" in run.stderr, run.stderr
    for word in words:
        assert word in run.stderr, run.stderr


@pytest.mark.parametrize(("source", "where", "word"), [
    (b'x = 1\ny = "caf\xe9"\n', "pkg/BUILD:2:9", "not UTF-8"),
    (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "pkg/BUILD:1:", "nested"),
    (b"x = " + b"-" * 200_000 + b"1\n", "pkg/BUILD:1", "operators"),
    (b'x = "ab"\nfor i in range(40):\n    x = x + x\n', "pkg/BUILD", "too large"),
], ids=["not-utf8", "deep-brackets", "operator-chain", "string-blow-up"])
def test_hostile_build_file_is_a_clear_error(write_workspace, run_dtbuild, source, where, word) -> None:
    ws = write_workspace({"pkg/BUILD": source})
    for command in (("query", "//pkg:all"), ("build", "//pkg:all")):
        _clean_error(run_dtbuild(ws, *command, env={"RUST_BACKTRACE": "1"}), where, word)


@pytest.mark.slow
def test_endless_loop_hits_the_step_limit(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"pkg/BUILD": "def f():\n    for i in range(1000000000):\n        for j in range(9):\n"
                                       "            pass\nf()\n"})
    _clean_error(run_dtbuild(ws, "query", "//pkg:all", timeout=300), "pkg/BUILD:", "steps")


@pytest.mark.parametrize("command", ["query", "build"])
def test_ctrl_c_stops_a_long_evaluation(write_workspace, run_dtbuild, command) -> None:
    ws = write_workspace({"pkg/BUILD": "def f():\n    for i in range(1000000000):\n        pass\nf()\n"})
    proc = run_dtbuild.popen(ws, command, "//pkg:all", stderr=-1)
    time.sleep(2)
    assert proc.poll() is None, "the evaluation should still be running"
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == 1, err.decode()
    assert "interrupted" in err.decode()
    assert "Traceback" not in err.decode()


def test_a_dependency_chain_deeper_than_the_recursion_limit(write_workspace, run_dtbuild) -> None:
    depth = 3000
    lines = ['genrule(name = "t0", outs = ["t0.txt"], cmd = "echo 0 > $OUT")']
    lines += [f'files(name = "t{i}", deps = [":t{i - 1}"])' for i in range(1, depth)]
    lines.append(f'files(name = "top", srcs = [":t0"], deps = [":t{depth - 1}"])')
    ws = write_workspace({"pkg/BUILD": "\n".join(lines) + "\n"})
    _, out, _ = run_dtbuild(ws, "query", f"deps(//pkg:t{depth - 1})", check=True)
    assert len(out.split()) == depth
    built = run_dtbuild.build(ws, "//pkg:top", check=True)
    assert "Traceback" not in built.stderr
    assert (ws / "dtbuild-out" / "pkg" / "top" / "t0.txt").read_text() == "0\n"
