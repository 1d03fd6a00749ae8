"""The action kinds of ``deb_packages``: ``DebExtract`` (a ``.deb`` into a package tree
with its dpkg database entry) and ``DebLockProblem`` (the failure a missing, stale or
malformed lock becomes).

A ``.deb`` is an ar archive (deb(5)): ``debian-binary`` ("2.0"), ``control.tar[.gz|.xz|.zst]``
(the ``control`` paragraph, ``md5sums`` and maintainer scripts) and
``data.tar[.gz|.xz|.zst|.bz2]`` (the files), in that order, optionally followed by members
whose names start with ``_`` (signatures), which are skipped. :func:`read_deb` checks the
ar container itself (magic, header fields, sizes against the file, no bytes after the
last member but its padding) and streams the two tars through
:mod:`dtbuild.plugins.builtin.tar_extract`, the one reader of archives dtbuild did not
write: names that climb out of the root, links that are not data, members below a
symlink are refused there. Nothing of the archive is written to the host as files: the
data tree's files go straight into the store.

What the tree holds:

* the data tar's files, directories and symlinks, with the permission bits the package
  gives them (setuid, setgid and sticky included: they are metadata of the tree and of
  layer headers, never of a file dtbuild writes on the host); owners are not kept (the
  image's layers give every package file the image's ``uid``/``gid``, root by default);
  a hard link is a copy of the file it links to; a device or fifo is refused;
* ``var/lib/dpkg/status.d/NAME``: the control paragraph with ``Status: install ok
  installed`` after its ``Package`` field, and ``var/lib/dpkg/status.d/NAME.md5sums``:
  the package's md5sums file as it is, as distroless writes them, so image scanners
  (Trivy, Grype, Syft) list the package.

The control's ``Package``, ``Version`` and ``Architecture`` must be the lock's: a
``.deb`` whose sha256 matches but that is another package means the lock is wrong.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, replace
from typing import IO

from dtbuild.plugins.builtin import tar_extract
from dtbuild.plugins.interfaces import ActionContext, ActionFailed, ActionKind, TreeEntry

AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60
#: The most bytes of control.tar (and of each file in it) read into memory.
MAX_CONTROL_BYTES = 16 << 20
#: Where the dpkg database entries go in the tree (distroless's layout).
STATUS_DIR = "var/lib/dpkg/status.d"
STATUS_LINE = b"Status: install ok installed"

#: First bytes of each compression a member name's extension promises.
_MAGIC_OF = {".gz": b"\x1f\x8b", ".xz": b"\xfd7zXZ\x00", ".zst": b"\x28\xb5\x2f\xfd", ".bz2": b"BZh"}
_CONTROL_EXTENSIONS = ("", ".gz", ".xz", ".zst")
_DATA_EXTENSIONS = ("", ".gz", ".xz", ".zst", ".bz2")
_HINT_REBUILD = "fetch the .deb again, or build it with dpkg-deb --build"


class DebError(ValueError):
    """A .deb dtbuild refuses: what is wrong with it, for the user."""


@dataclass(frozen=True, slots=True)
class ControlFile:
    """What control.tar gives: the control paragraph and the md5sums file (or None)."""

    control: bytes
    md5sums: bytes | None


class _Member(io.RawIOBase):
    """The ``size`` bytes of one ar member, read from the archive stream; an archive
    that ends first is a :class:`DebError`."""

    def __init__(self, stream: IO[bytes], name: str, size: int) -> None:
        self._stream = stream
        self._name = name
        self.remaining = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.remaining <= 0:
            return 0
        data = self._stream.read(min(len(buffer), self.remaining))
        if not data:
            raise DebError(f"the member {self._name} ends before its {self.remaining} last bytes: the .deb is "
                           f"truncated; {_HINT_REBUILD}")
        self.remaining -= len(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.remaining > 0 and self.read(min(self.remaining, 1 << 20)):
            pass


class _ArReader:
    """The members of an ar archive, front to back, each checked before it is read."""

    def __init__(self, stream: IO[bytes], total: int) -> None:
        self._stream = stream
        self._total = total
        self._offset = 0
        magic = self._read(len(AR_MAGIC))
        if magic != AR_MAGIC:
            raise DebError("is not a Debian package: it does not start with the ar archive magic '!<arch>'; "
                           f"{_HINT_REBUILD}")

    def _read(self, size: int) -> bytes:
        data = self._stream.read(size)
        self._offset += len(data)
        return data

    def next(self) -> tuple[str, _Member] | None:
        """The next member's name and bytes, or None after the last one."""
        if self._offset % 2:
            pad = self._read(1)
            if pad not in (b"", b"\n"):
                raise DebError(f"has the byte {pad!r} where the padding after a member should be '\\n'; "
                               f"the ar archive is damaged; {_HINT_REBUILD}")
        header = self._read(_AR_HEADER)
        if not header:
            return None
        at = self._offset - len(header)
        if len(header) < _AR_HEADER:
            raise DebError(f"has {len(header)} stray bytes at byte {at}, which are not a whole ar member header "
                           f"(the .deb is truncated or damaged); {_HINT_REBUILD}")
        if header[58:60] != b"`\n":
            raise DebError(f"has bytes at {at} that are not an ar member header (after the last member?); "
                           f"{_HINT_REBUILD}")
        try:
            name = header[:16].decode("ascii").rstrip(" ")
        except UnicodeDecodeError:
            raise DebError(f"has an ar member at byte {at} whose name is not ASCII; {_HINT_REBUILD}") from None
        if name.endswith("/") and name != "/":  # GNU ar terminates names with '/'
            name = name[:-1]
        size_field = header[48:58].decode("ascii", "replace").strip(" ")
        if not size_field.isdigit():
            raise DebError(f"has the ar member {name!r} with the size {size_field!r}, which is not a number; "
                           f"{_HINT_REBUILD}")
        size = int(size_field)
        if self._offset + size > self._total:
            raise DebError(f"is truncated: the member {name} needs {size} bytes, but only "
                           f"{self._total - self._offset} are left; {_HINT_REBUILD}")
        self._offset += size
        return name, _Member(self._stream, name, size)


def _member_kind(name: str, base: str, extensions: tuple[str, ...]) -> str | None:
    """The compression extension of member ``name`` when it is ``base`` + one of
    ``extensions``, else None."""
    if not name.startswith(base):
        return None
    extension = name[len(base):]
    return extension if extension in extensions else None


def _checked_stream(member: _Member, name: str, extension: str) -> IO[bytes]:
    """The member's bytes (buffered: the tar reader peeks), after checking that they start
    as the compression its name says."""
    stream = io.BufferedReader(member, 1 << 16)
    magic = _MAGIC_OF.get(extension)
    if magic is not None and not stream.peek(len(magic)).startswith(magic):
        raise DebError(f"has the member {name}, whose bytes are not {extension[1:]}-compressed; {_HINT_REBUILD}")
    return stream


def _read_bounded(content: IO[bytes], what: str) -> bytes:
    data = content.read(MAX_CONTROL_BYTES + 1)
    if len(data) > MAX_CONTROL_BYTES:
        raise DebError(f"has a {what} larger than {MAX_CONTROL_BYTES} bytes; {_HINT_REBUILD}")
    return data


def _read_control(member: _Member, name: str, extension: str) -> ControlFile:
    stream = _checked_stream(member, name, extension)
    raw = _read_bounded(stream, name)
    control: bytes | None = None
    md5sums: bytes | None = None
    try:
        for entry, content in tar_extract.archive_entries(io.BytesIO(raw)):
            if entry.kind != "file" or content is None:
                continue
            if entry.path == "control":
                control = _read_bounded(content, "control file")
            elif entry.path == "md5sums":
                md5sums = _read_bounded(content, "md5sums file")
    except tar_extract.UnsafeArchive as e:
        raise DebError(f"has a {name} dtbuild refuses: {e}" + (f"; {e.hint}" if e.hint else "")) from None
    if control is None:
        raise DebError(f"has no control file in {name}; {_HINT_REBUILD}")
    return ControlFile(control, md5sums)


def control_fields(control: bytes) -> dict[str, str]:
    """The fields of a control paragraph, read by the deb822 parser ``dtbuild lock`` reads
    indexes with (:func:`dtbuild.plugins.builtin.deb_repo.parse_deb822`).

    :raises DebError: for a line that is neither a field nor a continuation line, or a
        control file that is not exactly one paragraph.
    """
    from dtbuild.plugins.builtin.deb_repo import RepositoryError, parse_deb822

    try:
        paragraphs = parse_deb822(control.decode("utf-8", "replace"), where="control")
    except RepositoryError as e:
        raise DebError(f"has a control file dtbuild cannot read: {e.message}") from None
    if len(paragraphs) != 1:
        raise DebError(f"has a control file of {len(paragraphs)} paragraphs, where one is expected")
    return paragraphs[0]


def status_entry(control: bytes) -> bytes:
    """The control paragraph as ``status.d/NAME`` holds it: the fields as the package has
    them, with ``Status: install ok installed`` after ``Package`` (a ``Status`` of its
    own is replaced), ending in one newline."""
    lines = control.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out: list[bytes] = []
    skipping = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.lower().startswith(b"status:")
        if skipping:
            continue
        out.append(line)
        if line.lower().startswith(b"package:"):
            out.append(STATUS_LINE)
    return b"\n".join(out) + b"\n"


@dataclass(frozen=True, slots=True)
class DebContents:
    """A read .deb: its control file and data tree (files already in the store)."""

    control: ControlFile
    tree: list[TreeEntry]


def read_deb(ctx: ActionContext, stream: IO[bytes], total: int) -> DebContents:
    """Read the .deb in ``stream`` (``total`` bytes): check the container, read control.tar
    and stream data.tar's files into the store.

    :raises DebError: for anything wrong with the archive (the message says what).
    """
    ar = _ArReader(stream, total)
    first = ar.next()
    if first is None or first[0] != "debian-binary":
        raise DebError(f"has {'no members' if first is None else repr(first[0])} where the member debian-binary "
                       f"must come first; {_HINT_REBUILD}")
    version = first[1].read(64)
    first[1].drain()
    if not re.match(rb"^2\.\d+\n", version):
        raise DebError(f"has the format version {version[:16]!r} in debian-binary; dtbuild reads format 2.x "
                       "(what dpkg-deb writes)")
    control: ControlFile | None = None
    tree: list[TreeEntry] | None = None
    while (item := ar.next()) is not None:
        name, member = item
        if name.startswith("_"):  # reserved for additions such as signatures: skipped, as dpkg does
            member.drain()
            continue
        if control is None:
            extension = _member_kind(name, "control.tar", _CONTROL_EXTENSIONS)
            if extension is None:
                raise DebError(f"has the member {name!r} where control.tar[.gz|.xz|.zst] must come second; "
                               f"{_HINT_REBUILD}")
            control = _read_control(member, name, extension)
            member.drain()
            continue
        if tree is not None:
            raise DebError(f"has the member {name!r} after data.tar; only members named '_...' may follow it")
        extension = _member_kind(name, "data.tar", _DATA_EXTENSIONS)
        if extension is None:
            raise DebError(f"has the member {name!r} where data.tar[.gz|.xz|.zst|.bz2] must come third; "
                           f"{_HINT_REBUILD}")
        tree = _data_tree(ctx, _checked_stream(member, name, extension), name)
        member.drain()
    if control is None or tree is None:
        raise DebError(f"has no {'control.tar' if control is None else 'data.tar'} member; {_HINT_REBUILD}")
    return DebContents(control, tree)


def _data_tree(ctx: ActionContext, stream: IO[bytes], name: str) -> list[TreeEntry]:
    tree: dict[str, TreeEntry] = {}
    try:
        for entry, content in tar_extract.archive_entries(stream):
            path = entry.path
            mode = entry.mode & 0o7777
            if entry.kind == "dir":
                tree[path] = TreeEntry(path, "dir", mode)
            elif entry.kind == "symlink":
                tree[path] = TreeEntry(path, "symlink", 0o777, target=entry.target)
            elif entry.kind == "hardlink":
                tree[path] = replace(tree[entry.target], path=path, mode=mode)
            elif entry.kind == "file":
                assert content is not None
                digest, size = ctx.put_stream(content, entry.size)
                tree[path] = TreeEntry(path, "file", mode, digest, size)
            else:
                raise tar_extract.UnsafeArchive(
                    f"is a {tar_extract.kind_text(entry.kind)}; a package tree holds only files, directories "
                    "and symlinks", member=entry.member,
                    hint="create the node when the container starts, or in a root_layer script")
    except tar_extract.UnsafeArchive as e:
        raise DebError(f"has a {name} dtbuild refuses: {e}" + (f"; {e.hint}" if e.hint else "")) from None
    return list(tree.values())


class DebExtract(ActionKind):
    """A fetched .deb (input ``deb``) into the package tree ``tree``: its data files and
    its dpkg database entry. Params: the lock's ``name``, ``version``, ``architecture``."""

    NAME = "DebExtract"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        name, version, arch = ctx.params["name"], ctx.params["version"], ctx.params["architecture"]
        (deb,) = ctx.inputs("deb")
        what = f"the .deb of {name} {version} ({arch})"
        try:
            with ctx.open_input(deb) as stream:
                contents = read_deb(ctx, stream, deb.size)
            fields = control_fields(contents.control.control)
        except DebError as e:
            raise ActionFailed(f"{what} {e}") from None
        for key, expected in (("Package", name), ("Version", version), ("Architecture", arch)):
            found = fields.get(key)
            if found != expected:
                raise ActionFailed(
                    f"{what} is not the package the lock names: its control file says {key}: {found or '(none)'}, "
                    f"the lock says {expected}; run `dtbuild lock` again (the repository changed, or the lock "
                    "was edited by hand)")
        tree = {e.path: e for e in contents.tree}
        dpkg = [(f"{STATUS_DIR}/{name}", status_entry(contents.control.control))]
        if contents.control.md5sums is not None:
            dpkg.append((f"{STATUS_DIR}/{name}.md5sums", contents.control.md5sums))
        parts = STATUS_DIR.split("/")
        for i in range(1, len(parts) + 1):
            directory = "/".join(parts[:i])
            have = tree.get(directory)
            if have is None:
                tree[directory] = TreeEntry(directory, "dir", 0o755)
            elif have.kind != "dir":
                raise ActionFailed(f"{what} holds /{directory} as a {have.kind}, where its dpkg database entry "
                                   f"goes ({STATUS_DIR}/{name})")
        for path, data in dpkg:
            if path in tree:
                raise ActionFailed(f"{what} holds /{path} itself, where dtbuild writes its dpkg database entry")
            tree[path] = TreeEntry(path, "file", 0o644, ctx.put_blob(data), len(data))
        ctx.output_tree("tree", sorted(tree.values(), key=lambda e: e.path))


class DebLockProblem(ActionKind):
    """Fails with ``params["message"]``: what is wrong with a ``deb_packages`` lock and the
    command that writes it. Declared instead of the package actions, so that analysis
    (and ``dtbuild lock`` itself) works without a usable lock and a build says why not."""

    NAME = "DebLockProblem"
    VERSION = "1"

    def run(self, ctx: ActionContext) -> None:
        raise ActionFailed(ctx.params["message"])


DEB_ACTION_KINDS: tuple[type[ActionKind], ...] = (DebExtract, DebLockProblem)
