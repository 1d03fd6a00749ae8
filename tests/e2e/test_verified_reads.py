"""A cache blob whose bytes changed behind a restored mtime (bit rot, a raw write) is
caught the first time its bytes are read: copied under dtbuild-out/, or read by an
action kind. The blob is deleted, the action that wrote it runs again (action
rewinding), and the build ends with the right bytes and says what it rebuilt."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

#: The mtime the store gives every blob (engine/store.py SENTINEL_MTIME_NS).
SENTINEL_MTIME_NS = 10**18

IMAGE_WORKSPACE = {
    "app/hello.txt": "hello from a layer\n",
    "app/BUILD": 'files(name = "data", srcs = ["hello.txt"], prefix = "/app")\n'
                 'image(name = "img", tag = "v1", copy_to_root = [":data"], compressor = "gz")\n',
}


def corrupt_blob(cache: Path, digest: str) -> Path:
    """Flip one byte in the middle of a blob, keeping its size, mode and sentinel mtime:
    nothing but its bytes says it is wrong."""
    path = cache / "cas" / digest[:2] / digest
    data = bytearray(path.read_bytes())
    assert data, "an empty blob cannot be corrupted in place"
    data[len(data) // 2] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    os.chmod(path, 0o444)
    os.utime(path, ns=(SENTINEL_MTIME_NS, SENTINEL_MTIME_NS))
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(ws: Path, tree_snapshot) -> dict:
    return tree_snapshot(ws / "dtbuild-out", exclude=(".dtbuild",))


def action_results(cache: Path) -> dict[Path, dict]:
    """Every action result in the cache by its file: {"outputs": ..., "meta": ...}."""
    return {p: json.loads(p.read_bytes())["result"] for p in (cache / "ac").glob("*/*")}


def assert_rebuilt_once(build, producer: str) -> None:
    assert build.exit_code == 0, build.stderr
    assert "Traceback" not in build.stderr
    assert "corrupt cache entry rebuilt" in build.stderr, build.stderr
    assert f"{producer} ran again" in build.stderr, build.stderr
    assert build.summary["actions"].get("rewound") == 1, build.summary


def test_a_corrupt_file_output_is_rebuilt_when_it_is_copied_out(monorepo, run_dtbuild, cache_dir,
                                                                 tree_snapshot) -> None:
    run_dtbuild.build(monorepo, "//app:report", check=True)
    expected = outputs(monorepo, tree_snapshot)
    corrupt_blob(cache_dir, sha256_of(monorepo / "dtbuild-out/app/report.txt"))
    shutil.rmtree(monorepo / "dtbuild-out")  # so the build must copy the output again

    build = run_dtbuild.build(monorepo, "//app:report")

    assert_rebuilt_once(build, "Genrule")
    assert outputs(monorepo, tree_snapshot) == expected
    # The rebuilt blob is whole: the next build from scratch is a plain cache hit.
    shutil.rmtree(monorepo / "dtbuild-out")
    again = run_dtbuild.build(monorepo, "//app:report", check=True)
    assert again.executed == 0 and "rewound" not in again.summary["actions"]
    assert outputs(monorepo, tree_snapshot) == expected


@pytest.mark.parametrize("which", ["generated", "source"])
def test_a_corrupt_file_inside_a_tree_output_is_rebuilt(monorepo, run_dtbuild, cache_dir, tree_snapshot,
                                                        which) -> None:
    """//app:app is a files tree holding a genrule's output (report.txt) and a source
    (main.sh): the blob is traced to what first wrote it (the genrule, or the workspace
    file), not to the files action that only names it."""
    run_dtbuild.build(monorepo, "//app:app", check=True)
    expected = outputs(monorepo, tree_snapshot)
    name = "report.txt" if which == "generated" else "main.sh"
    corrupt_blob(cache_dir, sha256_of(monorepo / "dtbuild-out/app/app/opt/app" / name))
    shutil.rmtree(monorepo / "dtbuild-out")

    build = run_dtbuild.build(monorepo, "//app:app")

    if which == "generated":
        assert_rebuilt_once(build, "Genrule")
    else:
        assert build.exit_code == 0, build.stderr
        assert "corrupt cache entry rebuilt" in build.stderr and "read again from the workspace" in build.stderr
        assert build.summary["actions"].get("rewound") == 1, build.summary
    assert outputs(monorepo, tree_snapshot) == expected


@pytest.mark.parametrize(("reader", "slot"), [("DockerArchive", "blob"), ("ImageAssemble", "meta")])
def test_a_corrupt_blob_read_by_a_downstream_action_is_rebuilt(write_workspace, run_dtbuild, cache_dir,
                                                               tree_snapshot, reader, slot) -> None:
    """A layer's compressed blob (read by DockerArchive) or its metadata (read by
    ImageAssemble) is corrupted and the reader's result deleted, so the reader must run
    and read the bad bytes: LayerWrite runs again, then the reader, and the image is
    byte for byte the one a clean build gives."""
    ws = write_workspace(IMAGE_WORKSPACE)
    run_dtbuild.build(ws, "//app:img", check=True)
    expected = outputs(ws, tree_snapshot)
    results = action_results(cache_dir)
    (layer,) = [r for r in results.values() if r["meta"]["mnemonic"] == "LayerWrite"]
    corrupt_blob(cache_dir, layer["outputs"][slot]["digest"])
    for path, result in results.items():
        if result["meta"]["mnemonic"] == reader:
            path.unlink()
    shutil.rmtree(ws / "dtbuild-out")

    build = run_dtbuild.build(ws, "//app:img")

    assert_rebuilt_once(build, "LayerWrite")
    assert outputs(ws, tree_snapshot) == expected
    fresh = write_workspace(IMAGE_WORKSPACE, name="fresh")
    run_dtbuild.build(fresh, "//app:img", check=True, env={"DTBUILD_CACHE_DIR": str(cache_dir.parent / "fresh")})
    assert outputs(fresh, tree_snapshot) == expected


def test_stream_stops_at_a_corrupt_blob_and_the_next_run_rebuilds_it(write_workspace, run_dtbuild,
                                                                      cache_dir) -> None:
    """``stream`` has written bytes before the end of a blob shows it is wrong: it stops
    with a clear error (before writing the blob's last bytes) and the blob is gone, so
    the next run rebuilds it."""
    ws = write_workspace(IMAGE_WORKSPACE)
    code, good, err = run_dtbuild(ws, "stream", "//app:img")
    assert code == 0, err
    (layer,) = [r for r in action_results(cache_dir).values() if r["meta"]["mnemonic"] == "LayerWrite"]
    corrupt_blob(cache_dir, layer["outputs"]["blob"]["digest"])

    code, _, err = run_dtbuild(ws, "stream", "//app:img")
    assert code == 1, err
    assert "Traceback" not in err
    assert "was corrupt" in err and layer["outputs"]["blob"]["digest"] in err, err

    code, again, err = run_dtbuild(ws, "stream", "//app:img")
    assert code == 0, err
    assert again == good
