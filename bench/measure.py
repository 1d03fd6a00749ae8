"""What the benchmarks measure of one process and its children: wall and CPU seconds,
peak RSS and bytes written.

* wall: `time.perf_counter()` around the process, start to exit;
* CPU, peak RSS: the rusage `os.wait4` returns for the child, which on Linux covers the
  child and every descendant it waited for (CPU summed, RSS the largest single process);
* bytes written: the difference of `write_bytes` in /proc/self/io before and after. The
  kernel adds a reaped child's I/O counters (its own and those of the children it
  reaped) to its parent's, so the difference is what the process tree wrote: bytes it
  dirtied in the page cache, whether or not they reached the disk before a file was
  deleted (that part is `cancelled_write_bytes`, not subtracted).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MIB = 2**20


@dataclass(frozen=True, slots=True)
class Measured:
    wall: float
    #: user + system seconds of the process and its children (less sensitive than wall
    #: time to other work on the machine; blind to waiting for the disk).
    cpu: float
    #: the largest resident set of any one process of the tree, bytes.
    peak_rss: int
    #: bytes the process tree wrote (/proc/<pid>/io write_bytes), 0 where unknown.
    written: int
    stdout: str = ""


def _write_bytes() -> int:
    try:
        with open("/proc/self/io") as io:
            for line in io:
                key, _, value = line.partition(":")
                if key == "write_bytes":
                    return int(value)
    except OSError:
        pass
    return 0


def run_measured(argv: list[str] | str, *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 shell: bool = False, keep_stdout: bool = False) -> Measured:
    """Run one command to its end and measure it; exits with its stderr when it fails.

    stdout goes to /dev/null unless `keep_stdout` (then to a temp file, whose bytes count
    as written)."""
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        written = _write_bytes()
        start = time.perf_counter()
        process = subprocess.Popen(argv, cwd=cwd, env=env, shell=shell, stdin=subprocess.DEVNULL,
                                   stdout=out if keep_stdout else subprocess.DEVNULL, stderr=err,
                                   executable="/bin/bash" if shell else None)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        written = _write_bytes() - written
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            err.seek(0)
            command = argv if shell else " ".join(map(str, argv))
            raise SystemExit(f"`{command}` in {cwd or os.getcwd()} exited {process.returncode}:\n"
                             f"{err.read().decode(errors='replace')[-3000:]}")
        out.seek(0)
        return Measured(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, written,
                        out.read().decode(errors="replace") if keep_stdout else "")


def median(runs: list[Measured]) -> Measured:
    """Median wall and CPU seconds and bytes written (each on its own), largest peak RSS."""
    return Measured(statistics.median(r.wall for r in runs), statistics.median(r.cpu for r in runs),
                    max(r.peak_rss for r in runs), int(statistics.median(r.written for r in runs)))


def dtbuild_command(python: str) -> list[str]:
    """The console script beside `python` (as a user runs it), else `python -m`."""
    script = Path(python).parent / "dtbuild"
    return [str(script)] if script.exists() else [python, "-m", "dtbuild.engine.cli"]


def print_table(header: list[str], rows: list[list[str]], left: int = 1) -> None:
    """A table under a rule: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(f"{c:<{w}}" if n < left else f"{c:>{w}}"
                         for n, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    print(line(header))
    print("-" * len(line(header)))
    for row in rows:
        print(line(row))


def remove(path: Path) -> None:
    """Remove a directory tree, read-only parts included (the store's blobs are 0444)."""
    def retry(func, failed, _exc):  # type: ignore[no-untyped-def]
        os.chmod(os.path.dirname(failed), 0o755)
        func(failed)

    if path.exists():
        shutil.rmtree(path, onerror=retry)
