"""The bytes of built images are pinned: the same inputs give the same manifest, config and
layer digests, docker-archives, OCI layouts and NAME.json files, release after release.

The workspace below is fixed text (no host binaries), and covers every writer of image
documents: image with and without a base and with a content tag, layered_image, each
built-in compressor, the OCI layout (index.json, oci-layout), the docker-archive
(manifest.json, repositories, legacy layer json), merge_images, and image_archive reading
a docker-archive and an OCI layout back.

When a change to the bytes is deliberate (a format fix, a new compressor library), update
PINNED in its own commit and say in it which outputs changed and why: the failure message
prints the new values. gzip and zstd bytes depend on the compression libraries, whose
versions are part of the compressors' VERSION (checked first, so a library upgrade reads
as such rather than as a format change)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

BUILD = """
files(name = "etc", srcs = ["motd", "os-release"], prefix = "/etc")
files(name = "data", srcs = ["hello.txt", "run.sh"], prefix = "/app")
files(name = "libc", srcs = ["libc.so"], prefix = "/lib")
files(name = "app_pkg", srcs = ["app.bin"], prefix = "/usr/bin", deps = [":libc"])

image(
    name = "base",
    tag = "1",
    copy_to_root = [":etc"],
    config = {"Env": ["PATH=/bin", "GREETING=base"]},
    compressor = "none",
)

[image(
    name = "app_" + compressor,
    tag = "v1",
    image_name = "app",
    from_image = ":base",
    copy_to_root = [":data"],
    config = {"Env": ["GREETING=app"], "Entrypoint": ["/bin/sh", "/app/run.sh"], "Cmd": ["x"],
              "WorkingDir": "/app", "User": "1000:1000", "Labels": {"org.example": "pinned"}},
    uid = 1000,
    gid = 1000,
    compressor = compressor,
) for compressor in ["none", "gz", "zstd"]]

image(name = "untagged", copy_to_root = [":data"], compressor = "gz")

layered_image(
    name = "layered",
    tag = "v1",
    contents = [":app_pkg", ":data"],
    extra_commands = "mkdir -p var/log/app",
    compressor = "gz",
)

merge_images(name = "merged", images = [":app_gz", ":layered", ":untagged"], compressor = "none")

# The docker-archive of app_zstd and the OCI layout of app_gz, read back.
genrule(name = "app_tar", srcs = [":app_zstd"], outs = ["app-copy.tar.zst"],
        cmd = "for f in $SRCS; do case $f in *.tar.zst) cp $f $OUT_DIR/app-copy.tar.zst;; esac; done")
image_archive(name = "from_archive", src = ":app_tar")
image_archive(name = "from_merged", src = ":merged", index = 1)
"""

FILES = {
    "pkg/BUILD": BUILD,
    "pkg/motd": "pinned digests\n",
    "pkg/os-release": "ID=pinned\n",
    "pkg/hello.txt": "hello from the app\n" * 20,
    "pkg/run.sh": "#!/bin/sh\necho hello\n",
    "pkg/libc.so": "not really a library\n" * 50,
    "pkg/app.bin": "not really a program\n" * 50,
}

IMAGES = ("base", "app_none", "app_gz", "app_zstd", "untagged", "layered", "from_archive", "from_merged",
          "from_layout")
COMPRESSOR_VERSIONS = {"gz": "1;isal=1.9.1;level=2;block=1048576", "zstd": "1;zstandard=0.25.0;level=3;mt"}

# Computed with the code before the image formats got one owner; see the module docstring
# before changing a value. One deliberate change since: the index.json of every NAME.oci
# now gives each manifest its "platform" (the config's architecture and os), which the
# image-spec's index says SHOULD be present for a platform-specific manifest and which the
# other OCI layout writer already wrote; nothing else of any output changed.
PINNED: dict[str, Any] = {
    "app_gz": {
        "archive": "sha256:08c48276cf985b97bd70dbdbb70a93e577a432df057f84f13812b8b5e04881e4",
        "config_digest": "sha256:9c99843f5763e0fdb4859d4a1690e46d176bc7af12a149d83aef8ae4fa94b367",
        "layers": [
            [
                "sha256:e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                "sha256:e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                3584,
                "application/vnd.oci.image.layer.v1.tar"
            ],
            [
                "sha256:e88279ae2e81119c63a0bc6ab6f3d56c8f99d0ef3d06107414c7ab1d7b5bfbb9",
                "sha256:7efeb684085debfc08c2f8874a15998423153aa0cc4568aaedb9a2f5d2849406",
                217,
                "application/vnd.oci.image.layer.v1.tar+gzip"
            ]
        ],
        "manifest_digest": "sha256:e02c58b3cb701aabea2cf1b66d1017eebfb88fb358d708abf91f185b770674c2",
        "name.json": "sha256:5ab6cde71032624ac4c48e43bf92022a662caeac9ab705663345870e32d18a5d",
        "oci": {
            "blobs": [
                "9c99843f5763e0fdb4859d4a1690e46d176bc7af12a149d83aef8ae4fa94b367",
                "e02c58b3cb701aabea2cf1b66d1017eebfb88fb358d708abf91f185b770674c2",
                "e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                "e88279ae2e81119c63a0bc6ab6f3d56c8f99d0ef3d06107414c7ab1d7b5bfbb9"
            ],
            "index.json": "sha256:d6e1d1977f6917a81317bd620fb155b88987fff884845df49c05afa722e8ccd1",
            "oci-layout": "sha256:18f0797eab35a4597c1e9624aa4f15fd91f6254e5538c1e0d193b2a95dd4acc6"
        },
        "repo_tags": [
            "app:v1"
        ]
    },
    "app_none": {
        "archive": "sha256:6c6c34e0fdde77ba735ee676440cf791b7b5b26179bdef3b21bbf9c913b77d48",
        "config_digest": "sha256:8a6411ae7454bb2ffd756c017acbbb3a4b02a523620c8c02e25d22010eca4cdc",
        "layers": [
            [
                "sha256:e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                "sha256:e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                3584,
                "application/vnd.oci.image.layer.v1.tar"
            ],
            [
                "sha256:7efeb684085debfc08c2f8874a15998423153aa0cc4568aaedb9a2f5d2849406",
                "sha256:7efeb684085debfc08c2f8874a15998423153aa0cc4568aaedb9a2f5d2849406",
                3584,
                "application/vnd.oci.image.layer.v1.tar"
            ]
        ],
        "manifest_digest": "sha256:7bcd745662f799239f99d8f757933fc49aae5e81d28baa7347576851166bf17d",
        "name.json": "sha256:b4c80660eae073f2a29565ae789db70142787f9ad1bc66ef43b2f21d75e48f16",
        "repo_tags": [
            "app:v1"
        ]
    },
    "app_zstd": {
        "archive": "sha256:29dd2494261188aec428d1e40f1af75fd6c872adff810139fdf69727c3020a77",
        "config_digest": "sha256:78830ad398698f43700fc36a15f8229f8159e649ebaa549dff3a343a39f10dbb",
        "layers": [
            [
                "sha256:e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                "sha256:e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                3584,
                "application/vnd.oci.image.layer.v1.tar"
            ],
            [
                "sha256:6ced47286a28d36bd7b833032bd14eecbe72774477d2b93d6fce566d70e48700",
                "sha256:7efeb684085debfc08c2f8874a15998423153aa0cc4568aaedb9a2f5d2849406",
                195,
                "application/vnd.oci.image.layer.v1.tar+zstd"
            ]
        ],
        "manifest_digest": "sha256:4c639fa2c3b1eea337baaba09c4c0333174e8b9300fa4ed6f6a1d8cdae2abb83",
        "name.json": "sha256:00a6fb559121aa98318031fb1e2736597a9ce3930eb1f2b4ba13aa686d878f31",
        "repo_tags": [
            "app:v1"
        ]
    },
    "base": {
        "archive": "sha256:fd10a37cc33fc0f94319ad2c08fd8773ba411dbb1b3873e9b74ab8fce672a552",
        "config_digest": "sha256:0fe62c9ae75b9867beefa889a1ba0ac950da4ed4f2332f725c184ec7dd095ac0",
        "layers": [
            [
                "sha256:e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                "sha256:e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                3584,
                "application/vnd.oci.image.layer.v1.tar"
            ]
        ],
        "manifest_digest": "sha256:22d6471ff470b22af8459859e31737dceb15d7fb443d4d2a5623ad13587adaa0",
        "name.json": "sha256:081ea4df83843339f07851a338827dee6659d75377e1b6889c099d0b9ae01435",
        "oci": {
            "blobs": [
                "0fe62c9ae75b9867beefa889a1ba0ac950da4ed4f2332f725c184ec7dd095ac0",
                "22d6471ff470b22af8459859e31737dceb15d7fb443d4d2a5623ad13587adaa0",
                "e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355"
            ],
            "index.json": "sha256:21ca2ac427e5a5d4a8acd4042fd50edd4924bf563897b33a6cbb36a4f213d21a",
            "oci-layout": "sha256:18f0797eab35a4597c1e9624aa4f15fd91f6254e5538c1e0d193b2a95dd4acc6"
        },
        "repo_tags": [
            "base:1"
        ]
    },
    "from_archive": {
        "config_digest": "sha256:78830ad398698f43700fc36a15f8229f8159e649ebaa549dff3a343a39f10dbb",
        "layers": [
            [
                "sha256:e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                "sha256:e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                3584,
                "application/vnd.oci.image.layer.v1.tar"
            ],
            [
                "sha256:7efeb684085debfc08c2f8874a15998423153aa0cc4568aaedb9a2f5d2849406",
                "sha256:7efeb684085debfc08c2f8874a15998423153aa0cc4568aaedb9a2f5d2849406",
                3584,
                "application/vnd.oci.image.layer.v1.tar"
            ]
        ],
        "manifest_digest": "sha256:4837e5ca203111082bc5a0f004d5f62a015d47173e69dc52c802870afd05f507",
        "name.json": "sha256:369611cf94cc84bba4a9eb77d93c4d2ac1b7b8282637535d4a7ed5ad77ed7894",
        "repo_tags": [
            "app:v1"
        ]
    },
    "from_layout": {
        "config_digest": "sha256:9c99843f5763e0fdb4859d4a1690e46d176bc7af12a149d83aef8ae4fa94b367",
        "layers": [
            [
                "sha256:e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                "sha256:e312d212f390275005a2a0fad16ac4deaf2fd04af7c831b362ee0bb8c763f355",
                3584,
                "application/vnd.oci.image.layer.v1.tar"
            ],
            [
                "sha256:e88279ae2e81119c63a0bc6ab6f3d56c8f99d0ef3d06107414c7ab1d7b5bfbb9",
                "sha256:7efeb684085debfc08c2f8874a15998423153aa0cc4568aaedb9a2f5d2849406",
                217,
                "application/vnd.oci.image.layer.v1.tar+gzip"
            ]
        ],
        "manifest_digest": "sha256:e02c58b3cb701aabea2cf1b66d1017eebfb88fb358d708abf91f185b770674c2",
        "name.json": "sha256:6a92b3981eca07e2a24a14ee2f7e9e9eb2d55111928085d827d1a22692df4aea",
        "repo_tags": [
            "app:v1"
        ]
    },
    "from_merged": {
        "config_digest": "sha256:d6f5f951a4a489961cf9a3cd2824aa3492317044ecca524edcc13f942e494733",
        "layers": [
            [
                "sha256:f02e97d7783a9d308f41090c7a2ce8762ed952c001c8243e1a002296a2613227",
                "sha256:f02e97d7783a9d308f41090c7a2ce8762ed952c001c8243e1a002296a2613227",
                3584,
                "application/vnd.oci.image.layer.v1.tar"
            ],
            [
                "sha256:fdfe77ec457c946421b3075d0334d973ed835a5471d62570615867b5bf0e8284",
                "sha256:fdfe77ec457c946421b3075d0334d973ed835a5471d62570615867b5bf0e8284",
                4096,
                "application/vnd.oci.image.layer.v1.tar"
            ],
            [
                "sha256:a69151927e1e2428745078e2acb2f33ac19105a94fe639a7f3a7bc91a04d3688",
                "sha256:a69151927e1e2428745078e2acb2f33ac19105a94fe639a7f3a7bc91a04d3688",
                3584,
                "application/vnd.oci.image.layer.v1.tar"
            ],
            [
                "sha256:e99753b0b0fb0f76e09604aaf1dc651a7d1da464b66ff6d519f600916737bda3",
                "sha256:e99753b0b0fb0f76e09604aaf1dc651a7d1da464b66ff6d519f600916737bda3",
                2560,
                "application/vnd.oci.image.layer.v1.tar"
            ]
        ],
        "manifest_digest": "sha256:4d52dc2a71ed885aa1ec2a928383a2fbb4477acc4e0c6341c191d46ffcfb102c",
        "name.json": "sha256:044fb8ed122eb109b480aa0c828e8ebefcc7a243249943dbad17134fdb8e0628",
        "repo_tags": [
            "layered:v1"
        ]
    },
    "layered": {
        "archive": "sha256:c5cffce16a33641ed3746cdb61fd0b1fab8cb16ac9e2e6da451bdf624045fdc8",
        "config_digest": "sha256:d6f5f951a4a489961cf9a3cd2824aa3492317044ecca524edcc13f942e494733",
        "layers": [
            [
                "sha256:d8398031dd35fa82202e3a31ca7dedc9d2e863ff3a0c92e0d315443de1bc7e95",
                "sha256:f02e97d7783a9d308f41090c7a2ce8762ed952c001c8243e1a002296a2613227",
                179,
                "application/vnd.oci.image.layer.v1.tar+gzip"
            ],
            [
                "sha256:91f9294f4e5949fc1bd6d39f74cec2751eb814a39a110dae8650f0054cf7ded6",
                "sha256:fdfe77ec457c946421b3075d0334d973ed835a5471d62570615867b5bf0e8284",
                198,
                "application/vnd.oci.image.layer.v1.tar+gzip"
            ],
            [
                "sha256:dc706690442719074fd42ad1f99c780ca19bd9c846b692d82788522b41a4af32",
                "sha256:a69151927e1e2428745078e2acb2f33ac19105a94fe639a7f3a7bc91a04d3688",
                230,
                "application/vnd.oci.image.layer.v1.tar+gzip"
            ],
            [
                "sha256:8374b327d6074f5a84bd585b2edfa54bcc9898800a4a0ad7400ea0055cbfbe98",
                "sha256:e99753b0b0fb0f76e09604aaf1dc651a7d1da464b66ff6d519f600916737bda3",
                139,
                "application/vnd.oci.image.layer.v1.tar+gzip"
            ]
        ],
        "manifest_digest": "sha256:20ee6f117c0a63844547fdfec84d7794084a1efff227df4689079b4995812fac",
        "name.json": "sha256:c9742a90966c6d80ffc0c878145da542b31893763a975876f33015893ccb6397",
        "oci": {
            "blobs": [
                "20ee6f117c0a63844547fdfec84d7794084a1efff227df4689079b4995812fac",
                "8374b327d6074f5a84bd585b2edfa54bcc9898800a4a0ad7400ea0055cbfbe98",
                "91f9294f4e5949fc1bd6d39f74cec2751eb814a39a110dae8650f0054cf7ded6",
                "d6f5f951a4a489961cf9a3cd2824aa3492317044ecca524edcc13f942e494733",
                "d8398031dd35fa82202e3a31ca7dedc9d2e863ff3a0c92e0d315443de1bc7e95",
                "dc706690442719074fd42ad1f99c780ca19bd9c846b692d82788522b41a4af32"
            ],
            "index.json": "sha256:189ef72075412b90a7bbb8d19d13624c89d6280325259a32fe51e903f45c5d1c",
            "oci-layout": "sha256:18f0797eab35a4597c1e9624aa4f15fd91f6254e5538c1e0d193b2a95dd4acc6"
        },
        "repo_tags": [
            "layered:v1"
        ]
    },
    "merged": {
        "archive": "sha256:18341bde993e74f3490dfeceb1dda46f68f1ceae8a61964a639c4daa39441100"
    },
    "untagged": {
        "archive": "sha256:7422354739796f97f8544a3af0c9523cd8a1878aefc56f167eff9ad122cef2bc",
        "config_digest": "sha256:52b21211b1b64b4dec2fcf4e65b18fef430ab3a758980e6f317b5dd89beeb296",
        "layers": [
            [
                "sha256:fe3ba6cc26182c7c48f4ae03c110f87f9a35f4188089935a3cda3eb3cb9c81f2",
                "sha256:3109076b7b6ef688f2f79f69c4ea43a3b9e495599bca7d890559eb8e911475aa",
                220,
                "application/vnd.oci.image.layer.v1.tar+gzip"
            ]
        ],
        "manifest_digest": "sha256:e2501dad2185454a83d22ca0ef610047376e6809ae42dbf182f02e214324c3bb",
        "name.json": "sha256:a76f6d6ead9eb9cde2e70fabbc366cc5b19f5a7ef71af25693630824bd2c9f6c",
        "oci": {
            "blobs": [
                "52b21211b1b64b4dec2fcf4e65b18fef430ab3a758980e6f317b5dd89beeb296",
                "e2501dad2185454a83d22ca0ef610047376e6809ae42dbf182f02e214324c3bb",
                "fe3ba6cc26182c7c48f4ae03c110f87f9a35f4188089935a3cda3eb3cb9c81f2"
            ],
            "index.json": "sha256:7bcc05a79e4de09febec5a654a718a7cffa70507fae27c13e38ddff4ec28186c",
            "oci-layout": "sha256:18f0797eab35a4597c1e9624aa4f15fd91f6254e5538c1e0d193b2a95dd4acc6"
        },
        "repo_tags": [
            "untagged:52b21211b1b64b4dec2fcf4e65b18fef"
        ]
    }
}


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _layout(root: Path) -> dict[str, Any]:
    """An OCI layout's index.json and oci-layout digests, and its blobs (each named by
    its digest, which is checked here)."""
    files = _tree_digests(root)
    blobs = sorted(path.removeprefix("blobs/sha256/") for path in files if path.startswith("blobs/sha256/"))
    for blob in blobs:
        assert files[f"blobs/sha256/{blob}"] == f"sha256:{blob}", f"{root}: blobs/sha256/{blob} is not its digest"
    assert set(files) == {"index.json", "oci-layout", *(f"blobs/sha256/{blob}" for blob in blobs)}, files
    return {"index.json": files["index.json"], "oci-layout": files["oci-layout"], "blobs": blobs}


def _observed(ws: Path) -> dict[str, Any]:
    out = ws / "dtbuild-out" / "pkg"
    found: dict[str, Any] = {}
    for name in IMAGES:
        package = "vendor" if name == "from_layout" else "pkg"
        description = ws / "dtbuild-out" / package / f"{name}.json"
        desc = json.loads(description.read_text())
        found[name] = {
            "manifest_digest": desc["manifest_digest"],
            "config_digest": desc["config_digest"],
            "layers": [[layer["digest"], layer["diff_id"], layer["size"], layer["media_type"]]
                       for layer in desc["layers"]],
            "repo_tags": desc["repo_tags"],
            "name.json": _sha256(description),
        }
    for name, archive in (("base", "base.tar"), ("app_none", "app_none.tar"), ("app_gz", "app_gz.tar.gz"),
                          ("app_zstd", "app_zstd.tar.zst"), ("untagged", "untagged.tar.gz"),
                          ("layered", "layered.tar.gz"), ("merged", "merged.tar")):
        found.setdefault(name, {})["archive"] = _sha256(out / archive)
    for name in ("base", "app_gz", "untagged", "layered"):
        found[name]["oci"] = _layout(out / f"{name}.oci")
    return found


def test_image_bytes_are_the_pinned_ones(write_workspace, run_dtbuild) -> None:
    from dtbuild.plugins.builtin.compressors import GzipCompressor, ZstdCompressor

    assert {"gz": GzipCompressor.VERSION, "zstd": ZstdCompressor.VERSION} == COMPRESSOR_VERSIONS, (
        "a compressor's library or settings changed: its blobs change with it; rebuild PINNED and say so")
    ws = write_workspace(FILES)
    run_dtbuild.build(ws, *(f"//pkg:{name}" for name in IMAGES if name != "from_layout"), "//pkg:merged",
                      check=True)
    # An OCI layout directory (app_gz.oci, as another tool would hand it over) read back.
    vendor = ws / "vendor"
    vendor.mkdir()
    layout = vendor / "layout"
    for rel in _tree_digests(ws / "dtbuild-out" / "pkg" / "app_gz.oci"):
        (layout / rel).parent.mkdir(parents=True, exist_ok=True)
        (layout / rel).write_bytes((ws / "dtbuild-out" / "pkg" / "app_gz.oci" / rel).read_bytes())
    (vendor / "BUILD").write_text(
        'files(name = "layout_tree", srcs = glob(["layout/**"]), strip_prefix = "layout")\n'
        'image_archive(name = "from_layout", src = ":layout_tree")\n')
    run_dtbuild.build(ws, "//vendor:from_layout", check=True)
    observed = _observed(ws)
    assert observed == PINNED, "image bytes changed; the values now built:\nPINNED = " + json.dumps(
        observed, indent=4, sort_keys=True)
