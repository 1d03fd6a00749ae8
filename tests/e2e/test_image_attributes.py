"""Image attributes dockerTools users reach for, checked with the tools they use: how
contents merge (``keep_contents_dirlinks`` against real ``rsync -ak`` / ``rsync -aK``),
the platform defaults, ``image_archive`` picking an image by name and tag, every field of
the image config (as ``skopeo inspect --config`` reads it), ``created`` dates, and the
layer count limit."""

from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


# --------------------------------------------------------------------------- contents merging

#: Two packages that both bring lib/: one as a directory, one as a symlink to usr/lib
#: (a merged-/usr package), with more links to directories, one that leads nowhere and
#: one to a file. Directory -> {name: file content | ("link", target) | {...}}.
PACKAGE_A = {"lib": {"liba.so": "a\n"}, "usr": {"lib": {"libau.so": "au\n"}},
             "opt": {"v1": {"bin": {"tool": "tool\n"}}}}
PACKAGE_B = {"lib": ("link", "usr/lib"), "usr": {"lib": {"libb.so": "b\n", "sub": {"deep.so": "deep\n"}},
                                                  "share": {"doc": {"b.txt": "doc\n"}}},
             "doc": ("link", "usr/share/doc"), "docs": ("link", "doc"), "dangling": ("link", "missing"),
             "tofile": ("link", "usr/lib/libb.so"), "opt": {"current": ("link", "../usr/lib/sub")}}


def _write_tree(root: Path, spec: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, value in spec.items():
        path = root / name
        if isinstance(value, dict):
            _write_tree(path, value)
        elif isinstance(value, tuple):
            path.symlink_to(value[1])
        else:
            path.write_text(value)
            path.chmod(0o644)
    root.chmod(0o755)


def _rsync_listing(dest: Path) -> list[tuple[str, str, int, str]]:
    """(path, mode as ls shows it, size of a file, link target) for every entry below dest."""
    out = []
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = os.lstat(full)
            link = os.readlink(full) if stat.S_ISLNK(st.st_mode) else ""
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            out.append((str(full.relative_to(dest)), stat.filemode(st.st_mode), size, link))
    return sorted(out)


def _tar_listing(tar: Path) -> list[tuple[str, str, int, str]]:
    """The same from ``tar -tvf``: 'drwxr-xr-x 0/0 0 1970-01-01 00:00 lib/' lines."""
    done = subprocess.run(["tar", "--numeric-owner", "-tvf", str(tar)], capture_output=True, text=True, check=True)
    out = []
    for line in done.stdout.splitlines():
        mode, _owner, size, _date, _time, rest = line.split(None, 5)
        name, _, link = rest.partition(" -> ")
        out.append((name.rstrip("/"), mode, int(size) if mode.startswith("-") else 0, link))
    return sorted(out)


def _dirlinks_workspace(write_workspace, packages: list[str], keep: bool) -> Path:
    srcs = "\n".join(f'files(name = "{p}", srcs = glob(["{p}/**"]), strip_prefix = "{p}")' for p in ("a", "b"))
    ws = write_workspace({"pkg/BUILD": f"""
{srcs}
pure_layer(name = "layer", copy_to_root = [{", ".join(f'":{p}"' for p in packages)}],
           keep_contents_dirlinks = {keep})
"""})
    _write_tree(ws / "pkg" / "a", PACKAGE_A)
    _write_tree(ws / "pkg" / "b", PACKAGE_B)
    return ws


@pytest.mark.parametrize(("keep", "order"), [(False, ["a", "b"]), (False, ["b", "a"]), (True, ["b", "a"])])
def test_contents_merge_as_dockertools_rsync_does(write_workspace, run_dtbuild, require_tool, tmp_path, keep,
                                                  order) -> None:
    rsync = require_tool("rsync")
    ws = _dirlinks_workspace(write_workspace, order, keep)
    code, _, err = run_dtbuild(ws, "build", "//pkg:layer")
    assert code == 0, err
    # dockerTools: for item in contents; do rsync -a${K or k} $item/ layer/; done
    dest = tmp_path / "rsync-layer"
    dest.mkdir()
    for package in order:
        subprocess.run([rsync, "-aK" if keep else "-ak", f"{ws / 'pkg' / package}/", f"{dest}/"], check=True,
                       capture_output=True)
    expected = _rsync_listing(dest)
    assert _tar_listing(ws / "dtbuild-out" / "pkg" / "layer.tar") == expected
    if not keep:  # both packages' libraries are in lib/, where rsync -ak puts them
        assert {"lib/liba.so", "lib/libb.so"} <= {entry[0] for entry in expected}


def test_keep_contents_dirlinks_fails_where_rsync_fails(write_workspace, run_dtbuild, require_tool, tmp_path) -> None:
    rsync = require_tool("rsync")
    ws = _dirlinks_workspace(write_workspace, ["a", "b"], True)
    dest = tmp_path / "rsync-layer"
    dest.mkdir()
    subprocess.run([rsync, "-aK", f"{ws / 'pkg' / 'a'}/", f"{dest}/"], check=True)
    done = subprocess.run([rsync, "-aK", f"{ws / 'pkg' / 'b'}/", f"{dest}/"], capture_output=True, text=True)
    assert done.returncode != 0 and "cannot delete non-empty directory: lib" in done.stdout + done.stderr
    code, _, err = run_dtbuild(ws, "build", "//pkg:layer")
    assert code == 1
    assert "/lib is a directory (from //pkg:a) but //pkg:b places a symlink there" in err
    assert "cannot delete non-empty directory" in err


# --------------------------------------------------------------------------- shared pieces

BUSYBOX_APPLETS = ["sh", "env", "cat", "echo", "hostname"]


def _busybox_workspace(write_workspace, require_tool, build: str, config: str = "") -> Path:
    """A workspace whose //base:rootfs is a static busybox with a few applets in /bin."""
    busybox = require_tool("busybox")
    ws = write_workspace({
        "base/BUILD": 'files(name = "rootfs", srcs = glob(["rootfs/**"]), strip_prefix = "rootfs")\n',
        "pkg/BUILD": build}, config=config)
    bindir = ws / "base" / "rootfs" / "bin"
    bindir.mkdir(parents=True)
    shutil.copy(busybox, bindir / "busybox")
    for applet in BUSYBOX_APPLETS:
        (bindir / applet).symlink_to("busybox")
    return ws


def _skopeo_config(archive: Path, *, raw: bool = False) -> dict:
    """The image config as ``skopeo inspect --config`` reads it from the docker-archive:
    parsed into the OCI image spec's fields, or with ``raw`` as the archive holds it (the
    Docker fields skopeo's OCI view leaves out: Hostname, Healthcheck, ...)."""
    done = subprocess.run(["skopeo", "inspect", "--config", *(["--raw"] if raw else []), f"docker-archive:{archive}"],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _run_in_runc(layout: Path, tag: str, bundle: Path, name: str) -> subprocess.CompletedProcess[str]:
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], check=True, capture_output=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    (bundle / "config.json").write_text(json.dumps(spec))
    return subprocess.run(["runc", "run", "-b", str(bundle), f"{name}-{os.getpid()}"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------- platform defaults

#: uname -m -> the image config's (GOARCH) spelling, for the machines tests run on.
GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def test_architecture_defaults_to_the_host_and_takes_kernel_spellings(write_workspace, run_dtbuild,
                                                                     require_tool) -> None:
    require_tool("skopeo")
    ws = write_workspace({"pkg/BUILD": """
files(name = "data", srcs = ["hello.txt"])
image(name = "default", tag = "1", copy_to_root = [":data"], compressor = "none")
image(name = "x86", tag = "1", copy_to_root = [":data"], compressor = "none", architecture = "x86_64")
image(name = "amd", tag = "1", copy_to_root = [":data"], compressor = "none", architecture = "amd64")
image(name = "arm", tag = "1", copy_to_root = [":data"], compressor = "none", architecture = "aarch64")
layered_image(name = "layered", tag = "1", contents = [":data"], compressor = "none")
""", "pkg/hello.txt": "hello\n"})
    code, _, err = run_dtbuild(ws, "build", "//pkg:all")
    assert code == 0, err
    out = ws / "dtbuild-out" / "pkg"
    host = GOARCH[platform.machine()]
    for name in ("default", "layered"):
        config = _skopeo_config(out / f"{name}.tar")
        assert (config["os"], config["architecture"]) == ("linux", host)
    assert _skopeo_config(out / "x86.tar")["architecture"] == "amd64"
    assert _skopeo_config(out / "arm.tar")["architecture"] == "arm64"
    # x86_64 is amd64: the same config but for the history, which names the target.
    x86, amd = (_skopeo_config(out / f"{name}.tar") for name in ("x86", "amd"))
    assert {**x86, "history": None} == {**amd, "history": None}
    index = json.loads((out / "arm.oci" / "index.json").read_text())
    assert index["manifests"][0]["platform"] == {"architecture": "arm64", "os": "linux"}


def test_unknown_architecture_names_the_line_and_the_closest(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"pkg/BUILD": 'image(name = "i", architecture = "amd46")\n'
                                       'pull_image(name = "p", image_name = "x/y", image_digest = "sha256:' + "0" * 64
                                       + '", arch = "aarch46")\n'})
    code, _, err = run_dtbuild(ws, "build", "//pkg:i")
    assert code == 2
    assert "pkg/BUILD:1" in err and "'architecture' attribute must be one of amd64" in err
    assert "did you mean 'amd64'?" in err
    code, _, err = run_dtbuild(ws, "build", "//pkg:p")
    assert code == 2
    assert "pkg/BUILD:2" in err and "'arch' attribute" in err and "did you mean 'aarch64'?" in err


# --------------------------------------------------------------------------- image_archive by name and tag


def test_image_archive_picks_an_image_by_name_and_tag(write_workspace, run_dtbuild, require_tool) -> None:
    require_tool("skopeo")
    ws = write_workspace({"pkg/BUILD": """
files(name = "data", srcs = ["hello.txt"])
image(name = "a", image_name = "team/alpha", tag = "1", copy_to_root = [":data"], compressor = "none",
      config = {"Labels": {"which": "alpha"}})
image(name = "b", image_name = "beta", tag = "2", copy_to_root = [":data"], compressor = "none",
      config = {"Labels": {"which": "beta"}})
merge_images(name = "both", images = [":a", ":b"], compressor = "none")
image_archive(name = "by_name", src = ":both", image_name = "beta")
image_archive(name = "by_tag", src = ":both", tag = "1")
image_archive(name = "by_both", src = ":both", image_name = "docker.io/library/beta", tag = "2")
image_archive(name = "by_index", src = ":both", index = 1)
image(name = "app", from_image = ":by_both", tag = "1", compressor = "none", config = {"Env": ["X=1"]})
""", "pkg/hello.txt": "hello\n"})
    code, _, err = run_dtbuild(ws, "build", "//pkg:all")
    assert code == 0, err
    out = ws / "dtbuild-out" / "pkg"
    described = {name: json.loads((out / f"{name}.json").read_text()) for name in
                 ("a", "b", "by_name", "by_tag", "by_both", "by_index")}
    assert described["by_name"]["config_digest"] == described["b"]["config_digest"]
    assert described["by_both"]["config_digest"] == described["b"]["config_digest"]
    assert described["by_index"]["config_digest"] == described["b"]["config_digest"]
    assert described["by_tag"]["config_digest"] == described["a"]["config_digest"]
    assert described["by_tag"]["repo_tags"] == ["team/alpha:1"]
    # The image built on it has beta's config, as skopeo reads it.
    config = _skopeo_config(out / "app.tar")
    assert config["config"]["Labels"] == {"which": "beta"}


def test_image_archive_without_the_image_names_the_ones_it_has(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"pkg/BUILD": """
files(name = "data", srcs = ["hello.txt"])
image(name = "a", image_name = "alpha", tag = "1", copy_to_root = [":data"], compressor = "none")
image(name = "b", image_name = "beta", tag = "2", copy_to_root = [":data"], compressor = "none")
merge_images(name = "both", images = [":a", ":b"], compressor = "none")
image_archive(name = "missing", src = ":both", image_name = "gamma", tag = "3")
image_archive(name = "both_ways", src = ":both", image_name = "alpha", index = 1)
""", "pkg/hello.txt": "hello\n"})
    code, _, err = run_dtbuild(ws, "build", "//pkg:missing")
    assert code == 1
    assert "has no image tagged gamma:3" in err
    assert "0: alpha:1; 1: beta:2" in err
    code, _, err = run_dtbuild(ws, "build", "//pkg:both_ways")
    assert code == 2
    assert "pkg/BUILD:7" in err and "'index' attribute" in err and "give either index, or image_name and tag" in err


# --------------------------------------------------------------------------- the image config

ALL_FIELDS_CONFIG = """{
    "User": "1000:1000",
    "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
    "Env": ["A=9", "C=3"],
    "Entrypoint": ["/bin/sh", "-c", "env | sort; echo args: $@; echo host: $(hostname)", "sh"],
    "Volumes": {"/data": {}},
    "WorkingDir": "/tmp",
    "Labels": {"org.example.child": "yes"},
    "StopSignal": "SIGINT",
    "ArgsEscaped": False,
    "Memory": 268435456,
    "MemorySwap": -1,
    "CpuShares": 512,
    "Healthcheck": {"Test": ["CMD-SHELL", "true"], "Interval": 30000000000, "Timeout": 5000000000,
                    "StartPeriod": 1000000000, "Retries": 3},
    "Hostname": "web",
    "Domainname": "example.com",
    "Shell": ["/bin/sh", "-ec"],
    "OnBuild": ["RUN echo child"],
    "StopTimeout": 20,
    "Tty": False,
}"""


def test_every_config_field_reaches_the_image_and_merges_with_the_base(write_workspace, run_dtbuild,
                                                                       require_tool, tmp_path) -> None:
    for tool in ("skopeo", "umoci", "runc"):
        require_tool(tool)
    ws = _busybox_workspace(write_workspace, require_tool, f"""
image(name = "base", tag = "1", copy_to_root = ["//base:rootfs"], compressor = "none", config = {{
    "Env": ["PATH=/bin", "A=1", "B=2"],
    "Cmd": ["base", "arguments"],
    "Labels": {{"org.example.base": "yes"}},
    "ExposedPorts": {{"80/tcp": {{}}}},
    "OnBuild": ["RUN echo base"],
    "Healthcheck": {{"Test": ["CMD", "/bin/check"], "Retries": 9, "StartInterval": 1000000000}},
    "Hostname": "base-host",
}})
image(name = "child", tag = "1", from_image = ":base", compressor = "none", config = {ALL_FIELDS_CONFIG})
image(name = "reset", tag = "1", from_image = ":base", compressor = "none",
      config = {{"Hostname": None, "Healthcheck": None, "Cmd": ["kept"]}})
""")
    code, _, err = run_dtbuild(ws, "build", "//pkg:all")
    assert code == 0, err
    out = ws / "dtbuild-out" / "pkg"
    oci_view = _skopeo_config(out / "child.tar")["config"]
    assert oci_view["StopSignal"] == "SIGINT" and oci_view["WorkingDir"] == "/tmp"
    assert oci_view["ExposedPorts"] == {"80/tcp": {}, "8080/tcp": {}, "53/udp": {}}
    config = _skopeo_config(out / "child.tar", raw=True)["config"]
    assert config == {
        "User": "1000:1000",
        # The base's variables in their order, A set again in its place, C after them.
        "Env": ["PATH=/bin", "A=9", "B=2", "C=3"],
        # An Entrypoint without a Cmd drops the base's Cmd, as a Dockerfile's ENTRYPOINT does.
        "Entrypoint": ["/bin/sh", "-c", "env | sort; echo args: $@; echo host: $(hostname)", "sh"],
        "ExposedPorts": {"80/tcp": {}, "8080/tcp": {}, "53/udp": {}},
        "Volumes": {"/data": {}},
        "WorkingDir": "/tmp",
        "Labels": {"org.example.base": "yes", "org.example.child": "yes"},
        "StopSignal": "SIGINT",
        "ArgsEscaped": False,
        "Memory": 268435456,
        "MemorySwap": -1,
        "CpuShares": 512,
        # Replaced as a whole: nothing of the base's Healthcheck is left.
        "Healthcheck": {"Test": ["CMD-SHELL", "true"], "Interval": 30000000000, "Timeout": 5000000000,
                        "StartPeriod": 1000000000, "Retries": 3},
        "Hostname": "web",
        "Domainname": "example.com",
        "Shell": ["/bin/sh", "-ec"],
        # The base's triggers are not inherited.
        "OnBuild": ["RUN echo child"],
        "StopTimeout": 20,
        "Tty": False,
    }
    reset = _skopeo_config(out / "reset.tar", raw=True)["config"]
    assert "Hostname" not in reset and "Healthcheck" not in reset
    assert reset["Cmd"] == ["kept"] and reset["ExposedPorts"] == {"80/tcp": {}} and "OnBuild" not in reset
    # runc runs the child with the merged environment, user and working directory.
    done = _run_in_runc(out / "child.oci", "1", tmp_path / "bundle", "dtbuild-config")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert {"A=9", "B=2", "C=3", "PATH=/bin"} <= set(lines)
    assert "args:" in lines


@pytest.mark.parametrize(("config", "message", "hint"), [
    ('{"Healtcheck": {}}', "has the unknown field 'Healtcheck'", "did you mean 'Healthcheck'?"),
    ('{"workingdir": "/x"}', "has the unknown field 'workingdir'", "did you mean 'WorkingDir'?"),
    ('{"Healthcheck": {"Intervall": 1}}', "has the unknown field 'Healthcheck.Intervall'",
     "did you mean 'Interval'?"),
    ('{"Healthcheck": {"Interval": "30s"}}', "field 'Healthcheck.Interval' must be an integer",
     "durations are integers of nanoseconds"),
    ('{"Healthcheck": {"Test": ["curl"]}}', "must start with 'CMD', 'CMD-SHELL' or 'NONE'", "CMD-SHELL"),
    ('{"ExposedPorts": {"http": {}}}', "'http', which is not a port", None),
    ('{"ExposedPorts": ["80/tcp"]}', "field 'ExposedPorts' must be a dict whose values are {}",
     'write it as {"80/tcp": {}}'),
    ('{"StopTimeout": True}', "field 'StopTimeout' must be an integer", None),
    ('{"Volumes": {"data": {}}}', "'data', which is not an absolute path", None),
])
def test_bad_config_fields_are_errors_at_their_line(write_workspace, run_dtbuild, config, message, hint) -> None:
    ws = write_workspace({"pkg/BUILD": f'\n\nimage(\n    name = "i",\n    config = {config},\n)\n'})
    code, _, err = run_dtbuild(ws, "build", "//pkg:i")
    assert code == 2, err
    assert "pkg/BUILD:3" in err and "in image //pkg:i" in err and "'config' attribute" in err
    assert message in err
    if hint is not None:
        assert hint in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- created


def test_created_takes_dates_date_times_and_now(write_workspace, run_dtbuild, require_tool, read_summary,
                                               tmp_path) -> None:
    require_tool("skopeo")
    ws = write_workspace({"pkg/BUILD": """
files(name = "data", srcs = ["hello.txt"])
image(name = "date", tag = "1", copy_to_root = [":data"], compressor = "none", created = "2024-05-01")
image(name = "offset", tag = "1", copy_to_root = [":data"], compressor = "none",
      created = "2024-05-01T12:30:00+02:00")
image(name = "now", tag = "1", copy_to_root = [":data"], compressor = "none", created = "now")
""", "pkg/hello.txt": "hello\n"})
    code, _, err = run_dtbuild(ws, "build", "//pkg:date", "//pkg:offset")
    assert code == 0, err
    out = ws / "dtbuild-out" / "pkg"
    assert _skopeo_config(out / "date.tar")["created"] == "2024-05-01T00:00:00Z"
    assert _skopeo_config(out / "offset.tar")["created"] == "2024-05-01T12:30:00+02:00"
    layers = {json.dumps(json.loads((out / f"{n}.json").read_text())["layers"]) for n in ("date", "offset")}
    assert len(layers) == 1  # created goes into the config only
    summary = tmp_path / "summary.json"
    for _ in range(2):
        code, _, err = run_dtbuild(ws, "build", "//pkg:now", "--summary-json", str(summary))
        assert code == 0, err
        created = _skopeo_config(out / "now.tar")["created"]
        assert not created.startswith("1970")
    # "now" is never served from the cache with an old time: the assembly runs on every build.
    assert read_summary(summary)["actions"]["executed"] >= 1


@pytest.mark.parametrize("created", ["2024-02-30", "2024-05-01 12:00:00", "yesterday", "2024-05-01T25:00:00Z"])
def test_bad_created_is_an_error(write_workspace, run_dtbuild, created) -> None:
    ws = write_workspace({"pkg/BUILD": f'image(name = "i", created = "{created}")\n'})
    code, _, err = run_dtbuild(ws, "build", "//pkg:i")
    assert code == 2
    assert "pkg/BUILD:1" in err and "'created' attribute must be a date ('2024-05-01')" in err


# --------------------------------------------------------------------------- how many layers


def _many_layers_workspace(write_workspace, count: int, config: str = "") -> Path:
    return write_workspace({"pkg/BUILD": f"""
[files(name = "f%d" % i, srcs = ["hello.txt"], prefix = "/data/%d" % i) for i in range({count})]
[pure_layer(name = "l%d" % i, copy_to_root = [":f%d" % i]) for i in range({count})]
image(name = "tall", tag = "1", layers = [":l%d" % i for i in range({count})], compressor = "none")
""", "pkg/hello.txt": "hello\n"}, config=config)


def test_more_layers_than_overlay2_runs_is_a_warning(write_workspace, run_dtbuild, require_tool) -> None:
    require_tool("skopeo")
    ws = _many_layers_workspace(write_workspace, 128)
    code, out, err = run_dtbuild(ws, "build", "//pkg:tall")
    assert code == 0, err
    assert "warning: //pkg:tall has 128 layers; Docker's overlay2 storage runs at most 127" in out + err
    assert len(_skopeo_config(ws / "dtbuild-out" / "pkg" / "tall.tar")["rootfs"]["diff_ids"]) == 128


def test_more_layers_than_the_kernel_stacks_is_an_error_by_default(write_workspace, run_dtbuild) -> None:
    ws = _many_layers_workspace(write_workspace, 501)
    code, _, err = run_dtbuild(ws, "build", "//pkg:tall", "--jobs", "8")
    assert code == 1
    assert "//pkg:tall has 501 layers, more than [image] max_layers = 500 allows" in err
    assert "Traceback" not in err


def test_more_layers_than_max_layers_is_an_error_with_the_fix(write_workspace, run_dtbuild) -> None:
    ws = _many_layers_workspace(write_workspace, 12, config="[image]\nmax_layers = 10\n")
    code, _, err = run_dtbuild(ws, "build", "//pkg:tall")
    assert code == 1
    assert "//pkg:tall has 12 layers, more than [image] max_layers = 10 allows" in err
    assert "max_layers merges the least popular packages" in err and "raise [image] max_layers" in err
    (ws / "dtbuild.toml").write_text("[image]\nmax_layers = 12\n")
    code, _, err = run_dtbuild(ws, "build", "//pkg:tall")
    assert code == 0, err
