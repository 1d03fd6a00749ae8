"""An example command: ``dtbuild cat //pkg:gen`` prints the files a target outputs,
building only them, without copying anything to ``dtbuild-out/``.

After ``[plugins] modules = ["tools/cat_command.py"]``, ``dtbuild cat --help`` documents it
and ``dtbuild plugins`` lists it.
"""

from __future__ import annotations

import sys
from typing import Any

from dtbuild.plugins import hookimpl
from dtbuild.plugins.interfaces import Command, CommandAPI, CommandFailed
from dtbuild.rules.providers import DefaultInfo


class Cat(Command):
    NAME = "cat"
    HELP = "print the files a target outputs"

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("target", help="the target whose outputs to print, such as //pkg:gen")
        parser.add_argument("--name", action="store_true", help="print each file's path before its content")

    def run(self, args: Any, api: CommandAPI) -> int:
        label = api.resolve_target(args.target)  # one target, or a usage error (exit 2)
        files = [f for f in api.providers(label)[DefaultInfo].files if not f.is_tree]  # analysis only
        if not files:
            raise CommandFailed(f"{label} outputs no file", hint="give a target that outputs files", usage=True)
        reader = api.reader()
        for artifact in api.build_artifacts(label, files):  # builds just these
            if args.name:
                print(f"==> {artifact.path} <==", flush=True)
            with reader.open_blob(artifact.digest) as f:
                while chunk := f.read(1 << 16):
                    sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        return 0


@hookimpl
def dtbuild_register_commands() -> list[type[Command]]:
    return [Cat]
