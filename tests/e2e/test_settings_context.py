"""Settings have one owner: the engine finds dtbuild.toml, rejects what it cannot read
(invalid TOML at file:line, unknown sections and keys), applies the environment overrides
once, and hands the result to executors (their ExecutorContext) and action kinds
(``ctx.settings``). Nothing else looks for dtbuild.toml, so a build behaves the same
whether dtbuild runs at the workspace root or in a package directory, and the VM,
namespace and local executors see the settings of the workspace, not of the directory a
command happens to run in."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

#: A workspace plugin with an executor that records its context and then runs the
#: command as the ``local`` executor would (given the same context).
RECORDER = '''
import json, os
from dtbuild.plugins import hookimpl
from dtbuild.plugins.builtin.executors import LocalExecutor
from dtbuild.plugins.interfaces import Executor


class Recorder(Executor):
    NAME = "recorder"
    {init}

    def run(self, request, cancel):
        ctx = self.context
        record = {{"workspace_root": ctx.workspace_root, "cache_dir": ctx.cache_dir,
                  "sandbox": ctx.setting("sandbox", "commands"), "timeout": ctx.setting("network", "timeout"),
                  "timeout_from": ctx.settings.origin("network", "timeout"), "vm": dict(ctx.settings.section("vm"))}}
        ctx.log("recorder ran")
        with open(os.path.join(ctx.workspace_root, "recorded.json"), "w") as f:
            json.dump(record, f)
        return LocalExecutor(ctx).run(request, cancel)


@hookimpl
def dtbuild_register_executors():
    return [Recorder]


@hookimpl
def dtbuild_select_executor(mnemonic, requested, available):
    return "recorder" if mnemonic == "Genrule" else None
'''

SETTINGS = ('[plugins]\nmodules = ["tools/recorder.py"]\n[sandbox]\ncommands = "none"\n'
            '[network]\ntimeout = 7\n[vm]\nkernel = "kernels/vmlinuz"\n')


def _recorder_workspace(write_workspace, init: str) -> Path:
    return write_workspace({
        "tools/recorder.py": RECORDER.format(init=init),
        "pkg/BUILD": 'genrule(name = "g", outs = ["g.txt"], cmd = "echo hi > $OUTS")\n',
    }, config=SETTINGS)


@pytest.mark.parametrize("init", [
    "",  # the base Executor.__init__(self, context=None): made with cls(context)
    "def __init__(self):\n        self.made = True",  # a constructor without arguments: cls(), then .context
], ids=["context-argument", "no-argument-constructor"])
@pytest.mark.parametrize("where", ["root", "package"])
def test_an_executor_plugin_gets_the_workspace_context(write_workspace, run_dtbuild, cache_dir, init: str,
                                                       where: str) -> None:
    ws = _recorder_workspace(write_workspace, init)
    cwd = ws if where == "root" else ws / "pkg"
    code, out, err = run_dtbuild(cwd, "build", "//pkg:g", env={"DTBUILD_NETWORK_TIMEOUT": "3"})
    assert code == 0, err
    assert (ws / "dtbuild-out" / "pkg" / "g.txt").read_text() == "hi\n"
    recorded = json.loads((ws / "recorded.json").read_text())
    assert recorded == {"workspace_root": str(ws), "cache_dir": str(cache_dir), "sandbox": "none",
                        "timeout": "3", "timeout_from": "DTBUILD_NETWORK_TIMEOUT",
                        "vm": {"kernel": "kernels/vmlinuz"}}
    assert "recorder ran" in out + err


def test_the_sandbox_setting_reaches_the_executor_without_the_environment(write_workspace, run_dtbuild,
                                                                         tmp_path: Path) -> None:
    # Unconfined (the setting), a command may write outside its sandbox; confined (the
    # environment override, applied by the engine to the same settings) it may not.
    outside = tmp_path / "outside.txt"
    ws = write_workspace({"pkg/BUILD": f'genrule(name = "g", outs = ["g.txt"], '
                                       f'cmd = "echo x > {outside}; echo hi > $OUTS")\n'},
                         config='[sandbox]\ncommands = "none"\n')
    code, _, err = run_dtbuild(ws / "pkg", "build", "//pkg:g")
    assert code == 0, err
    assert outside.read_text() == "x\n"


def test_vm_settings_are_the_workspaces_from_the_root_and_from_a_package(workspace, run_dtbuild,
                                                                        require_tool) -> None:
    require_tool("busybox")
    ws = workspace("root_layers")
    base_bin = ws / "base" / "rootfs" / "bin"
    base_bin.mkdir(parents=True, exist_ok=True)
    (base_bin / "busybox").write_bytes(Path(require_tool("busybox")).read_bytes())
    # qemu "exists" (any executable), the kernel does not: the message names the path
    # resolved against the workspace root, wherever dtbuild runs.
    (ws / "dtbuild.toml").write_text('[vm]\nqemu = "/bin/true"\nkernel = "kernels/vmlinuz"\n')
    messages = []
    for cwd in (ws, ws / "app"):
        code, _, err = run_dtbuild(cwd, "build", "//app:layer_vm")
        assert code == 1, err
        assert f"the vm executor cannot run here: the guest kernel {ws}/kernels/vmlinuz is missing" in err, err
        messages.append(err.count("kernels/vmlinuz"))
    assert messages[0] == messages[1]


def test_network_settings_reach_actions_from_a_package_directory(write_workspace, run_dtbuild,
                                                                 tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"x")
    ws = write_workspace({"pkg/BUILD": f'fetch_url(name = "f", urls = ["file://{payload}"], '
                                       f'sha256 = "{hashlib.sha256(b"x").hexdigest()}")\n'},
                         config='[network]\nmin_rate = "quick"\n')
    for cwd in (ws, ws / "pkg"):
        code, _, err = run_dtbuild(cwd, "build", "//pkg:f")
        assert code == 1, err
        assert "[network] min_rate in dtbuild.toml must be a size in bytes" in err, err
    code, _, err = run_dtbuild(ws / "pkg", "build", "//pkg:f", env={"DTBUILD_NETWORK_MIN_RATE": "slow"})
    assert code == 1 and "DTBUILD_NETWORK_MIN_RATE must be a size in bytes" in err, err
    (ws / "dtbuild.toml").write_text("[network]\nmin_rate = 10\n")
    code, _, err = run_dtbuild(ws / "pkg", "build", "//pkg:f")
    assert code == 0, err


# --------------------------------------------------------------------------- bad dtbuild.toml


@pytest.mark.parametrize(("toml", "line", "said"), [
    ('[network]\ntimeout = \n', "2:11", "is not valid TOML: Invalid value"),
    ('[plugins]\nmodules = ["a.py"\n', "2", "is not valid TOML: Unclosed array"),  # at the end
    ('[vm\nkernel = "x"\n', "1:4", "is not valid TOML"),
])
def test_invalid_toml_is_an_error_at_its_line(write_workspace, run_dtbuild, toml: str, line: str, said: str) -> None:
    ws = write_workspace({"pkg/BUILD": ""}, config=toml)
    for cwd in (ws, ws / "pkg"):
        code, _, err = run_dtbuild(cwd, "build", "//pkg:all")
        assert code == 2, err
        assert f"{ws}/dtbuild.toml:{line}: dtbuild.toml {said}" in err, err
        assert "Traceback" not in err and "internal error" not in err, err


@pytest.mark.parametrize(("toml", "expected"), [
    ("[netwrok]\ntimeout = 1\n", ["dtbuild.toml:1: dtbuild.toml has no section [netwrok] (sections: cache, "
                                  "image, network, plugins, remote, run, sandbox, vm)",
                                  "hint: did you mean 'network'?"]),
    ('# VM\n[vm]\nkernl = "/boot/vmlinuz"\n', ["dtbuild.toml:3: [vm] has no setting 'kernl'",
                                                "hint: did you mean 'kernel'?"]),
    ("[network]\ntimeout = 5\n[sandbox]\ncomands = \"none\"\n", ["dtbuild.toml:4: [sandbox] has no setting 'comands'"]),
    ("vm = 3\n", ["dtbuild.toml:1: [vm] in dtbuild.toml must be a table"]),
    ("[network]\ntimout = 5\n", ["dtbuild.toml:2: [network] has no setting 'timout'",
                                 "hint: did you mean 'timeout'?"]),
])
def test_unknown_sections_and_keys_are_errors(write_workspace, run_dtbuild, toml: str, expected: list[str]) -> None:
    ws = write_workspace({"pkg/BUILD": ""}, config=toml)
    code, _, err = run_dtbuild(ws / "pkg", "build", "//pkg:all")
    assert code == 2, err
    for text in expected:
        assert text in err, err
