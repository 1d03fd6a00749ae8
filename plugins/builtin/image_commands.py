"""The commands of the built-in ``images`` plugin: ``stream`` (an image's docker-archive
to stdout), ``inspect`` (its layers, sizes, config and contents) and ``load`` (into
docker or podman), and :func:`image_tree_of`, which the ``registries`` plugin's ``push``
uses too.

They reach the engine only through :class:`~dtbuild.plugins.interfaces.CommandAPI`:
a command names a target, finds its :class:`~dtbuild.rules.providers.ImageInfo`, and has
the engine build just the image tree behind ``ImageInfo.image`` (not the target's
archive or OCI layout), which it then reads from the store.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from dtbuild.plugins.interfaces import Command, CommandAPI, CommandFailed, InputArtifact, StoreTreeReader


def image_tree_of(api: CommandAPI, pattern: str, *, jobs: int = 0) -> tuple[StoreTreeReader, InputArtifact]:
    """Build the image tree of the one image target ``pattern`` names; return a reader
    whose ``inputs("images")`` is that tree, and the tree.

    :raises CommandFailed: (usage) when the target is not an image target.
    """
    from dtbuild.rules.providers import ImageInfo

    label = api.resolve_target(pattern, what="image target")
    image = api.providers(label).get(ImageInfo)
    if not isinstance(image, ImageInfo):
        raise CommandFailed(f"{label} ({api.kind(label)}) is not an image target",
                            hint="stream and inspect take image targets such as image or layered_image", usage=True)
    (tree,) = api.build_artifacts(label, [image.image], jobs=jobs)
    return api.reader({"images": [tree]}), tree


def image_compressors(api: CommandAPI) -> Any:
    """The registered compressors, workspace plugins' too, to read layers with."""
    from dtbuild.plugins.builtin import imageformat

    return imageformat.Compressors(api.compressors(), api.compressor)


def image_tree(api: CommandAPI, reader: StoreTreeReader, artifact: InputArtifact) -> Any:
    from dtbuild.plugins.builtin.image_actions import ImageTree

    return ImageTree(reader, artifact, image_compressors(api))  # type: ignore[arg-type]  # the reading part of an ActionContext


def _target_argument(parser: Any, verb: str) -> None:
    parser.add_argument("target", metavar="TARGET",
                        help=f"the image target to {verb} (an image or layered_image), such as "
                             "//images:web")


def _chosen_compressor(api: CommandAPI, name: str) -> Any:
    """The registered compressor ``--compressor`` names; an unknown name is a usage error
    with the registered ones and the closest."""
    import difflib

    names = sorted(api.compressors())
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        raise CommandFailed(f"--compressor must be one of {', '.join(names)}, but was '{name}'",
                            hint=f"did you mean '{close[0]}'?" if close else
                            "a plugin may register others (dtbuild plugins lists them)", usage=True)
    return api.compressor(name)


class StreamCommand(Command):
    NAME = "stream"
    HELP = "write an image's docker-archive to stdout without storing it"
    DESCRIPTION = (
        "Build an image target's layers and config (not its archive) and write its\n"
        "docker-archive to stdout, never to disk, as dockerTools' streamLayeredImage does:\n"
        "for `docker load`, `podman load`, or a file that `skopeo copy docker-archive:FILE` reads.\n"
        "\n"
        "The archive is uncompressed unless --compressor says otherwise, whatever the\n"
        "target's own compressor: podman 4.3 and skopeo 1.9 (Debian 12) reject gzip-compressed\n"
        "docker-archives, and a local pipe gains nothing from compression. With a compressor,\n"
        "the whole archive is compressed as it is written (layers stored with another\n"
        "compressor are decompressed and re-encoded on the fly); its layer tars, manifest and\n"
        "config are the same in every case.")
    EXAMPLES = (
        "  dtbuild stream //images:web | podman load\n"
        "  dtbuild stream //images:web | docker load\n"
        "  dtbuild stream //images:web --compressor zstd > web.tar.zst\n"
        "  dtbuild stream //images:web --compressor gz | ssh host docker load")

    def add_arguments(self, parser: Any) -> None:
        _target_argument(parser, "stream")
        parser.add_argument("--compressor", default="none", metavar="NAME",
                            help="compress the archive with none (the default), gz, zstd or another registered "
                                 "compressor")

    def run(self, args: Any, api: CommandAPI) -> int:
        from dtbuild.plugins.builtin import imageformat
        from dtbuild.plugins.builtin.image_actions import archive_images

        compressor = _chosen_compressor(api, args.compressor)  # before building: a typo fails fast
        if sys.stdout.isatty():
            raise CommandFailed("stream writes a tar archive to stdout; pipe it somewhere",
                                hint=f"dtbuild stream {args.target} | podman load", usage=True)
        reader, _ = image_tree_of(api, args.target, jobs=args.jobs)
        out = sys.stdout.buffer
        imageformat.write_docker_archive(out, archive_images(reader, image_compressors(api)), compressor)  # type: ignore[arg-type]
        out.flush()
        return 0


def _size(n: int) -> str:
    return f"{n} B" if n < 1000 else f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB"


class InspectCommand(Command):
    NAME = "inspect"
    HELP = "an image's layers, sizes, config and contents"
    DESCRIPTION = (
        "Build an image target's layers and config (not its archive) and print its tags,\n"
        "manifest and config digests, platform, config, and for each layer its digest, sizes,\n"
        "media type, what it holds (the packages of a layered_image's layer, or the history\n"
        "line of a base image's) and its top-level directories with their file counts.")
    EXAMPLES = (
        "  dtbuild inspect //images:web\n"
        "  dtbuild inspect //images:web | grep -A1 '^layers'")

    def add_arguments(self, parser: Any) -> None:
        _target_argument(parser, "inspect")

    def run(self, args: Any, api: CommandAPI) -> int:
        import json

        from dtbuild.plugins.builtin import tar_extract
        from dtbuild.plugins.builtin.image_actions import layer_notes
        from dtbuild.plugins.text import printable as shown  # image text never reaches the terminal raw

        reader, artifact = image_tree_of(api, args.target, jobs=args.jobs)
        tree = image_tree(api, reader, artifact)
        desc = tree.description
        print(f"image: {shown(desc.label)}")
        print(f"tags: {', '.join(shown(t) for t in desc.repo_tags)}")
        print(f"manifest: {shown(desc.manifest_digest)}")
        print(f"config: {shown(desc.config_digest)}")
        config = tree.config
        print(f"platform: {shown(config.get('os'))}/{shown(config.get('architecture'))}  "
              f"created: {shown(config.get('created'))}")
        print("config:")
        # json.dumps (ensure_ascii) already escapes them; shown() keeps it so if that changes.
        for line in json.dumps(config.get("config") or {}, indent=2, sort_keys=True).splitlines():
            print("  " + shown(line))
        history = [h for h in config.get("history", []) if not h.get("empty_layer")]
        notes = layer_notes(tree)
        print(f"layers ({len(desc.layers)}):")
        for i, layer in enumerate(desc.layers):
            files = dirs = 0
            top: dict[str, int] = {}
            # Read as every untrusted tar is (names normalised and checked): layers of
            # imported and pulled images come from anywhere.
            try:
                with tree.layer_opener(layer.diff_id)() as f:
                    for member, _ in tar_extract.read_entries(f, compressed=False, lower_files=lambda _path: True):
                        if member.kind == "dir":
                            dirs += 1
                        else:
                            files += 1
                            head = "/" + member.path.split("/", 1)[0]
                            top[head] = top.get(head, 0) + 1
            except tar_extract.UnsafeArchive as e:
                where = f"layer {i + 1} ({layer.diff_id})"
                raise CommandFailed(f"cannot list the files of {where}: {e}", hint=e.hint or None) from None
            tar_size = tree.layer_size(layer.diff_id)
            print(f"  {i + 1}. {shown(layer.digest)}  {_size(layer.size)}  {shown(layer.media_type)}")
            print(f"     diff_id {shown(layer.diff_id)}; {_size(tar_size)} uncompressed; {files} files, "
                  f"{dirs} directories")
            note = notes.get(layer.diff_id)
            if note is not None and note.customisation:
                print("     customisation layer: what extra_commands and fakeroot_commands changed")
            elif note is not None:
                print(f"     packages: {', '.join(shown(p) for p in note.packages) or '(none)'}")
            else:
                created_by = history[i].get("created_by", "") if i < len(history) else ""
                if created_by:  # a layer dtbuild did not write: its own history says what it is
                    print(f"     {shown(created_by)}")
            if top:
                print("     holds: " + ", ".join(f"{shown(k)} ({v})" for k, v in sorted(top.items())))
        return 0


def _load_command(choice: str) -> list[str]:
    """``[docker|podman, "load"]``: docker when its daemon answers (or when asked), else podman."""
    import shutil
    import subprocess

    docker, podman = shutil.which("docker"), shutil.which("podman")
    if choice == "podman" or (choice == "auto" and podman and not docker):
        if podman is None:
            raise CommandFailed("podman is not installed (or not on PATH)", hint="install podman, or use --tool docker")
        return [podman, "load"]
    if docker is None:
        if choice == "docker":
            raise CommandFailed("docker is not installed (or not on PATH)", hint="install docker, or use --tool podman")
        raise CommandFailed("dtbuild load needs docker or podman, and neither is installed (or on PATH)",
                            hint="install one of them, or write the archive with `dtbuild stream TARGET > image.tar`")
    try:
        answers = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], capture_output=True,
                                 timeout=20, stdin=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        answers = False
    if answers:
        return [docker, "load"]
    if choice == "auto" and podman is not None:
        return [podman, "load"]
    raise CommandFailed("the docker daemon does not answer (`docker version` cannot reach it)"
                        + ("" if choice == "docker" else ", and podman is not installed"),
                        hint="start the docker daemon" + ("" if choice == "docker" else ", or install podman"))


class LoadCommand(Command):
    NAME = "load"
    HELP = "load an image into docker or podman"
    DESCRIPTION = (
        "Build an image target's layers and config and stream its docker-archive into\n"
        "`docker load` (when the docker daemon answers) or `podman load`, uncompressed whatever\n"
        "the target's compressor (podman 4.3 rejects gzip-compressed docker-archives). Nothing\n"
        "is written to disk but the tool's own storage.")
    EXAMPLES = (
        "  dtbuild load //images:web\n"
        "  dtbuild load //images:web --tool podman     podman even where docker runs")

    def add_arguments(self, parser: Any) -> None:
        _target_argument(parser, "load")
        parser.add_argument("--tool", choices=("auto", "docker", "podman"), default="auto",
                            help="auto (the default): docker when its daemon answers, else podman")

    def run(self, args: Any, api: CommandAPI) -> int:
        argv = _load_command(args.tool)  # before building: a missing tool fails fast
        reader, artifact = image_tree_of(api, args.target, jobs=args.jobs)
        tool = os.path.basename(argv[0])
        tags = list(image_tree(api, reader, artifact).description.repo_tags)
        code, _ = pipe_archive(api, reader, argv)
        if code != 0:
            raise CommandFailed(f"`{tool} load` exited with status {code} (its message is above)",
                                hint=f"dtbuild stream {args.target} | {tool} load  reproduces it")
        print(f"loaded {args.target} into {tool}: {', '.join(tags)}")
        return 0


def pipe_archive(api: CommandAPI, reader: StoreTreeReader, argv: list[str], *,
                 capture: bool = False) -> tuple[int, str]:
    """Stream the image's docker-archive into ``argv`` (``docker load``, ``podman load``) and
    return its exit status and, with ``capture``, its output (else it goes to stderr).
    Uncompressed whatever the target's compressor: podman 4.3 rejects gzip docker-archives,
    and a local pipe gains nothing from compression."""
    import subprocess

    from dtbuild.plugins.builtin import imageformat
    from dtbuild.plugins.builtin.image_actions import archive_images

    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE if capture else sys.stderr,
                            stderr=subprocess.STDOUT if capture else None)
    assert proc.stdin is not None
    try:
        imageformat.write_docker_archive(proc.stdin, archive_images(reader, image_compressors(api)),  # type: ignore[arg-type]
                                         api.compressor("none"))
    except BrokenPipeError:
        pass  # the tool stopped reading: its exit status and message say why
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        output = proc.stdout.read().decode("utf-8", "replace") if proc.stdout is not None else ""
        code = proc.wait()
    return code, output


IMAGE_COMMANDS: tuple[type[Command], ...] = (StreamCommand, InspectCommand, LoadCommand)
