"""The action kind of ``shell_image`` (:mod:`dtbuild.rules.builtin.shell_image`) that
no other rule has: ``HostBusybox``, the host's static busybox as a package tree.

A shell image needs a shell and the usual tools whatever the command's host tools were
(the genrule sandbox shows the host's ``/usr``, which no image can carry whole): a static
busybox is one file that brings both. It is the same busybox ``run_as_root``'s toolbox
uses (:func:`dtbuild.plugins.builtin.toolbox.host_busybox`, the one place that finds and
digests it). It is read from the host, not from an input, so the kind's version names
it: an instance's ``VERSION`` is ``1+sha256:<the busybox's digest>`` (or ``1+none``), and
that version is part of every action key. A new busybox on the host re-runs exactly
these actions, and hosts with the same busybox share their cache entries, remote ones too.
"""

from __future__ import annotations

from dtbuild.plugins.builtin.toolbox import BUSYBOX_CANDIDATES, HostVersion, busybox_fingerprint, host_busybox
from dtbuild.plugins.interfaces import ActionContext, ActionFailed, ActionKind, TreeEntry


class HostBusybox(ActionKind):
    """``DIR/busybox`` (the host's static busybox) and a symbolic link ``DIR/APPLET`` ->
    ``busybox`` for each applet it lists (``busybox --list``), as ``busybox --install -s``
    would make them."""

    NAME = "HostBusybox"
    VERSION = HostVersion("1", busybox_fingerprint)  # type: ignore[assignment]

    def run(self, ctx: ActionContext) -> None:
        busybox = host_busybox()
        if busybox is None:
            raise ActionFailed(f"a shell image needs a static busybox on this machine, but none of "
                               f"{', '.join(BUSYBOX_CANDIDATES)} is one (apt-get install busybox-static), or set "
                               "busybox = False and bring a shell with tools or from_image")
        if "sh" not in busybox.applets:
            raise ActionFailed(f"{busybox.path} has no sh applet (or `{busybox.path} --list` failed), so it "
                               "cannot be a shell image's shell")
        directory = ctx.params["dir"]
        with open(busybox.path, "rb") as f:
            digest, size = ctx.put_stream(f)
        if digest != busybox.digest:
            raise ActionFailed(f"{busybox.path} changed while dtbuild was building (its digest is not the one "
                               "this action was keyed with); build again")
        entries = [TreeEntry(directory, "dir", 0o755), TreeEntry(f"{directory}/busybox", "file", 0o755, digest, size)]
        entries += [TreeEntry(f"{directory}/{name}", "symlink", 0o777, target="busybox") for name in busybox.applets]
        entries.sort(key=lambda e: e.path.split("/"))
        ctx.output_tree("out", entries)


SHELL_IMAGE_ACTION_KINDS: list[type[ActionKind]] = [HostBusybox]
