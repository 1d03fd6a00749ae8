"""The software bill of materials of images (``sbom = True``), checked as a scanner or an
auditor would: the SPDX document validates against the SPDX 2.3 JSON schema (shipped in
tests/fixtures/spdx, from the spdx/spdx-spec repository), lists exactly the regular
files (path and SHA256) of the root file system umoci unpacks, names for each package
the layers that `tar` shows holding its files, sits in the image's last layer at
/var/lib/dtbuild/sbom.spdx.json (runc prints it), and is the same bytes in another
workspace with another cache. The fixture is tests/fixtures/spdx/ws."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SPDX_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "spdx"
SBOM_PATH = "var/lib/dtbuild/sbom.spdx.json"
SBOM_IMAGES = ["plain_none", "plain_gz", "layered", "trimmed"]
APPLETS = ["rm", "echo", "cat"]  # no sh: bin_sh makes /bin/sh


@pytest.fixture
def ws(workspace, require_tool) -> Path:
    return _with_busybox(workspace("spdx/ws"), require_tool)


def _with_busybox(root: Path, require_tool: Callable[[str], str]) -> Path:
    require_tool("busybox")
    bindir = root / "base" / "rootfs" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", bindir / "busybox")
    for applet in APPLETS:
        (bindir / applet).symlink_to("busybox")
    return root


def _out(ws: Path, name: str) -> Path:
    return ws / "dtbuild-out" / "images" / name


def _document(ws: Path, name: str) -> dict:
    return json.loads(_out(ws, f"{name}.spdx.json").read_bytes())


def _validators() -> list:
    import jsonschema

    validators = []
    for schema_file in ("spdx-schema-2.3.json", "spdx-schema-2.3.1.json"):
        schema = json.loads((SPDX_DIR / schema_file).read_text())
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        validators.append(cls(schema))
    return validators


def _unpack(ws: Path, name: str, bundle: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--image", f"{_out(ws, name + '.oci')}:v1", str(bundle)], check=True,
                   capture_output=True)
    return bundle / "rootfs"


def _regular_files(rootfs: Path) -> dict[str, str]:
    """'./path' -> sha256 of every regular file below ``rootfs``."""
    found = {}
    for directory, _, names in os.walk(rootfs):
        for name in names:
            full = Path(directory, name)
            if stat.S_ISREG(full.lstat().st_mode):
                found["./" + str(full.relative_to(rootfs))] = hashlib.sha256(full.read_bytes()).hexdigest()
    return found


def _layer_blobs(ws: Path, name: str) -> list[tuple[str, Path]]:
    """(digest, blob path) of the image's layers, bottom first, as skopeo reads the layout."""
    layout = _out(ws, name + ".oci")
    done = subprocess.run(["skopeo", "inspect", f"oci:{layout}:v1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [(digest, layout / "blobs" / "sha256" / digest[7:]) for digest in json.loads(done.stdout)["Layers"]]


def _tar_listing(blob: Path, verbose: bool = False) -> list[str]:
    done = subprocess.run(["tar", "-tvf" if verbose else "-tf", str(blob)], capture_output=True, text=True,
                          check=True)
    return done.stdout.splitlines()


def _elements(doc: dict) -> tuple[dict[str, dict], dict[str, dict], dict[str, str]]:
    """Packages and files by SPDXID, and each file's package (the one that CONTAINS it)."""
    packages = {p["SPDXID"]: p for p in doc["packages"]}
    files = {f["SPDXID"]: f for f in doc["files"]}
    owner: dict[str, str] = {}
    for rel in doc["relationships"]:
        if rel["relationshipType"] == "CONTAINS" and rel["relatedSpdxElement"] in files:
            assert rel["relatedSpdxElement"] not in owner, f"{rel['relatedSpdxElement']} is in two packages"
            owner[rel["relatedSpdxElement"]] = rel["spdxElementId"]
    return packages, files, owner


# --------------------------------------------------------------------------- the document


def test_the_document_is_valid_spdx_and_lists_every_file_of_the_image(ws, run_dtbuild, require_tool,
                                                                       tmp_path) -> None:
    for tool in ("umoci", "skopeo", "tar"):
        require_tool(tool)
    run_dtbuild(ws, "build", *[f"//images:{name}" for name in SBOM_IMAGES], check=True)
    validators = _validators()
    for name in SBOM_IMAGES:
        doc = _document(ws, name)
        for validator in validators:
            errors = sorted(validator.iter_errors(doc), key=str)
            assert not errors, f"{name}: {errors[0]}"
        assert doc["spdxVersion"] == "SPDX-2.3" and doc["dataLicense"] == "CC0-1.0"
        packages, files, owner = _elements(doc)
        ids = ["SPDXRef-DOCUMENT", *packages, *files]
        assert len(ids) == len(set(ids)), f"{name}: duplicate SPDXIDs"
        for rel in doc["relationships"]:
            assert rel["spdxElementId"] in ids and rel["relatedSpdxElement"] in ids, rel
        assert {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                "relatedSpdxElement": "SPDXRef-Image"} in doc["relationships"]
        assert packages["SPDXRef-Image"]["name"] == f"//images:{name}"
        assert set(owner) == set(files), f"{name}: files that no package contains"

        # Every regular file umoci unpacks, with its sha256, and nothing else: the
        # document itself is the one file it leaves out.
        rootfs = _unpack(ws, name, tmp_path / name)
        listed = {f["fileName"]: next(c["checksumValue"] for c in f["checksums"] if c["algorithm"] == "SHA256")
                  for f in files.values()}
        on_disk = _regular_files(rootfs)
        assert on_disk.pop("./" + SBOM_PATH) == hashlib.sha256(_out(ws, f"{name}.spdx.json").read_bytes()).hexdigest()
        assert listed == on_disk, name
        assert [f["fileName"] for f in doc["files"]] == sorted(listed)

        # Each file's package names the layer that holds it: the topmost layer whose tar
        # lists the path. The document's own layer is the last one and holds only it.
        layers = _layer_blobs(ws, name)
        listings = [set(_tar_listing(blob)) for _, blob in layers]
        for file_id, item in files.items():
            path = item["fileName"][2:]
            top = max(i for i, listing in enumerate(listings) if path in listing)
            refs = {r["referenceLocator"] for r in packages[owner[file_id]].get("externalRefs", ())
                    if r["referenceType"] == "oci-layer-digest"}
            assert layers[top][0] in refs, f"{name}: {path} is in layer {top}, its package names {refs}"
        assert [line.split()[-1] for line in _tar_listing(layers[-1][1], verbose=True)] == [
            "var/", "var/lib/", "var/lib/dtbuild/", SBOM_PATH]
        assert all(line.startswith(("drwxr-xr-x 0/0", "-rw-r--r-- 0/0")) for line in
                   _tar_listing(layers[-1][1], verbose=True))


def test_files_are_attributed_to_the_packages_that_placed_them(ws, run_dtbuild) -> None:
    run_dtbuild(ws, "build", "//images:plain_none", "//images:layered", "//images:trimmed", check=True)

    def owners(name: str) -> dict[str, str]:
        doc = _document(ws, name)
        packages, files, owner = _elements(doc)
        return {files[f]["fileName"]: packages[p]["name"] for f, p in owner.items()}

    assert owners("plain_none") == {
        "./etc/made": "//images:plain_none",  # made by extra_commands: the image's own
        "./etc/also-made": "//images:plain_none",  # a hard link to it
        "./lib/libc/README": "//pkgs:libc", "./lib/libc/libc.txt": "//pkgs:libc",
        "./usr/share/app/data.txt": "//pkgs:app"}
    layered = owners("layered")
    assert layered["./custom.txt"] == "//images:layered"  # the customisation layer
    assert layered["./bin/busybox"] == "//base:busybox"
    assert layered["./usr/bin/tool.sh"] == "//pkgs:tool"
    # On the layered base: the root layer deleted /usr/bin/tool.sh and /lib/libc (whiteouts),
    # replaced /custom.txt and added /new.txt.
    assert owners("trimmed") == {
        "./bin/busybox": "//base:busybox", "./usr/share/app/data.txt": "//pkgs:app",
        "./custom.txt": "//images:trimmed", "./new.txt": "//images:trimmed"}
    doc = _document(ws, "layered")
    names = {p["SPDXID"]: p["name"] for p in doc["packages"]}
    depends = {(names[r["spdxElementId"]], names[r["relatedSpdxElement"]]) for r in doc["relationships"]
               if r["relationshipType"] == "DEPENDS_ON"}
    assert depends == {("//pkgs:app", "//pkgs:libc"), ("//pkgs:tool", "//pkgs:libc"),
                       ("//base:sh", "//base:busybox")}
    # //base:sh brings only the /bin/sh symlink: listed, without files.
    sh = next(p for p in doc["packages"] if p["name"] == "//base:sh")
    assert sh["filesAnalyzed"] is False and "packageVerificationCode" not in sh
    # Packages whose files are all gone are not in the image any more.
    assert {p["name"] for p in _document(ws, "trimmed")["packages"]} == {
        "//images:trimmed", "//base:busybox", "//base:sh", "//pkgs:app"}
    # created is the image's, in UTC.
    assert _document(ws, "plain_none")["creationInfo"]["created"] == "2024-05-06T05:08:09Z"
    assert doc["creationInfo"]["created"] == "1970-01-01T00:00:01Z"


def test_runc_shows_the_document_in_the_image(ws, run_dtbuild, require_tool, tmp_path) -> None:
    for tool in ("umoci", "runc"):
        require_tool(tool)
    run_dtbuild(ws, "build", "//images:trimmed", check=True)
    bundle = tmp_path / "bundle"
    _unpack(ws, "trimmed", bundle)
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["terminal"] = False
    config_path.write_text(json.dumps(config))
    done = subprocess.run(["runc", "run", "-b", str(bundle), f"dtbuild-sbom-{os.getpid()}"], capture_output=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout == _out(ws, "trimmed.spdx.json").read_bytes()


# --------------------------------------------------------------------------- reproducible, opt-in


def test_the_same_bytes_in_two_workspaces(workspace, run_dtbuild, require_tool, tmp_path) -> None:
    first = _with_busybox(workspace("spdx/ws"), require_tool)
    second = _with_busybox(workspace("spdx/ws"), require_tool)
    targets = [f"//images:{name}" for name in SBOM_IMAGES]
    run_dtbuild(first, "build", *targets, check=True)
    run_dtbuild(second, "build", *targets, check=True, env={"DTBUILD_CACHE_DIR": str(tmp_path / "other-cache")})
    for name in SBOM_IMAGES:
        assert _out(first, f"{name}.spdx.json").read_bytes() == _out(second, f"{name}.spdx.json").read_bytes()
        assert json.loads(_out(first, f"{name}.json").read_text())["manifest_digest"] == \
            json.loads(_out(second, f"{name}.json").read_text())["manifest_digest"]
    doc = _document(first, "plain_none")
    assert doc["documentNamespace"].startswith("https://spdx.org/spdxdocs/dtbuild/images-plain_none-")
    # The namespace follows the content: the gz image's layers have other digests.
    assert doc["documentNamespace"] != _document(first, "plain_gz")["documentNamespace"]


def test_the_sbom_is_one_more_layer_on_the_same_image(ws, run_dtbuild) -> None:
    run_dtbuild(ws, "build", "//images:plain_none", "//images:no_sbom", check=True)
    with_sbom = json.loads(_out(ws, "plain_none.json").read_text())
    without = json.loads(_out(ws, "no_sbom.json").read_text())
    assert with_sbom["layers"][:-1] == without["layers"]
    assert not _out(ws, "no_sbom.spdx.json").exists()
    doc = _document(ws, "plain_none")
    image = next(p for p in doc["packages"] if p["SPDXID"] == "SPDXRef-Image")
    assert {r["referenceLocator"] for r in image["externalRefs"] if r["referenceType"] == "oci-layer-digest"} == \
        {layer["digest"] for layer in without["layers"]}


def test_the_sbom_layer_counts_against_max_layers(write_workspace, run_dtbuild, require_tool) -> None:
    require_tool("skopeo")
    ws = write_workspace({
        "pkgs/BUILD": 'files(name = "a", srcs = ["a.txt"])\nfiles(name = "b", srcs = ["b.txt"])\n',
        "pkgs/a.txt": "a\n", "pkgs/b.txt": "b\n",
        "images/BUILD": (
            'layered_image(name = "three", tag = "v1", contents = ["//pkgs:a", "//pkgs:b"], max_layers = 3, '
            'sbom = True)\n'
            'layered_image(name = "two", contents = ["//pkgs:a"], max_layers = 2, sbom = True)\n')})
    run_dtbuild(ws, "build", "//images:three", check=True)
    assert len(_layer_blobs(ws, "three")) == 3  # both packages, the customisation layer, the sbom
    code, _, err = run_dtbuild(ws, "build", "//images:two")
    assert code == 2
    assert "images/BUILD:2" in err
    assert "2 layers are used by 'from_image' (0), the customisation layer (1) and the sbom layer (1), but only " \
           "max_layers = 2 were allowed" in err


def test_an_image_whose_var_lib_is_a_symlink_gets_a_clear_error(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"images/BUILD": (
        'image(name = "img", extra_commands = "mkdir -p srv/state var && ln -s ../srv/state var/lib", '
        'sbom = True)\n')})
    code, _, err = run_dtbuild(ws, "build", "//images:img")
    assert code == 1
    assert "the sbom goes to /var/lib/dtbuild/sbom.spdx.json, but /var/lib in the image is a symbolic link to " \
           "'../srv/state'" in err
    assert "sbom = False" in err
    assert "Traceback" not in err
