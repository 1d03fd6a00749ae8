"""``dtbuild stream`` with the container tools of the supported platform (Debian 12:
podman 4.3, skopeo 1.9): the README's own pipeline loads the example image into podman,
and ``--compressor none|gz|zstd`` recompresses on the fly into archives that tools read.

Before: stream wrote the target's own compressor (gzip for the example image), which
podman 4.3 and skopeo 1.9 reject, so the README's `dtbuild stream //images:web | podman
load` failed as written.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: The leading bytes of each stream (none: a tar's "ustar" magic at offset 257).
MAGIC = {"gz": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}


@pytest.fixture
def example(tmp_path, run_dtbuild, require_tool) -> Path:
    """A built copy of the README's example workspace (its web server is compiled with cc)."""
    require_tool("cc")
    ws = tmp_path / "example"
    shutil.copytree(ROOT / "examples" / "workspace", ws, ignore=shutil.ignore_patterns("dtbuild-out"))
    run_dtbuild(ws, "build", "//images:web", check=True)
    return ws


def _description(ws: Path) -> dict:
    return json.loads((ws / "dtbuild-out" / "images" / "web.json").read_text())


def _podman_env(tmp_path: Path, request) -> tuple[dict[str, str], list[str]]:
    """podman's storage in the test's own directories: the variables that point podman
    there, and the podman command line that uses them."""
    root = tmp_path / "podman-root"
    runroot = Path(tempfile.mkdtemp(prefix="dtb-podman-", dir="/tmp"))  # podman: at most 50 characters
    request.addfinalizer(lambda: shutil.rmtree(runroot, ignore_errors=True))
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{root}"\nrunroot = "{runroot}"\n')
    return ({"CONTAINERS_STORAGE_CONF": str(conf)},
            ["podman", "--storage-driver", "vfs", "--root", str(root), "--runroot", str(runroot)])


def _readme_pipeline() -> str:
    """The README's stream pipeline, as a user copies it."""
    lines = re.findall(r"^\$ (dtbuild stream \S+ \| podman load)\s*$", README.read_text(), re.M)
    assert lines, "README.md shows no `$ dtbuild stream TARGET | podman load` line"
    return lines[0]


def test_the_readmes_stream_pipeline_loads_the_example_into_podman(example, run_dtbuild, require_tool, tmp_path,
                                                                    request) -> None:
    require_tool("podman")
    require_tool("bash")
    pipeline = _readme_pipeline()
    env, podman = _podman_env(tmp_path, request)
    # `dtbuild` on PATH is the CLI under test, whichever way the tests run it.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "dtbuild").write_text(f'#!/bin/sh\nexec {shlex.join(run_dtbuild.argv())} "$@"\n')
    (bindir / "dtbuild").chmod(0o755)
    env["PATH"] = f"{bindir}:{os.environ['PATH']}"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], cwd=example, env=run_dtbuild.env(env),
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{pipeline}\n{done.stdout}\n{done.stderr}"
    assert "Loaded image: localhost/web:latest" in done.stdout + done.stderr, done.stdout + done.stderr

    desc = _description(example)
    inspected = subprocess.run([*podman, "image", "inspect", "localhost/web:latest"], capture_output=True,
                               text=True, timeout=60, env={**os.environ, **env})
    assert inspected.returncode == 0, inspected.stderr
    (image,) = json.loads(inspected.stdout)
    assert "sha256:" + image["Id"] == desc["config_digest"]
    assert image["RootFS"]["Layers"] == [layer["diff_id"] for layer in desc["layers"]]
    assert image["Config"]["Entrypoint"] == ["/usr/bin/httpd"]
    assert image["Config"]["Cmd"] == ["8080", "/srv/www"]
    # What the loaded image holds: the site the BUILD file puts at /srv/www.
    show = f'cat "$({shlex.join(podman)} image mount localhost/web:latest)/srv/www/index.html"'
    argv = ["sh", "-c", show] if os.geteuid() == 0 else [*podman, "unshare", "sh", "-c", show]
    page = subprocess.run(argv, capture_output=True, timeout=60, env={**os.environ, **env})
    subprocess.run([*podman, "image", "unmount", "localhost/web:latest"], capture_output=True, timeout=60,
                   env={**os.environ, **env})
    assert page.returncode == 0, page.stderr
    assert page.stdout == (example / "web" / "site" / "index.html").read_bytes()


def _stream(ws: Path, run_dtbuild, path: Path, *flags: str) -> bytes:
    with open(path, "wb") as out:
        done = subprocess.run(run_dtbuild.argv("stream", "//images:web", *flags), cwd=ws, stdout=out,
                              stderr=subprocess.PIPE, env=run_dtbuild.env(), timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    return path.read_bytes()


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _check_docker_archive(directory: Path, desc: dict) -> None:
    """What a docker-archive reader checks: manifest.json names the config and the layer
    files, the config's digest is its name, each layer file's digest is its diff_id."""
    (entry,) = json.loads((directory / "manifest.json").read_text())
    assert entry["RepoTags"] == ["web:latest"]
    config = directory / entry["Config"]
    assert _sha256(config) == desc["config_digest"] == "sha256:" + entry["Config"].removesuffix(".json")
    diff_ids = json.loads(config.read_text())["rootfs"]["diff_ids"]
    assert [_sha256(directory / name) for name in entry["Layers"]] == diff_ids
    assert diff_ids == [layer["diff_id"] for layer in desc["layers"]]


@pytest.mark.parametrize("compressor", ["none", "gz", "zstd"])
def test_stream_recompresses_into_archives_tools_read(example, run_dtbuild, require_tool, tmp_path,
                                                      compressor) -> None:
    for tool in ("skopeo", "tar", "gzip", "zstd"):
        require_tool(tool)
    desc = _description(example)
    plain = _stream(example, run_dtbuild, tmp_path / "web-default.tar")
    assert plain[257:262] == b"ustar", "the default stream is not an uncompressed tar"
    data = _stream(example, run_dtbuild, tmp_path / f"web-{compressor}", "--compressor", compressor)
    archive = tmp_path / f"web-{compressor}"
    if compressor == "none":
        assert data == plain
    else:
        assert data.startswith(MAGIC[compressor])
        tool = {"gz": ["gzip", "-dc"], "zstd": ["zstd", "-dc"]}[compressor]
        decompressed = subprocess.run([*tool, str(archive)], capture_output=True, check=True, timeout=60).stdout
        # Recompressed, not rewritten: the same layer tars, manifest and config.
        assert decompressed == plain
    if compressor == "gz":
        # The target's own compressor: the bytes `dtbuild build` writes.
        assert data == (example / "dtbuild-out" / "images" / "web.tar.gz").read_bytes()
        assert gzip.decompress(data) == plain

    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    tar_flags = {"none": [], "gz": ["-z"], "zstd": ["--zstd"]}[compressor]
    subprocess.run(["tar", "-x", *tar_flags, "-f", str(archive), "-C", str(unpacked)], check=True,
                   capture_output=True, timeout=60)
    _check_docker_archive(unpacked, desc)

    # skopeo 1.9 (Debian 12) rejects every gzip-compressed docker-archive ("archive/tar:
    # invalid tar header"), its own bug: it reads the gz stream decompressed; none and zstd as streamed.
    readable = archive if compressor != "gz" else tmp_path / "web-gz-decompressed.tar"
    if compressor == "gz":
        readable.write_bytes(gzip.decompress(data))
    done = subprocess.run(["skopeo", "inspect", f"docker-archive:{readable}"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    inspected = json.loads(done.stdout)
    assert inspected["Layers"] == [layer["diff_id"] for layer in desc["layers"]]
    assert inspected["Env"] == ["PATH=/usr/bin"]


@pytest.mark.parametrize("compressor", ["gz", "zstd"])
def test_a_recompressed_stream_imports_as_the_same_image(example, run_dtbuild, tmp_path, compressor) -> None:
    """dtbuild's own docker-archive reader (image_archive) takes the gz and zstd streams
    back: the same config and layers."""
    extension = {"gz": ".gz", "zstd": ".zst"}[compressor]
    (example / "reimport").mkdir()
    _stream(example, run_dtbuild, example / "reimport" / f"web.tar{extension}", "--compressor", compressor)
    (example / "reimport" / "BUILD").write_text(f'image_archive(name = "web", src = "web.tar{extension}")\n')
    run_dtbuild(example, "build", "//reimport:web", check=True)
    imported = json.loads((example / "dtbuild-out" / "reimport" / "web.json").read_text())
    original = _description(example)
    assert imported["config_digest"] == original["config_digest"]
    assert [layer["diff_id"] for layer in imported["layers"]] == [layer["diff_id"] for layer in original["layers"]]


def test_an_unknown_compressor_is_a_usage_error_before_anything_is_built(example, run_dtbuild) -> None:
    code, out, err = run_dtbuild(example, "stream", "//images:web", "--compressor", "zsdt")
    assert code == 2 and out == "", err
    assert "--compressor must be one of gz, none, zstd, but was 'zsdt'" in err
    assert "did you mean 'zstd'?" in err
    code, out, err = run_dtbuild(example, "stream", "//images:web", "--compressor", "xz")
    assert code == 2 and out == "", err
    assert "but was 'xz'" in err and "dtbuild plugins" in err


def test_stream_help_says_the_default_is_uncompressed_and_why(example, run_dtbuild) -> None:
    code, out, err = run_dtbuild(example, "stream", "--help")
    assert code == 0, err
    assert "--compressor NAME" in out and "none (the default)" in out
    assert "podman 4.3 and skopeo 1.9" in out
    assert "dtbuild stream //images:web | podman load" in out
