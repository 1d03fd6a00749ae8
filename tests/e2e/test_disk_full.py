"""A full disk while writing an output or a blob is a clear error (what, where, how much
room it needed, what to do) with exit status 1 and no traceback, and leaves no
half-written temporary; temporaries a killed build left under dtbuild-out/ are removed
by the next build."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

#: Bigger than the small file systems below, so writing it must fail.
BIG = 3_000_000
SMALL_FS = "2m"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``small_fs(name)``: a new 2 MB tmpfs mounted at tmp_path/name (needs root)."""
    mounted: list[Path] = []

    def mount(name: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if ".dtbuild-tmp-" in p.name or ".dtbuild-old-" in p.name)


BIG_GENRULE = f'genrule(name = "big", outs = ["big.bin"], cmd = "head -c {BIG} /dev/zero > $OUT")\n'


def test_a_full_workspace_disk_while_writing_an_output_is_a_clear_error(small_fs, write_workspace,
                                                                        run_dtbuild) -> None:
    ws = write_workspace({"pkg/BUILD": BIG_GENRULE}, name=small_fs("ws").name)  # the small fs' mount point

    build = run_dtbuild.build(ws, "//pkg:big")

    assert build.exit_code == 1, build.stderr
    assert "Traceback" not in build.stderr
    assert "no space left on the device while writing output dtbuild-out/pkg/big.bin" in build.stderr, build.stderr
    assert "it needs 3.0 MB" in build.stderr
    assert "hint: free space" in build.stderr and "DTBUILD_CACHE_DIR" in build.stderr
    assert temporaries(ws) == []
    assert not (ws / "dtbuild-out/pkg/big.bin").exists()


def test_a_full_cache_disk_while_writing_a_blob_is_a_clear_error(small_fs, write_workspace, run_dtbuild) -> None:
    cache = small_fs("cache")
    # merge_trees extracts the tarball's member into the cache as a blob (sources
    # themselves are read in place and never written there).
    member = io.BytesIO()
    with tarfile.open(fileobj=member, mode="w") as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = BIG
        tar.addfile(info, io.BytesIO(b"x" * BIG))
    ws = write_workspace({
        "pkg/big.tar": member.getvalue(),
        "pkg/BUILD": 'merge_trees(name = "data", srcs = ["big.tar"])\n',
    })

    build = run_dtbuild.build(ws, "//pkg:data", env={"DTBUILD_CACHE_DIR": str(cache)})

    assert build.exit_code == 1, build.stderr
    assert "Traceback" not in build.stderr
    assert f"no space left on the device while writing a blob to {cache}" in build.stderr, build.stderr
    assert "it needs 3.0 MB" in build.stderr
    assert "pkg/BUILD:1: in merge_trees //pkg:data" in build.stderr
    assert "move the cache to a larger one with DTBUILD_CACHE_DIR" in build.stderr
    # The half-written blob is gone: the disk is not left full.
    assert list((cache / "tmp").iterdir()) == []
    assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) < 100_000


@pytest.mark.slow
def test_the_next_build_removes_what_a_build_killed_while_writing_outputs_left(write_workspace,
                                                                               run_dtbuild) -> None:
    size = 300_000_000  # a copy that takes long enough to be caught in the middle
    # Executable, so dtbuild-out/ gets a copy (a hard link to the blob would be instant).
    ws = write_workspace({"pkg/BUILD": f'genrule(name = "big", outs = ["big.bin"], '
                                       f'cmd = "head -c {size} /dev/zero > $OUT && chmod +x $OUT")\n'})
    run_dtbuild.build(ws, "//pkg:big", check=True)
    # The copy can end between seeing its temporary and the kill landing (a loaded
    # machine), or before the poll sees its temporary at all (page-cache copies are
    # fast): then the build is run and killed again, until a kill catches one.
    seen = 0
    for _attempt in range(8):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ws / "dtbuild-out/pkg/big.bin")  # so the next build copies it out again
        proc = run_dtbuild.popen(ws, "build", "//pkg:big", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not temporaries(ws / "dtbuild-out") and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            caught = temporaries(ws / "dtbuild-out")
            proc.send_signal(signal.SIGKILL)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        seen += bool(caught)
        if temporaries(ws / "dtbuild-out"):
            break
    assert seen, "every build finished before its temporary could be seen"
    assert temporaries(ws / "dtbuild-out"), "no kill left a temporary: nothing to test"

    run_dtbuild.build(ws, "//pkg:big", check=True)

    assert temporaries(ws / "dtbuild-out") == []
    assert (ws / "dtbuild-out/pkg/big.bin").stat().st_size == size
