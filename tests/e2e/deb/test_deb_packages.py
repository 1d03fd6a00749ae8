"""`deb_packages` and `dtbuild lock`, end to end against a signed apt repository made on
the fly (tests/debrepo.py) and served on 127.0.0.1: the lock resolves dependencies, an
alternative, a virtual package and an `all` package; the build gives one layer per
package, the dpkg database distroless writes, and an image runc runs. A tampered index, a
bad signature and a .deb that is not the locked one each fail with a clear error and leave
nothing in the cache; a warm cache builds offline. The last test does the same against
the Debian mirror this machine's apt uses (slow)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import debrepo
import pytest
from debrepo import Deb, Symlink

pytestmark = pytest.mark.e2e

GREETER_SCRIPT = b"#!/bin/sh\ncat /usr/lib/greet/greeting /usr/share/greet/words /usr/share/greet/fallback\n"

#: What `packages = ["greeter"]` locks: name -> (version, architecture, depends).
EXPECTED_LOCK = {
    "busybox-static": ("1:1.35.0-4", "amd64", []),
    "greet-data": ("2.0-1", "all", []),
    "greet-fallback": ("0.9", "amd64", []),
    # Pre-Depends, a virtual package (busybox, provided by busybox-static), an exact
    # version, and an alternative whose first choice exists nowhere.
    "greeter": ("3.0-1", "amd64", ["busybox-static", "greet-data", "greet-fallback", "libgreet1"]),
    # The higher of the two versions in the archive.
    "libgreet1": ("1.2-1", "amd64", []),
}

IMAGE_OUTPUT = ["hello from libgreet 1.2", "words from greet-data", "fallback chosen"]


def _packages(busybox: bytes) -> list[Deb]:
    return [
        Deb("busybox-static", "1:1.35.0-4", provides="busybox", compression="xz", files={
            "/bin/busybox": (busybox, 0o755), "/bin/sh": Symlink("busybox"), "/bin/cat": Symlink("busybox")}),
        Deb("libgreet1", "1.0-1", compression="gzip", files={"/usr/lib/greet/greeting": b"hello from libgreet 1.0\n"}),
        Deb("libgreet1", "1.2-1", compression="gzip", files={"/usr/lib/greet/greeting": b"hello from libgreet 1.2\n"}),
        Deb("greet-data", "2.0-1", architecture="all", compression="zstd",
            files={"/usr/share/greet/words": b"words from greet-data\n"}),
        Deb("greet-fallback", "0.9", files={"/usr/share/greet/fallback": b"fallback chosen\n",
                                            "/usr/lib/greet/helper": (b"#!/bin/sh\n", 0o4755)}),
        Deb("greeter", "3.0-1", pre_depends="libgreet1 (>= 1.2)",
            depends="busybox, greet-data (= 2.0-1), greet-missing (>= 1) | greet-fallback",
            files={"/usr/bin/greeter": (GREETER_SCRIPT, 0o755)}),
        # Neither is asked for nor depended on: neither may be locked (Essential and
        # priority required are not added implicitly).
        Deb("essential-base", "1", essential=True, priority="required", files={"/etc/essential": b"x\n"}),
        Deb("unrelated", "1", depends="greeter", files={"/etc/unrelated": b"x\n"}),
    ]


def _build_file(source: str, packages: tuple[str, ...] = ("greeter",)) -> str:
    return f'''
deb_packages(
    name = "base",
    sources = ["{source}"],
    keyring = "archive-keyring.gpg",
    packages = {json.dumps(list(packages))},
    architectures = ["amd64"],
    lockfile = "debian.lock.json",
)

layered_image(
    name = "img",
    tag = "v1",
    contents = [":base"],
    compressor = "none",
    config = {{"Entrypoint": ["/usr/bin/greeter"]}},
)

genrule(
    name = "app",
    srcs = ["hello.sh"],
    outs = ["usr/bin/hello.sh"],
    cmd = "cp $SRCS $OUTS && chmod 0755 $OUTS",
)

layered_image(
    name = "with_app",
    tag = "v1",
    contents = [":base", ":app"],
    compressor = "none",
    config = {{"Entrypoint": ["/usr/bin/hello.sh"]}},
)
'''


@pytest.fixture
def deb_ws(apt_repo, write_workspace, require_tool):
    """(workspace, served repository): //debian:base locks `greeter` from the repository."""
    require_tool("busybox")
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    served = apt_repo(_packages(busybox))
    ws = write_workspace({
        "debian/BUILD": _build_file(served.source),
        "debian/archive-keyring.gpg": served.repo.keyring.read_bytes(),
        "debian/hello.sh": "#!/bin/sh\necho app on $(cat /usr/share/greet/words)\n",
    })
    return ws, served


def _lock(ws: Path) -> dict:
    return json.loads((ws / "debian" / "debian.lock.json").read_text())


def _clean(err: str) -> None:
    assert "Traceback" not in err and "internal error" not in err, err


def _out(ws: Path, name: str) -> Path:
    return ws / "dtbuild-out" / "debian" / name


def _unpack(layout: Path, bundle: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], check=True, capture_output=True)
    return bundle / "rootfs"


def _runc(bundle: Path, env: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["terminal"] = False
    if env:
        config["process"]["env"] = [*config["process"].get("env", []), *env]
    config_path.write_text(json.dumps(config))
    return subprocess.run(["runc", "run", "-b", str(bundle), f"dtbuild-deb-{os.getpid()}-{bundle.name}"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _layer_members(layout: Path) -> list[list[str]]:
    """The member names of each layer of the OCI layout's (uncompressed) image, bottom first."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    out = []
    for layer in manifest["layers"]:
        with tarfile.open(blobs / layer["digest"][7:]) as tar:
            out.append([m.name.rstrip("/") for m in tar.getmembers()])
    return out


def _cache_holds(cache: Path, data: bytes) -> list[Path]:
    """Every file under the cache directory whose bytes are ``data``."""
    hits = []
    for path in cache.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size == len(data) and path.read_bytes() == data:
            hits.append(path)
    return hits


def _deb_md5sums(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-I", str(deb), "md5sums"], capture_output=True, text=True, check=True).stdout


# --------------------------------------------------------------------------- the lock


def test_lock_resolves_the_closure_and_records_what_the_build_needs(deb_ws, run_dtbuild) -> None:
    ws, served = deb_ws
    code, _, err = run_dtbuild(ws, "lock", "//debian:base")
    assert code == 0, err
    raw = (ws / "debian" / "debian.lock.json").read_text()
    lock = json.loads(raw)
    assert raw == json.dumps(lock, indent=2, sort_keys=True) + "\n"
    assert lock["version"] == 1 and lock["inputs_digest"].startswith("sha256:")
    assert lock["keyring_sha256"] == hashlib.sha256(served.repo.keyring.read_bytes()).hexdigest()
    (source,) = lock["sources"]
    assert (source["url"], source["suite"], source["components"]) == (served.url, "stable", ["main"])
    assert source["inrelease_sha256"] == hashlib.sha256((served.repo.dist / "InRelease").read_bytes()).hexdigest()
    entries = lock["architectures"]["amd64"]
    assert [e["name"] for e in entries] == sorted(EXPECTED_LOCK)
    for entry in entries:
        version, arch, depends = EXPECTED_LOCK[entry["name"]]
        assert (entry["version"], entry["architecture"], entry["depends"]) == (version, arch, depends), entry
        deb = next(p for p in served.repo.debs[entry["name"]] if f"_{version.split(':')[-1]}_" in p.name)
        assert entry["url"] == f"{served.url}/{deb.relative_to(served.repo.root)}"
        assert entry["sha256"] == hashlib.sha256(deb.read_bytes()).hexdigest()
        assert entry["size"] == deb.stat().st_size
    # Locking again changes nothing.
    run_dtbuild(ws, "lock", "//debian:base", check=True)
    assert (ws / "debian" / "debian.lock.json").read_text() == raw


def test_a_missing_or_stale_lock_names_the_command_to_run(deb_ws, run_dtbuild) -> None:
    ws, _ = deb_ws
    code, _, err = run_dtbuild(ws, "build", "//debian:img")
    assert code != 0
    _clean(err)
    assert "debian.lock.json" in err and "missing" in err and "dtbuild lock //debian:base" in err, err
    run_dtbuild(ws, "lock", "//debian:base", check=True)
    build = ws / "debian" / "BUILD"
    build.write_text(build.read_text().replace('packages = ["greeter"]', 'packages = ["greeter", "unrelated"]'))
    code, _, err = run_dtbuild(ws, "build", "//debian:img")
    assert code != 0
    _clean(err)
    assert "stale" in err and "dtbuild lock //debian:base" in err, err
    run_dtbuild(ws, "lock", "//debian:base", check=True)
    assert "unrelated" in [e["name"] for e in _lock(ws)["architectures"]["amd64"]]


def test_an_unknown_package_gets_did_you_mean(deb_ws, run_dtbuild) -> None:
    ws, _ = deb_ws
    build = ws / "debian" / "BUILD"
    build.write_text(build.read_text().replace('packages = ["greeter"]', 'packages = ["greter"]'))
    code, _, err = run_dtbuild(ws, "lock", "//debian:base")
    assert code != 0
    _clean(err)
    assert "greter" in err and "did you mean 'greeter'" in err, err
    assert not (ws / "debian" / "debian.lock.json").exists()


@pytest.mark.parametrize("damage", ["tamper_packages", "sign_with_other_key", "tamper_inrelease"])
def test_a_tampered_index_or_a_bad_signature_fails_the_lock_and_caches_nothing(deb_ws, run_dtbuild,
                                                                               damage) -> None:
    ws, served = deb_ws
    good = {path: path.read_bytes() for path in served.repo.dist.rglob("*") if path.is_file()}
    getattr(served.repo, damage)()
    # What must not be trusted: the edited index, or the InRelease whose signature fails.
    bad = ([p.read_bytes() for p in served.repo.packages_files()] if damage == "tamper_packages"
           else [(served.repo.dist / "InRelease").read_bytes()])
    code, _, err = run_dtbuild(ws, "lock", "//debian:base")
    assert code != 0
    _clean(err)
    assert served.url in err, err  # where
    if damage == "tamper_packages":  # what
        assert "Packages" in err and "sha256" in err.lower(), err
    else:
        assert "signature" in err.lower() and "InRelease" in err, err
    assert not (ws / "debian" / "debian.lock.json").exists()
    cache = run_dtbuild.cache_dir
    if cache.exists():
        for data in bad:
            assert _cache_holds(cache, data) == []
    # Fixed on the server, the same command works.
    for path, data in good.items():
        path.write_bytes(data)
    run_dtbuild(ws, "lock", "//debian:base", check=True)
    assert [e["name"] for e in _lock(ws)["architectures"]["amd64"]] == sorted(EXPECTED_LOCK)


# --------------------------------------------------------------------------- the build


def test_a_locked_build_gives_one_layer_per_package_the_dpkg_database_and_runs_in_runc(
        deb_ws, run_dtbuild, require_tool, tmp_path) -> None:
    for tool in ("umoci", "runc", "skopeo"):
        require_tool(tool)
    ws, served = deb_ws
    run_dtbuild(ws, "lock", "//debian:base", check=True)
    lock = _lock(ws)
    del served.requests[:]
    code, _, err = run_dtbuild(ws, "build", "//debian:img", "//debian:with_app")
    assert code == 0, err
    # The build never resolves: it asks for the locked .debs only, never for an index.
    assert sorted(set(served.requests)) == sorted(
        "/debian/" + e["url"].split("/debian/", 1)[1] for e in lock["architectures"]["amd64"])

    # One layer per package: each package's files (and its status.d entries) in a layer
    # of their own.
    layout = _out(ws, "img.oci")
    layers = _layer_members(layout)
    own_files = {
        "busybox-static": "bin/busybox", "greet-data": "usr/share/greet/words",
        "greet-fallback": "usr/share/greet/fallback", "greeter": "usr/bin/greeter",
        "libgreet1": "usr/lib/greet/greeting"}
    for name, path in own_files.items():
        holding = [i for i, members in enumerate(layers) if path in members]
        assert len(holding) == 1, (name, layers)
        members = layers[holding[0]]
        assert f"var/lib/dpkg/status.d/{name}" in members, members
        others = [p for n, p in own_files.items() if n != name]
        assert not any(p in members for p in others), members
    # Modes are the package's, setuid included, in the layer headers; owners are the
    # image's (root); nothing setuid lands on the host.
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / json.loads((layout / "index.json").read_text())["manifests"][0]["digest"][7:])
                          .read_text())
    (helper_layer,) = [layer for layer, members in zip(manifest["layers"], layers, strict=True)
                       if "usr/lib/greet/helper" in members]
    listing = subprocess.run(["tar", "-tvf", str(blobs / helper_layer["digest"][7:])], capture_output=True,
                             text=True, check=True).stdout
    (helper,) = [line for line in listing.splitlines() if line.endswith(" usr/lib/greet/helper")]
    assert helper.split()[:2] == ["-rwsr-xr-x", "root/root"], listing
    found = subprocess.run(["find", str(ws / "dtbuild-out"), str(run_dtbuild.cache_dir), "-perm", "/6000"],
                           capture_output=True, text=True, check=True).stdout
    assert found == ""
    inspected = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{layout}:v1"], capture_output=True,
                                          text=True, check=True).stdout)
    assert len(inspected["Layers"]) == len(layers) >= len(own_files) + 1

    # The dpkg database distroless writes, matching the packages.
    rootfs = _unpack(layout, tmp_path / "bundle")
    status_d = rootfs / "var" / "lib" / "dpkg" / "status.d"
    assert sorted(p.name for p in status_d.iterdir()) == sorted(
        [*own_files, *(f"{n}.md5sums" for n in own_files)])
    for entry in lock["architectures"]["amd64"]:
        (fields,) = debrepo.parse_paragraphs((status_d / entry["name"]).read_text())
        assert (fields["Package"], fields["Version"], fields["Architecture"]) == (
            entry["name"], entry["version"], entry["architecture"])
        assert fields["Status"] == "install ok installed"
        deb = next(p for p in served.repo.debs[entry["name"]]
                   if hashlib.sha256(p.read_bytes()).hexdigest() == entry["sha256"])
        control = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True).stdout
        for key, value in debrepo.parse_paragraphs(control)[0].items():
            assert fields[key] == value, (entry["name"], key)
        assert (status_d / f"{entry['name']}.md5sums").read_text() == _deb_md5sums(deb)
    assert (rootfs / "usr/bin/greeter").read_bytes() == GREETER_SCRIPT
    assert os.stat(rootfs / "usr/bin/greeter").st_mode & 0o777 == 0o755
    assert os.readlink(rootfs / "bin/sh") == "busybox"
    assert not (rootfs / "etc" / "essential").exists() and not (rootfs / "etc" / "unrelated").exists()

    done = _runc(tmp_path / "bundle")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == IMAGE_OUTPUT

    # Next to a genrule-built app: the Debian layers are the same bytes in both images.
    desc = json.loads(_out(ws, "img.json").read_text())
    with_app = json.loads(_out(ws, "with_app.json").read_text())
    package_layers = {layer["diff_id"] for layer in desc["layers"][:-1]}
    assert package_layers <= {layer["diff_id"] for layer in with_app["layers"]}
    done = _runc(_unpack(_out(ws, "with_app.oci"), tmp_path / "app-bundle").parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "app on words from greet-data\n"


def test_a_warm_cache_builds_offline(deb_ws, run_dtbuild, require_tool, tmp_path) -> None:
    for tool in ("umoci", "runc"):
        require_tool(tool)
    ws, served = deb_ws
    run_dtbuild(ws, "lock", "//debian:base", check=True)
    run_dtbuild(ws, "build", "//debian:img", check=True)
    served.stop()
    shutil.rmtree(ws / "dtbuild-out")
    build = ws / "debian" / "BUILD"
    build.write_text(build.read_text().replace('"Entrypoint": ["/usr/bin/greeter"]',
                                               '"Entrypoint": ["/bin/sh", "-c", "/usr/bin/greeter; echo offline"]'))
    code, _, err = run_dtbuild(ws, "build", "//debian:img")
    assert code == 0, err
    done = _runc(_unpack(_out(ws, "img.oci"), tmp_path / "bundle").parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [*IMAGE_OUTPUT, "offline"]


def test_a_deb_that_is_not_the_locked_one_fails_and_is_not_cached(deb_ws, run_dtbuild) -> None:
    ws, served = deb_ws
    run_dtbuild(ws, "lock", "//debian:base", check=True)
    entry = next(e for e in _lock(ws)["architectures"]["amd64"] if e["name"] == "greet-data")
    good = served.repo.replace_deb("greet-data")  # a valid .deb, other bytes
    bad = served.repo.deb("greet-data").read_bytes()
    for _ in range(2):  # the second time the failure is not served from a cache either
        code, _, err = run_dtbuild(ws, "build", "//debian:img")
        assert code != 0
        _clean(err)
        assert entry["url"] in err and entry["sha256"] in err, err  # where, and what was expected
        assert hashlib.sha256(bad).hexdigest() in err, err  # what came instead
        assert _cache_holds(run_dtbuild.cache_dir, bad) == []
    served.repo.replace_deb("greet-data", good)
    code, _, err = run_dtbuild(ws, "build", "//debian:img")
    assert code == 0, err


# --------------------------------------------------------------------------- a real mirror


def _configured_bookworm_mirror() -> str | None:
    """The URI of the first `deb` source for bookworm main in this machine's apt sources
    (deb822 files in sources.list.d, then the one-line sources.list)."""
    found: list[str] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in debrepo.parse_paragraphs("\n".join(
                line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))):
            if stanza.get("Enabled", "yes").lower() == "no" or "deb" not in stanza.get("Types", "").split():
                continue
            if "bookworm" in stanza.get("Suites", "").split() and "main" in stanza.get("Components", "").split():
                found.extend(stanza.get("URIs", "").split())
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if words[:1] != ["deb"]:
                continue
            words = words[1:]
            if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
                while words and not words[0].endswith("]"):
                    words = words[1:]
                words = words[1:]
            if len(words) >= 3 and words[1] == "bookworm" and "main" in words[2:]:
                found.append(words[0])
    http = [uri for uri in found if uri.startswith(("http://", "https://"))]
    return http[0].rstrip("/") if http else None


@pytest.mark.slow
def test_busybox_ca_certificates_and_tzdata_from_the_configured_debian_mirror(
        write_workspace, run_dtbuild, require_tool, tmp_path) -> None:
    for tool in ("umoci", "runc", "gpgv"):
        require_tool(tool)
    mirror = _configured_bookworm_mirror()
    if mirror is None:
        message = "this machine's apt has no http(s) source for bookworm main"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}, and CI=true", pytrace=False)
        pytest.skip(message)
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    assert keyring.is_file(), "debian-archive-keyring is installed with apt"
    ws = write_workspace({
        "debian/BUILD": f'''
deb_packages(
    name = "base",
    sources = ["{mirror} bookworm main"],
    keyring = "debian-archive-keyring.gpg",
    packages = ["busybox", "ca-certificates", "tzdata"],
    lockfile = "debian.lock.json",
)

layered_image(
    name = "img",
    tag = "v1",
    contents = [":base"],
    compressor = "none",
    config = {{"Entrypoint": ["/bin/busybox", "date", "+%Z %z"], "Env": ["TZ=Asia/Tokyo"]}},
)
''',
        "debian/debian-archive-keyring.gpg": keyring.read_bytes(),
    })
    run_dtbuild(ws, "lock", "//debian:base", check=True, timeout=900)
    entries = {e["name"]: e for e in _lock(ws)["architectures"]["amd64"]}
    assert {"busybox", "ca-certificates", "tzdata", "libc6"} <= set(entries), sorted(entries)
    assert all(e["url"].startswith(mirror + "/pool/") for e in entries.values())
    run_dtbuild(ws, "build", "//debian:img", check=True, timeout=900)
    rootfs = _unpack(_out(ws, "img.oci"), tmp_path / "bundle")
    assert (rootfs / "usr/share/zoneinfo/Asia/Tokyo").is_file()
    assert any((rootfs / "usr/share/ca-certificates/mozilla").glob("*.crt"))
    for name, entry in entries.items():
        (fields,) = debrepo.parse_paragraphs((rootfs / "var/lib/dpkg/status.d" / name).read_text())
        assert (fields["Package"], fields["Version"]) == (name, entry["version"])
    done = _runc(tmp_path / "bundle")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "JST +0900", done.stdout
