"""Labels (``//pkg/path:name``) and target patterns (``//pkg/...``, ``//pkg:all``).

A label is canonical when it is absolute: ``//pkg:name`` (the root package is ``//:name``).
Relative forms (``:name``, ``name``) are resolved against the package of the BUILD file
that wrote them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dtbuild.engine.errors import LabelError

#: The name of the workspace state directory (``dtbuild-out/.dtbuild``: the build lock,
#: the output index, the source-digest memo). Package, target and output names whose
#: first characters are this name are reserved: an output there would replace the state.
STATE_DIR_NAME = ".dtbuild"

_PKG_RE = re.compile(r"^(?:[A-Za-z0-9_.+\-@=,~]+(?:/[A-Za-z0-9_.+\-@=,~]+)*)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+\-@=,~/ #$%&()\[\]{}^!|?<>;']+$")


@dataclass(frozen=True, slots=True, order=True)
class Label:
    package: str  # "" for the workspace root, else "a/b"
    name: str

    def __str__(self) -> str:
        return f"//{self.package}:{self.name}"

    @property
    def output_dir(self) -> str:
        return f"dtbuild-out/{self.package}" if self.package else "dtbuild-out"


def _check_package(package: str, text: str) -> None:
    if package.endswith("/") or "//" in package or not _PKG_RE.match(package):
        raise LabelError(f"invalid label '{text}': bad package name '{package}'",
                         hint="packages are '/'-separated directory names, as in //images/web:app")
    if any(part in (".", "..") for part in package.split("/")):
        raise LabelError(f"invalid label '{text}': package '{package}' may not contain '.' or '..'")
    if any(is_reserved_name(part) for part in package.split("/")):
        raise LabelError(f"invalid label '{text}': package '{package}' has a directory whose name starts "
                         f"with '{STATE_DIR_NAME}', which is reserved for dtbuild's state directory",
                         hint=f"rename the directory so that its name does not start with '{STATE_DIR_NAME}'")


def is_reserved_name(component: str) -> bool:
    """Whether one path component (of a package, target or output name) is reserved
    because it is, or could be mistaken for, the workspace state directory."""
    return component.startswith(STATE_DIR_NAME)


def _check_name(name: str, text: str) -> None:
    if not name or not _NAME_RE.match(name) or name.startswith("/") or name.endswith("/") \
            or any(part in (".", "..", "") for part in name.split("/")):
        raise LabelError(f"invalid label '{text}': bad target name '{name}'",
                         hint="target names are letters, digits and _.+-=,~@ (and '/' between parts)")
    if any(is_reserved_name(part) for part in name.split("/")):
        which = "starts" if is_reserved_name(name) else "has a part that starts"
        raise LabelError(f"invalid label '{text}': target name '{name}' {which} with '{STATE_DIR_NAME}', "
                         "which is reserved for dtbuild's state directory (dtbuild-out/.dtbuild)",
                         hint=f"rename the target so that no part of its name starts with '{STATE_DIR_NAME}'")


def parse_label(text: str, current_package: str | None = None) -> Label:
    """Parse ``//pkg:name``, ``//pkg`` (``//pkg:pkg``' last component), and, with a
    current package, ``:name`` or ``name``."""
    if not isinstance(text, str) or not text:
        raise LabelError(f"invalid label {text!r}: a label is a non-empty string like '//pkg:name'")
    if text.startswith("@"):
        # "@//pkg:name" is the main repository; external repositories are not supported.
        if text.startswith("@//"):
            text = text[1:]
        else:
            raise LabelError(f"invalid label '{text}': external repositories are not supported",
                             hint="refer to targets of this workspace as //pkg:name")
    if text.startswith("//"):
        body = text[2:]
        if ":" in body:
            package, _, name = body.partition(":")
        else:
            package = body
            name = body.rsplit("/", 1)[-1] if body else ""
            if not name:
                raise LabelError(f"invalid label '{text}': no target name",
                                 hint="the root package's targets are written //:name")
        _check_package(package, text)
        _check_name(name, text)
        return Label(package, name)
    if current_package is None:
        raise LabelError(f"invalid label '{text}': labels on the command line start with '//'",
                         hint=f"did you mean '//{text.lstrip(':')}'?")
    name = text[1:] if text.startswith(":") else text
    _check_name(name, text)
    return Label(current_package, name)


@dataclass(frozen=True, slots=True)
class TargetPattern:
    """``//pkg:name`` (a single label), ``//pkg:all`` / ``//pkg:*`` (every target of a
    package), ``//pkg/...`` (every target below a directory, ``//...`` for all)."""

    package: str
    name: str | None  # None: all targets of the package(s)
    recursive: bool

    def __str__(self) -> str:
        if self.recursive:
            return f"//{self.package + '/' if self.package else ''}..."
        return f"//{self.package}:{self.name if self.name is not None else 'all'}"

    def matches_package(self, package: str) -> bool:
        if not self.recursive:
            return package == self.package
        return not self.package or package == self.package or package.startswith(self.package + "/")


def parse_pattern(text: str, current_package: str | None = None) -> TargetPattern:
    """Parse a command-line target pattern; relative patterns are taken relative to
    ``current_package`` (the working directory's package) when given."""
    if current_package is not None and not text.startswith(("//", "@")):
        prefix = f"//{current_package}" if current_package else "//"
        text = f"{prefix}:{text[1:]}" if text.startswith(":") else (
            f"{prefix}/{text}" if current_package else f"//{text}")
    if not text.startswith("//"):
        raise LabelError(f"invalid target pattern '{text}': patterns start with '//'",
                         hint=f"did you mean '//{text.lstrip(':/')}'?")
    body = text[2:]
    target = None
    if ":" in body:
        body, _, target = body.partition(":")
    if body == "..." or body.endswith("/..."):
        package = body[:-4] if body != "..." else ""
        if target not in (None, "all", "*", "all-targets"):
            raise LabelError(f"invalid target pattern '{text}': '...' takes no target name",
                             hint=f"did you mean '//{body}'?")
        _check_package(package, text)
        return TargetPattern(package, None, True)
    if target in ("all", "*", "all-targets"):
        _check_package(body, text)
        return TargetPattern(body, None, False)
    label = parse_label(text)
    return TargetPattern(label.package, label.name, False)
