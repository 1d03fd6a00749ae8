"""``dtbuild run``, a command of the built-in ``images`` plugin: build an image target and
run it in the foreground, as ``docker run --rm --network host IMAGE [ARGS]`` would, the
way ``bazel run`` runs an ``oci_load`` target or ``ko run`` runs what it built.

The container gets the image's ``Entrypoint``, ``Cmd``, ``Env``, ``WorkingDir`` and
``User``; ARGS after ``--`` replace ``Cmd``. It shares the host's network (a server in
the image answers on 127.0.0.1), its stdio is dtbuild's, and its exit status is
dtbuild's. SIGINT and SIGTERM are passed on to it; one that has not stopped
``--stop-timeout`` seconds later (or at a second signal) is killed. Nothing is left
behind: the container is removed, and so is the bundle of the runc path.

Two runtimes, chosen by ``--runtime`` or the ``[run] runtime`` setting:

* ``podman``: the image is loaded (as an uncompressed docker-archive: podman 4.3 rejects
  gzip ones; skipped when podman holds it already) and run with ``podman run``.
* ``runc``: the image is written as an OCI layout into a private temporary directory,
  unpacked there by ``umoci unpack`` (``--rootless`` when not root) into a bundle whose
  ``config.json`` is then adjusted, and run with ``runc run`` (its state in the same
  directory).
* ``auto`` (the default): podman where it can run containers, else runc. Whether it can
  is learnt by trying: a podman that could not start a container is noted in
  ``dtbuild-out/.dtbuild/run-podman.json`` (for that podman binary) and not tried again.

It reaches the engine only through :class:`~dtbuild.plugins.interfaces.CommandAPI`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dtbuild.plugins.interfaces import Command, CommandAPI, CommandFailed

#: The values of ``--runtime`` and of the ``[run] runtime`` setting.
RUNTIMES = ("auto", "podman", "runc")
#: Seconds a container has to stop after the first SIGINT or SIGTERM (as ``docker stop``).
DEFAULT_STOP_TIMEOUT = 10.0
#: The state file (in the command state directory) that says whether podman could run containers.
PODMAN_STATE_FILE = "run-podman.json"
#: The PATH a container gets when its image sets none (the one docker and podman give).
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Host files a container on the host's network sees, as ``docker run --network host`` does.
HOST_NETWORK_FILES = ("/etc/resolv.conf", "/etc/hosts")
#: Exit statuses with which ``podman run`` says the container could not be started.
_PODMAN_START_FAILURES = (125, 126, 127)


@dataclass(frozen=True, slots=True)
class ContainerProcess:
    """What the container runs, from the image config and the command line."""

    #: Entrypoint + (ARGS or Cmd).
    argv: tuple[str, ...]
    #: The image's Env, with a default PATH (and TERM on a terminal), as docker gives them.
    env: tuple[str, ...]
    #: WorkingDir, or "/".
    cwd: str
    #: The image's User ("" for root), which the runtime resolves in the image.
    user: str
    #: Whether stdin is a terminal (the container then gets one).
    terminal: bool


def host_platform() -> tuple[str, str]:
    """(os, architecture) of the containers this machine runs, in image config spelling."""
    from dtbuild.rules.builtin.image import host_architecture

    return "linux", host_architecture()


def check_platform(label: str, config: Mapping[str, Any]) -> None:
    """Refuse an image built for another OS or architecture: it would fail with an
    obscure exec error inside the container.

    :raises CommandFailed: naming both platforms.
    """
    host_os, host_arch = host_platform()
    image_os, image_arch = str(config.get("os") or "?"), str(config.get("architecture") or "?")
    if (image_os, image_arch) != (host_os, host_arch):
        raise CommandFailed(f"{label} is a {image_os}/{image_arch} image, and this machine runs {host_os}/{host_arch} "
                            "containers",
                            hint=f"build it with architecture = \"{host_arch}\" to run it here, or run it on a "
                                 f"{image_os}/{image_arch} machine")


def container_process(label: str, config: Mapping[str, Any], args: Sequence[str], *,
                      terminal: bool) -> ContainerProcess:
    """The process of ``docker run IMAGE ARGS``: ARGS (when given) replace Cmd.

    :raises CommandFailed: (usage) when there is nothing to run.
    """
    inner = config.get("config") or {}
    entrypoint = [str(a) for a in inner.get("Entrypoint") or ()]
    cmd = [str(a) for a in (args if args else inner.get("Cmd") or ())]
    argv = tuple(entrypoint + cmd)
    if not argv:
        raise CommandFailed(f"{label} has no Entrypoint or Cmd: there is nothing to run",
                            hint=f"give the command after --: dtbuild run {label} -- /bin/sh -c 'echo hello'",
                            usage=True)
    env = [str(e) for e in inner.get("Env") or ()]
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    if terminal and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    return ContainerProcess(argv=argv, env=tuple(env), cwd=str(inner.get("WorkingDir") or "/"),
                            user=str(inner.get("User") or ""), terminal=terminal)


def runtime_choice(api: CommandAPI, flag: str | None) -> str:
    """``--runtime``, else the ``[run] runtime`` setting, else ``auto``.

    :raises CommandFailed: (usage) for a value that names no runtime.
    """
    if flag is not None:
        return flag
    settings = api.settings()
    value = settings.setting("run", "runtime", "auto")
    if value not in RUNTIMES:
        from difflib import get_close_matches

        close = get_close_matches(str(value), RUNTIMES, n=1)
        raise CommandFailed(f"{settings.origin('run', 'runtime')} must be one of {', '.join(RUNTIMES)}, but was "
                            f"{value!r}", hint=f"did you mean '{close[0]}'?" if close else None, usage=True)
    return str(value)


def _tool(name: str, needed_for: str) -> str:
    import shutil

    path = shutil.which(name)
    if path is None:
        raise CommandFailed(f"{name} is not installed (or not on PATH); {needed_for}",
                            hint=f"install {name}, or choose another runtime with --runtime or [run] runtime")
    return path


# --------------------------------------------------------------------------- the foreground process


def run_foreground(argv: Sequence[str], *, force_stop: Callable[[], None], stop_timeout: float,
                   own_group: bool) -> int:
    """Run a runtime's ``run`` process with our stdio and return its exit status.

    SIGINT and SIGTERM (and SIGHUP) received meanwhile are passed on to it (``runc run``
    and ``podman run`` pass them to the container); when the container has not stopped
    ``stop_timeout`` seconds after the first, or at the second, ``force_stop`` kills it.
    With ``own_group`` the process gets a process group of its own, so that a Ctrl-C
    typed at the terminal reaches the container once (through us), not twice.
    """
    import signal
    import subprocess
    import time

    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)

    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in forwarded}
    try:
        proc = subprocess.Popen(list(argv), process_group=0 if own_group else None)
        passed_on = 0
        deadline: float | None = None
        killed = False
        while True:
            try:
                return proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
            while passed_on < len(received):
                signum = received[passed_on]
                passed_on += 1
                if passed_on == 1:
                    print(f"dtbuild: {signal.Signals(signum).name} received, stopping the container "
                          f"(killed if it has not stopped in {stop_timeout:g} s, or at a second signal)",
                          file=sys.stderr)
                    try:
                        os.kill(proc.pid, signum)
                    except ProcessLookupError:
                        pass
                    deadline = time.monotonic() + stop_timeout
                elif not killed:
                    force_stop()
                    killed = True
            if deadline is not None and not killed and time.monotonic() >= deadline:
                print(f"dtbuild: the container did not stop within {stop_timeout:g} s; killing it", file=sys.stderr)
                force_stop()
                killed = True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _quiet(argv: Sequence[str], timeout: float = 60) -> Any:
    """Run a runtime's housekeeping command (kill, delete, inspect); its output is returned, not shown."""
    import subprocess

    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _container_name() -> str:
    import secrets

    return f"dtbuild-run-{os.getpid()}-{secrets.token_hex(4)}"


# --------------------------------------------------------------------------- podman


class _PodmanState:
    """Whether a podman binary could run containers here, remembered by its path, size
    and modification time (a new podman is tried again)."""

    def __init__(self, state_dir: str, podman: str) -> None:
        self.path = os.path.join(state_dir, PODMAN_STATE_FILE)
        try:
            st = os.stat(podman)
            self.key = f"{os.path.realpath(podman)}:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            self.key = podman

    def cannot_run(self) -> bool:
        import json

        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
            return bool(doc.get("key") == self.key and doc.get("runs") is False)
        except (OSError, ValueError, AttributeError):
            return False

    def record(self, runs: bool) -> None:
        import contextlib
        import json

        temp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(temp, "wb") as f:
                f.write(json.dumps({"version": 1, "key": self.key, "runs": runs}, sort_keys=True).encode())
            os.replace(temp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temp)  # only a hint for later runs


class _PodmanCannotStart(Exception):
    """podman could not start the container (its own message is on stderr already)."""


def _podman_load(api: CommandAPI, podman: str, reader: Any, image_id: str) -> None:
    """Load the image into podman unless it holds it already (by config digest)."""
    from dtbuild.plugins.builtin.image_commands import pipe_archive

    exists = _quiet([podman, "image", "exists", image_id])
    if exists is not None and exists.returncode == 0:
        return
    code, output = pipe_archive(api, reader, [podman, "load"], capture=True)
    if code != 0:
        from dtbuild.plugins.text import printable

        raise _PodmanCannotStart(f"`podman load` exited with status {code}: {printable(output.strip()[-2000:])}")


def run_with_podman(api: CommandAPI, podman: str, reader: Any, tree: Any, process: ContainerProcess,
                    args: Sequence[str], stop_timeout: float) -> int:
    """``podman run --network host`` of the image; the container is removed afterwards.

    :raises _PodmanCannotStart: when podman could not load the image or start the container.
    """
    image_id = tree.description.config_digest.removeprefix("sha256:")
    _podman_load(api, podman, reader, image_id)
    name = _container_name()
    # Not --rm: whether the container ever started is read from it before it is removed.
    argv = [podman, "run", "--name", name, "--network", "host", "-i", *(["-t"] if process.terminal else []),
            image_id, *args]
    try:
        code = run_foreground(argv, force_stop=lambda: _quiet([podman, "kill", "--signal", "KILL", name]),
                              stop_timeout=stop_timeout, own_group=not process.terminal)
        if code in _PODMAN_START_FAILURES:
            state = _quiet([podman, "container", "inspect", "--format", "{{.State.Status}}", name])
            if state is None or state.returncode != 0 or state.stdout.strip() in ("created", "configured", ""):
                raise _PodmanCannotStart(f"podman could not start the container (`podman run` exited with "
                                         f"status {code}; its message is above)")
        return code
    finally:
        _quiet([podman, "rm", "--force", "--time", "0", name])


# --------------------------------------------------------------------------- runc


def write_oci_layout(tree: Any, dest: str, tag: str) -> None:
    """The image tree as an OCI layout at ``dest``, its manifest tagged ``tag``."""
    import shutil

    from dtbuild.plugins.builtin import imageformat

    def place(digest: str, path: str) -> None:
        with tree.blob_opener(digest)() as src, open(path, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    image = imageformat.OciImage(tree.manifest_bytes, tree.config_bytes, (f"dtbuild-run:{tag}",))
    imageformat.write_oci_layout(dest, [image], place)


def adjust_bundle_config(config: dict[str, Any], process: ContainerProcess) -> dict[str, Any]:
    """The ``config.json`` umoci wrote (``process.user`` it already resolved from the
    image's User and /etc/passwd), with the command, environment, working directory and
    terminal of ``process``, and the host's network: no network namespace, and the host's
    resolv.conf and hosts (read-only)."""
    spec = dict(config)
    proc = dict(spec.get("process") or {})
    proc.update(args=list(process.argv), env=list(process.env), cwd=process.cwd, terminal=process.terminal)
    spec["process"] = proc
    linux = dict(spec.get("linux") or {})
    linux["namespaces"] = [n for n in linux.get("namespaces") or () if n.get("type") != "network"]
    spec["linux"] = linux
    mounts = [m for m in spec.get("mounts") or () if m.get("destination") not in HOST_NETWORK_FILES]
    for path in HOST_NETWORK_FILES:
        if os.path.isfile(path):
            mounts.append({"destination": path, "type": "bind", "source": os.path.realpath(path),
                           "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]})
    spec["mounts"] = mounts
    return spec


def run_with_runc(label: str, tree: Any, process: ContainerProcess, stop_timeout: float,
                  report: Callable[[str], None]) -> int:
    """Unpack the image with umoci into a private bundle and ``runc run`` it there;
    the container and the bundle are removed afterwards."""
    import json
    import subprocess
    import tempfile

    from dtbuild.plugins.builtin.root_layer import remove_tree_as_owner
    from dtbuild.plugins.text import printable

    umoci = _tool("umoci", "the runc runtime unpacks images with it")
    runc = _tool("runc", "the runc runtime runs images with it")
    rootless = os.geteuid() != 0
    work = tempfile.mkdtemp(prefix="dtbuild-run-")  # 0700: the bundle is ours alone
    try:
        layout, bundle, state = (os.path.join(work, d) for d in ("layout", "bundle", "state"))
        report(f"unpacking {label} into a bundle")
        write_oci_layout(tree, layout, "run")
        unpack = [umoci, "unpack", *(["--rootless"] if rootless else []), "--image", f"{layout}:run", bundle]
        done = subprocess.run(unpack, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise CommandFailed(f"`umoci unpack` of {label} exited with status {done.returncode}: "
                                f"{printable((done.stderr or done.stdout).strip()[-2000:])}",
                                hint="check the image's User: umoci resolves it in the image's /etc/passwd")
        config_path = os.path.join(bundle, "config.json")
        with open(config_path, "rb") as f:
            config = json.loads(f.read())
        with open(config_path, "w") as f:
            json.dump(adjust_bundle_config(config, process), f)
        base = [runc, "--root", state, *(["--rootless", "true"] if rootless else [])]
        name = _container_name()
        try:
            return run_foreground([*base, "run", "--bundle", bundle, name],
                                  force_stop=lambda: _quiet([*base, "kill", name, "KILL"]),
                                  stop_timeout=stop_timeout, own_group=not process.terminal)
        finally:
            _quiet([*base, "delete", "--force", name])
    finally:
        remove_tree_as_owner(work)


# --------------------------------------------------------------------------- the command


class RunCommand(Command):
    NAME = "run"
    HELP = "build an image and run it in the foreground (podman, or umoci and runc)"

    def add_arguments(self, parser: Any) -> None:
        import argparse

        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.description = (
            "Build an image target and run it in the foreground, like\n"
            "`docker run --rm --network host IMAGE [ARGS]`: the image's Entrypoint, Cmd, Env,\n"
            "WorkingDir and User; ARGS after -- replace Cmd. The container shares the host's\n"
            "network, gets dtbuild's stdin, stdout and stderr, and its exit status is dtbuild's.\n"
            "Ctrl-C and SIGTERM are passed on to it; a container that has not stopped\n"
            "--stop-timeout seconds later (or at a second Ctrl-C) is killed. See docs/run.md.")
        parser.epilog = ("examples:\n"
                         "  dtbuild run //images:web\n"
                         "      the image's own Entrypoint and Cmd (a server answers on 127.0.0.1)\n"
                         "  dtbuild run //images:web -- 18080 /srv/www\n"
                         "      the Entrypoint with other arguments\n"
                         "  dtbuild run --runtime runc //images:web\n"
                         "      umoci and runc even where podman can run containers")
        parser.add_argument("target", help="the image target to build and run, such as //images:web")
        parser.add_argument("args", nargs="*", metavar="ARGS",
                            help="after --: the arguments that replace the image's Cmd")
        parser.add_argument("--runtime", choices=RUNTIMES, default=None,
                            help="auto (podman where it can run containers, else runc), podman or runc "
                                 "(default: [run] runtime in dtbuild.toml, else auto)")
        parser.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT, metavar="SECONDS",
                            help=f"seconds the container has to stop after Ctrl-C or SIGTERM before it is killed "
                                 f"(default {DEFAULT_STOP_TIMEOUT:g})")

    def run(self, args: Any, api: CommandAPI) -> int:
        import shutil

        from dtbuild.plugins.builtin.image_commands import image_tree, image_tree_of

        if args.stop_timeout < 0:
            raise CommandFailed(f"--stop-timeout must be 0 or more seconds, but was {args.stop_timeout:g}", usage=True)
        choice = runtime_choice(api, args.runtime)  # before building: a bad setting fails fast
        reader, artifact = image_tree_of(api, args.target, jobs=args.jobs)
        tree = image_tree(api, reader, artifact)
        label = tree.description.label
        check_platform(label, tree.config)
        process = container_process(label, tree.config, args.args, terminal=sys.stdin.isatty())
        if api.cancel.is_set():
            raise CommandFailed("interrupted before the container started")
        podman = shutil.which("podman") if choice in ("auto", "podman") else None
        if choice == "podman" and podman is None:
            _tool("podman", "the podman runtime runs images with it")
        if podman is not None:
            state = _PodmanState(api.state_dir, podman)
            if choice == "podman" or not state.cannot_run():
                api.report(f"running {label} with podman (host network)")
                try:
                    code = run_with_podman(api, podman, reader, tree, process, args.args, args.stop_timeout)
                except _PodmanCannotStart as e:
                    state.record(False)
                    if choice == "podman":
                        raise CommandFailed(str(e), hint="podman cannot run containers here; use --runtime runc "
                                                         "(or [run] runtime = \"runc\")") from None
                    print(f"dtbuild: {e}; running it with runc instead", file=sys.stderr)
                else:
                    state.record(True)
                    return code
        api.report(f"running {label} with runc (host network)")
        return run_with_runc(label, tree, process, args.stop_timeout, api.report)


RUN_COMMANDS: tuple[type[Command], ...] = (RunCommand,)

__all__ = ["ContainerProcess", "RunCommand", "adjust_bundle_config", "check_platform", "container_process",
           "host_platform", "run_foreground", "run_with_podman", "run_with_runc", "runtime_choice"]
