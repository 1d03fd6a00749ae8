"""Building from a ``deb_packages`` lock: the build never resolves, it fetches each locked
``.deb`` by its sha256 (here from file:// URLs of .debs made with dpkg-deb) and gives
one package per .deb, so a layered image has one layer per package, each holding its
dpkg database entry; the image runs in runc. A missing, stale or malformed lock fails
the build with the command that writes it; a warm cache builds with the .debs gone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SOURCES = ["http://deb.example.invalid/debian bookworm main"]
ARCHITECTURES = ["amd64"]
# shell: busybox and /bin/sh. app depends on libgreet and shell; libgreet on shell.
# ring-a and ring-b depend on each other (Debian has such cycles): both must arrive.
PACKAGES = ["app", "ring-a"]


def _control(name: str, version: str, arch: str, depends: str) -> str:
    lines = [f"Package: {name}", f"Version: {version}", f"Architecture: {arch}",
             "Maintainer: Test <test@example.invalid>", "Installed-Size: 4"]
    if depends:
        lines.append(f"Depends: {depends}")
    lines += [f"Description: the {name} package", " for tests."]
    return "\n".join(lines) + "\n"


def _deb(out: Path, name: str, version: str, arch: str, depends: str,
         files: dict[str, bytes | str | tuple[bytes, int]]) -> Path:
    """A .deb made with dpkg-deb (root-owned files, xz data), with an md5sums file. A
    file is its bytes (0755 under /bin/, else 0644), (bytes, mode), or a symlink's target."""
    root = out / f"root-{name}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(_control(name, version, arch, depends))
    sums = []
    for path, content in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):  # a symlink
            target.symlink_to(content)
            continue
        content, mode = content if isinstance(content, tuple) else (content, 0o755 if path.startswith("/bin/")
                                                                     else 0o644)
        target.write_bytes(content)
        target.chmod(mode)
        sums.append(f"{hashlib.md5(content).hexdigest()}  {path.lstrip('/')}\n")
    (root / "DEBIAN/md5sums").write_text("".join(sums))
    deb = out / f"{name}_{version.split(':')[-1]}_{arch}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)], check=True,
                   capture_output=True, env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"})
    shutil.rmtree(root)
    return deb


def inputs_digest(sources: list[str], packages: list[str], architectures: list[str]) -> str:
    """As the lock format documents it: sha256 of the canonical JSON of the three inputs."""
    text = json.dumps({"architectures": architectures, "packages": sorted(set(packages)), "sources": sources},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _entry(deb: Path, name: str, version: str, arch: str, depends: list[str]) -> dict:
    data = deb.read_bytes()
    return {"name": name, "version": version, "architecture": arch, "url": deb.as_uri(),
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "depends": sorted(depends)}


def _write_lock(path: Path, entries: list[dict], packages: list[str] = PACKAGES) -> None:
    lock = {"version": 1, "inputs_digest": inputs_digest(SOURCES, packages, ARCHITECTURES),
            "keyring_sha256": hashlib.sha256(b"keyring").hexdigest(),
            "sources": [{"url": "http://deb.example.invalid/debian", "suite": "bookworm", "components": ["main"],
                         "inrelease_sha256": "0" * 64, "date": "Sat, 10 May 2025 10:00:00 UTC"}],
            "architectures": {"amd64": sorted(entries, key=lambda e: e["name"])}}
    path.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")


BUILD = """
deb_packages(
    name = "debs",
    sources = {sources},
    keyring = "keyring.gpg",
    packages = {packages},
)

layered_image(
    name = "img",
    tag = "v1",
    contents = [":debs"],
    config = {{"Cmd": ["/bin/sh", "-c", "cat /usr/share/greeting; ls /var/lib/dpkg/status.d"]}},
    compressor = "none",
)
"""


@pytest.fixture
def deb_ws(write_workspace, require_tool, tmp_path: Path) -> tuple[Path, list[dict]]:
    require_tool("dpkg-deb")
    require_tool("busybox")
    pool = tmp_path / "pool"
    pool.mkdir()
    specs = [
        ("shell", "1:1.35.0-4", "amd64", [], {"/bin/busybox": Path(shutil.which("busybox") or "").read_bytes(),
                                              "/bin/sh": "busybox", "/bin/cat": "busybox", "/bin/ls": "busybox",
                                              "/usr/bin/su-ish": (b"setuid\n", 0o4755)}),
        ("libgreet", "2.0-1", "all", ["shell"], {"/usr/share/greeting": b"hello from a .deb\n"}),
        ("app", "1.0-1+b2", "amd64", ["libgreet", "shell"], {"/usr/share/app/README": b"app\n"}),
        ("ring-a", "1", "all", ["ring-b"], {"/usr/share/ring/a": b"a\n"}),
        ("ring-b", "1", "all", ["ring-a"], {"/usr/share/ring/b": b"b\n"}),
    ]
    entries = []
    for name, version, arch, depends, files in specs:
        deb = _deb(pool, name, version, arch, ", ".join(depends), files)
        entries.append(_entry(deb, name, version, arch, depends))
    ws = write_workspace({"base/BUILD": BUILD.format(sources=json.dumps(SOURCES), packages=json.dumps(PACKAGES)),
                          "base/keyring.gpg": b"keyring"})
    _write_lock(ws / "base/debian.lock.json", entries)
    return ws, entries


def _layer_blobs(ws: Path) -> list[Path]:
    """The layer blobs of the OCI layout (uncompressed tars: compressor none), in order."""
    layout = ws / "dtbuild-out/base/img.oci"
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs/sha256" / digest).read_text())
    return [layout / "blobs/sha256" / layer["digest"].split(":")[1] for layer in manifest["layers"]]


def _layers(ws: Path) -> list[list[str]]:
    """The member names of each layer, in order (tar -tf)."""
    return [subprocess.run(["tar", "-tf", str(blob)], capture_output=True, text=True, check=True).stdout.splitlines()
            for blob in _layer_blobs(ws)]


def test_a_locked_closure_builds_one_layer_per_package_with_its_dpkg_entry(
        deb_ws, run_dtbuild, require_tool, tmp_path: Path) -> None:
    for tool in ("tar", "skopeo", "umoci", "runc"):
        require_tool(tool)
    ws, _ = deb_ws
    run_dtbuild(ws, "build", "//base:img", check=True)
    inspected = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{ws / 'dtbuild-out/base/img.oci'}:v1"],
                                          capture_output=True, text=True, check=True).stdout)
    assert len(inspected["Layers"]) == 5 + 1  # five packages, then the customisation layer
    layers = _layers(ws)
    status = {name.rsplit("/", 1)[1]: number for number, names in enumerate(layers) for name in names
              if name.startswith("var/lib/dpkg/status.d/") and not name.endswith("/")}
    assert sorted(status) == sorted(f"{p}{suffix}" for p in ("app", "libgreet", "ring-a", "ring-b", "shell")
                                    for suffix in ("", ".md5sums"))
    for name in ("app", "libgreet", "ring-a", "ring-b", "shell"):
        assert status[name] == status[f"{name}.md5sums"]  # the entry travels with its package's files
    assert len(set(status.values())) == 5  # each package a layer of its own
    assert "bin/busybox" in layers[status["shell"]] and "usr/share/greeting" in layers[status["libgreet"]]
    # shell is the most popular (everything above needs it): the first layer.
    assert status["shell"] == 0
    # Owners are the image's (root), modes the package's, setuid bit included (tar -tvf).
    blob = _layer_blobs(ws)[0]
    listing = subprocess.run(["tar", "--numeric-owner", "-tvf", str(blob), "usr/bin/su-ish"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert listing[:2] == ["-rwsr-xr-x", "0/0"], listing

    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", *(["--rootless"] if os.geteuid() else []),
                    "--image", f"{ws / 'dtbuild-out/base/img.oci'}:v1", str(bundle)],
                   check=True, capture_output=True)
    rootfs = bundle / "rootfs"
    entry = (rootfs / "var/lib/dpkg/status.d/libgreet").read_text()
    assert entry.splitlines()[:4] == ["Package: libgreet", "Status: install ok installed", "Version: 2.0-1",
                                      "Architecture: all"]
    assert entry.endswith("Description: the libgreet package\n for tests.\n")
    md5 = hashlib.md5(b"hello from a .deb\n").hexdigest()
    assert (rootfs / "var/lib/dpkg/status.d/libgreet.md5sums").read_text() == f"{md5}  usr/share/greeting\n"
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["terminal"] = False
    config_path.write_text(json.dumps(config))
    done = subprocess.run(["runc", "run", "-b", str(bundle), f"dtbuild-deb-{os.getpid()}"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines[:4] == ["hello", "from", "a", ".deb"]
    assert sorted(lines[4:]) == sorted(f"{p}{s}" for p in ("app", "libgreet", "ring-a", "ring-b", "shell")
                                       for s in ("", ".md5sums"))


def test_a_warm_cache_builds_with_the_debs_gone(deb_ws, run_dtbuild, tmp_path: Path) -> None:
    ws, _ = deb_ws
    first = run_dtbuild.build(ws, "//base:img", check=True)
    assert first.executed > 0
    shutil.rmtree(tmp_path / "pool")  # as a machine without the network sees the mirror
    run_dtbuild(ws, "clean", check=True)
    again = run_dtbuild.build(ws, "//base:img", check=True)
    assert again.executed == 0, again.stderr


def test_a_missing_lock_names_the_command_to_run(deb_ws, run_dtbuild) -> None:
    ws, _ = deb_ws
    (ws / "base/debian.lock.json").unlink()
    code, _, err = run_dtbuild(ws, "build", "//base:img")
    assert code == 1, err
    assert "base/debian.lock.json is missing: run `dtbuild lock //base:debs`" in err


def test_a_stale_lock_names_the_command_to_run(deb_ws, run_dtbuild) -> None:
    ws, _ = deb_ws
    run_dtbuild(ws, "build", "//base:img", check=True)
    build = ws / "base/BUILD"
    build.write_text(build.read_text().replace('"ring-a"]', '"ring-a", "libgreet"]'))
    code, _, err = run_dtbuild(ws, "build", "//base:img")
    assert code == 1, err
    assert ("base/debian.lock.json is stale (sources, packages or architectures changed since it was written): "
            "run `dtbuild lock //base:debs`") in err


def test_a_malformed_lock_names_the_field(deb_ws, run_dtbuild) -> None:
    ws, entries = deb_ws
    broken = [dict(e, sha256="not-a-digest") if e["name"] == "libgreet" else e for e in entries]
    _write_lock(ws / "base/debian.lock.json", broken)
    code, _, err = run_dtbuild(ws, "build", "//base:img")
    assert code == 1, err
    assert "base/debian.lock.json is malformed: architectures.amd64[1] (libgreet).sha256 must be 64 lowercase " \
           "hex digits" in err
    (ws / "base/debian.lock.json").write_text("{\"version\": 1,\n")
    code, _, err = run_dtbuild(ws, "build", "//base:img")
    assert code == 1 and "base/debian.lock.json is not valid JSON (line 2" in err, err


def test_a_deb_whose_bytes_differ_from_the_lock_fails_and_caches_nothing(deb_ws, run_dtbuild) -> None:
    ws, entries = deb_ws
    shell = next(e for e in entries if e["name"] == "shell")
    deb = Path(shell["url"].removeprefix("file://"))
    deb.write_bytes(deb.read_bytes() + b"tampered")
    code, _, err = run_dtbuild(ws, "build", "//base:img")
    assert code == 1, err
    assert f"has the wrong sha256: expected {shell['sha256']}" in err
    code, _, err = run_dtbuild(ws, "build", "//base:img")
    assert code == 1 and "wrong sha256" in err, err  # not cached: fetched (and refused) again


def test_the_lock_is_no_action_input_and_an_unchanged_lock_is_a_no_op(deb_ws, run_dtbuild) -> None:
    ws, _ = deb_ws
    run_dtbuild(ws, "build", "//base:img", check=True)
    lock = ws / "base/debian.lock.json"
    lock.write_text(lock.read_text())  # touched, the same bytes
    again = run_dtbuild.build(ws, "//base:img", check=True)
    assert again.executed == 0


@pytest.mark.parametrize(("attrs", "message"), [
    ('sources = ["http://deb.example.invalid/debian bookworm"]',
     "the 'sources' attribute must hold sources of the form \"URL SUITE COMPONENT [COMPONENT...]\""),
    ('sources = ["deb http://deb.example.invalid/debian bookworm main"]',
     "the 'sources' attribute must start each source with an http, https or file URL"),
    ('architectures = ["amd46"]', "the 'architectures' attribute must hold Debian architectures"),
    ('lockfile = "../debian.lock.json"', "the 'lockfile' attribute must be a file name relative to"),
    ('packages = ["Busybox"]', "the 'packages' attribute must hold Debian package names"),
    ('packages = ["app", "app"]', "the 'packages' attribute lists 'app' twice"),
    ('keyring = ":two"', "the 'keyring' attribute must name one keyring file"),
])
def test_bad_attributes_are_errors_at_the_build_line(write_workspace, run_dtbuild, attrs: str, message: str) -> None:
    values = {"sources": json.dumps(SOURCES), "keyring": '"keyring.gpg"', "packages": '["app"]'}
    key = attrs.split(" = ", 1)[0]
    values[key] = attrs.split(" = ", 1)[1]
    body = ",\n    ".join(f"{k} = {v}" for k, v in values.items())
    ws = write_workspace({"base/BUILD": f'genrule(name = "two", outs = ["a", "b"], cmd = "touch $OUTS")\n'
                                        f'deb_packages(\n    name = "debs",\n    {body},\n)\n',
                          "base/keyring.gpg": "k"})
    code, _, err = run_dtbuild(ws, "build", "//base:debs")
    assert code == 2, err
    assert "base/BUILD:2: in deb_packages //base:debs: " + message in err, err
    if key == "architectures":
        assert "did you mean 'amd64'?" in err


def test_the_target_provides_its_sources_without_a_lock(deb_ws, monkeypatch) -> None:
    """What `dtbuild lock` reads: analysis works whatever the lock's state."""
    from dtbuild.engine.build import Session
    from dtbuild.engine.workspace import find_workspace
    from dtbuild.rules.builtin.deb import DebSourcesInfo

    ws, _ = deb_ws
    monkeypatch.setenv("DTBUILD_CACHE_DIR", str(ws.parent / "analysis-cache"))
    (ws / "base/debian.lock.json").unlink()
    session = Session(find_workspace(str(ws)))
    labels = session.expand(["//base:debs"])
    info = session.analyze(labels).targets[labels[0]].providers[DebSourcesInfo]
    assert isinstance(info, DebSourcesInfo)
    assert (info.sources, info.packages, info.architectures) == (tuple(SOURCES), ("app", "ring-a"), ("amd64",))
    assert info.lockfile == "base/debian.lock.json" and info.keyring.path == "base/keyring.gpg"
    assert info.inputs_digest == inputs_digest(SOURCES, PACKAGES, ARCHITECTURES)
