"""The test repository itself, checked with apt's and gpg's own tools (no dtbuild): what
the Debian package tests build on must be a repository apt would accept, and each way it
can be broken must be broken the way the tests say."""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
import urllib.request

import debrepo
import pytest
from debrepo import Deb, Symlink

PACKAGES = [
    Deb("libdemo1", "1:1.2-3", files={"/usr/lib/libdemo/demo.txt": b"demo\n"}, compression="gzip"),
    Deb("demo-data", "2.0", architecture="all", files={"/usr/share/demo/data": b"data\n"}, compression="zstd"),
    Deb("demo", "0.1~rc1-1", depends="libdemo1 (>= 1:1.0), demo-data | other-data", provides="demo-tool",
        pre_depends="libdemo1", files={"/usr/bin/demo": (b"#!/bin/sh\necho demo\n", 0o755),
                                       "/usr/bin/demo-link": Symlink("demo")}),
]


def _ar_members(data: bytes) -> list[str]:
    assert data[:8] == b"!<arch>\n"
    names, offset = [], 8
    while offset < len(data):
        header = data[offset:offset + 60]
        names.append(header[:16].decode().strip().rstrip("/"))
        size = int(header[48:58])
        offset += 60 + size + (size & 1)
    return names


def _release_sha256(release: dict[str, str]) -> dict[str, tuple[str, int]]:
    """Release's SHA256 field: path -> (digest, size)."""
    rows = [line.split() for line in release["SHA256"].splitlines() if line.strip()]
    return {path: (digest, int(size)) for digest, size, path in rows}


def test_the_repository_verifies_with_gpgv_and_its_hashes_chain(apt_repo, tmp_path) -> None:
    served = apt_repo(PACKAGES, suite="testing", codename="demo", arches=("amd64", "arm64"))
    repo = served.repo
    signed = debrepo.gpgv_verify(repo.keyring, repo.dist / "InRelease").decode()
    release, = debrepo.parse_paragraphs(signed)
    assert (release["Suite"], release["Codename"]) == ("testing", "demo")
    assert release["Architectures"] == "amd64 arm64" and release["Components"] == "main"
    sha256 = _release_sha256(release)
    for arch in ("amd64", "arm64"):
        for path in repo.packages_files(arch=arch):
            rel = str(path.relative_to(repo.dist))
            assert sha256[rel] == (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size), rel
        entries = debrepo.parse_paragraphs(repo.packages_files(arch=arch)[0].read_text())
        # arch-all packages are listed under every architecture, amd64 ones only under amd64.
        assert sorted(e["Package"] for e in entries) == (
            ["demo", "demo-data", "libdemo1"] if arch == "amd64" else ["demo-data"])
        for entry in entries:
            deb = (repo.root / entry["Filename"]).read_bytes()
            assert entry["SHA256"] == hashlib.sha256(deb).hexdigest() and int(entry["Size"]) == len(deb)
    # The detached signature verifies the same Release.
    subprocess.run(["gpgv", "--keyring", str(repo.keyring), str(repo.dist / "Release.gpg"),
                    str(repo.dist / "Release")], check=True, capture_output=True)
    # Served over HTTP: the bytes on disk.
    with urllib.request.urlopen(f"{served.url}/dists/testing/InRelease", timeout=30) as response:
        assert response.read() == (repo.dist / "InRelease").read_bytes()
    assert served.requests == ["/debian/dists/testing/InRelease"]


def test_the_debs_hold_what_was_asked(apt_repo, tmp_path) -> None:
    repo = apt_repo(PACKAGES).repo
    demo = repo.deb("demo")
    assert demo.name == "demo_0.1~rc1-1_amd64.deb" and repo.deb("libdemo1").name == "libdemo1_1.2-3_amd64.deb"
    fields = subprocess.run(["dpkg-deb", "-f", str(demo)], capture_output=True, text=True, check=True).stdout
    control, = debrepo.parse_paragraphs(fields)
    assert control["Depends"] == "libdemo1 (>= 1:1.0), demo-data | other-data"
    assert control["Pre-Depends"] == "libdemo1" and control["Provides"] == "demo-tool"
    assert _ar_members(repo.deb("demo-data").read_bytes())[-1] == "data.tar.zst"
    assert _ar_members(repo.deb("libdemo1").read_bytes())[-1] == "data.tar.gz"
    assert _ar_members(demo.read_bytes()) == ["debian-binary", "control.tar.xz", "data.tar.xz"]
    out = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(demo), str(out)], check=True)
    assert (out / "usr/bin/demo").stat().st_mode & 0o777 == 0o755
    assert (out / "usr/bin/demo-link").readlink().as_posix() == "demo"
    listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(demo)], capture_output=True, check=True).stdout
    tmp = tmp_path / "data.tar"
    tmp.write_bytes(listing)
    with tarfile.open(tmp) as tar:
        assert {(m.uid, m.gid, m.uname, m.gname) for m in tar.getmembers()} == {(0, 0, "root", "root")}
    md5sums = subprocess.run(["dpkg-deb", "-I", str(demo), "md5sums"], capture_output=True, text=True,
                             check=True).stdout
    script = PACKAGES[2].files["/usr/bin/demo"][0]
    assert md5sums == f"{hashlib.md5(script).hexdigest()}  usr/bin/demo\n"


@pytest.mark.parametrize("damage", ["sign_with_other_key", "tamper_inrelease"])
def test_a_broken_signature_fails_gpgv(apt_repo, damage) -> None:
    repo = apt_repo(PACKAGES).repo
    getattr(repo, damage)()
    with pytest.raises(subprocess.CalledProcessError):
        debrepo.gpgv_verify(repo.keyring, repo.dist / "InRelease")


def test_tampered_packages_and_replaced_debs_no_longer_match(apt_repo) -> None:
    repo = apt_repo(PACKAGES).repo
    release, = debrepo.parse_paragraphs(debrepo.gpgv_verify(repo.keyring, repo.dist / "InRelease").decode())
    listed = {path: digest for path, (digest, _) in _release_sha256(release).items()}
    entries = {e["Package"]: e for e in debrepo.parse_paragraphs(repo.packages_files()[0].read_text())}
    repo.tamper_packages()
    for path in repo.packages_files():
        assert listed[str(path.relative_to(repo.dist))] != hashlib.sha256(path.read_bytes()).hexdigest()
    old = repo.replace_deb("demo")
    new = repo.deb("demo").read_bytes()
    assert new != old and hashlib.sha256(old).hexdigest() == entries["demo"]["SHA256"]
    subprocess.run(["dpkg-deb", "-f", str(repo.deb("demo"))], check=True, capture_output=True)  # still a .deb
