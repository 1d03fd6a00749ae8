"""Reading tar archives dtbuild did not write: ``fetch_url(extract = True)`` downloads,
the tarballs ``merge_trees`` extracts, image archives and their layers (base images,
``root_layer``'s flattening and upper directories, ``export_image``, ``inspect``).

This module owns what a member of such an archive must be before anything is made of
it. :func:`read_entries` streams an archive and yields validated entries:

* names normalised as GNU tar does (leading ``/`` and ``./`` removed); a name that is
  empty, holds a NUL, or has a ``..`` component is refused;
* a hard link is accepted only to an earlier entry of the same archive that holds file
  content (so it resolves to that entry's bytes, never to a path of the host), or, for a
  layer, to a file the layers below hold (``lower_files``);
* a symbolic link stays a symlink entry and is never followed: a member below a path
  the archive made a symlink (or a file) is refused;
* devices and fifos are reported as such (kind, major, minor) for callers to keep as
  metadata or refuse; owners and modes, setuid, setgid and sticky bits included, are
  carried as metadata.

Nothing here writes a file: entries are data, and a regular file's bytes come as a
stream that callers put into the store, or, from a seekable plain tar, are read later
at their offset (:func:`open_content`). Whiteouts (``.wh.NAME``, ``.wh..wh..opq``) are
ordinary file entries here: applying them is the job of whoever flattens layers.
``extract``/``extractall`` are never used: on Python 3.11.2 (Debian 12's) they have no
``filter`` and follow hard links to host files. Every problem is one exception type,
:class:`UnsafeArchive`, which names the member and says how to fix the archive.
"""

from __future__ import annotations

import contextlib
import io
import lzma
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal

#: Largest PAX extended header or GNU long name/link member read into memory: the limit
#: Go's archive/tar (and so containerd) sets. Larger ones are refused before being read.
MAX_HEADER_SIZE = 1 << 20

ArchiveKind = Literal["file", "hardlink", "dir", "symlink", "char", "block", "fifo"]
#: Kinds that are device or fifo nodes: never created on the host.
SPECIAL_KINDS: frozenset[str] = frozenset({"char", "block", "fifo"})

_NAME_HINT = "repack the archive with relative member names that stay inside it (tar -C DIR -cf out.tar .)"
_LINK_HINT = "repack the archive without the link, or with its target stored before it"


class UnsafeArchive(ValueError):
    """A member of an archive that dtbuild refuses to read (or an archive it cannot read)."""

    def __init__(self, reason: str, *, member: str | None = None, hint: str = "", damaged: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.member = member
        self.hint = hint
        #: The archive cannot be read (truncated, corrupt, not a tar), as opposed to a
        #: member refused by a check.
        self.damaged = damaged

    def __str__(self) -> str:
        where = f"the member {self.member!r} " if self.member is not None else ""
        return f"{where}{self.reason}"

    def message(self, archive: str) -> str:
        """The whole error for a user: which archive, which member, what is wrong, a hint."""
        text = f"{archive}: {self}"
        return f"{text}; {self.hint}" if self.hint else text


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """One validated member of an archive."""

    #: Normalised: relative, '/'-separated, no '.' or '..' components, never empty.
    path: str
    kind: ArchiveKind
    #: Permission bits as stored, setuid/setgid/sticky included (``mode & 0o7777``).
    mode: int
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    #: Bytes of a regular file (0 for other kinds).
    size: int = 0
    #: A symlink's target exactly as stored; for a hard link, the normalised path of the
    #: earlier entry (a file or a hard link) whose content it shares.
    target: str = ""
    devmajor: int = 0
    devminor: int = 0
    #: The member's name exactly as stored (for messages).
    member: str = ""
    #: Where a regular file's bytes start in the (uncompressed) archive, for
    #: :func:`open_content`; -1 when they are not stored in one piece (a sparse member).
    offset: int = -1


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized PAX and GNU long-name headers before tarfile
    reads them into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:  # type: ignore[override]
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                         tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) and self.size > MAX_HEADER_SIZE:
            raise UnsafeArchive(f"has an extended header of {self.size} bytes (at most {MAX_HEADER_SIZE} are read)",
                                hint="this is not an archive tar or GNU tar writes for ordinary files")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def read_errors() -> tuple[type[Exception], ...]:
    """What decompressing (gzip through isal or zlib, zstd, bzip2, xz) and parsing a
    damaged archive raises; isal's ``IsalError`` is no OSError or ValueError."""
    errors: list[type[Exception]] = [tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError]
    with contextlib.suppress(ImportError):
        import zstandard

        errors.append(zstandard.ZstdError)
    with contextlib.suppress(ImportError):
        from isal import isal_zlib

        errors.append(isal_zlib.error)
    return tuple(errors)



def normalize_name(name: str, *, what: str = "name", member: str | None = None) -> str:
    """A member name (or, with ``what``, a hard link target of ``member``) as a relative
    path inside the archive; "" for the archive's root ('.', './', '/').

    :raises UnsafeArchive: for an empty name, a NUL, or a '..' component.
    """
    member = name if member is None else member
    if not name:
        raise UnsafeArchive(f"has an empty {what}", member=member, hint=_NAME_HINT)
    if "\x00" in name:
        raise UnsafeArchive(f"has a NUL character in its {what}", member=member, hint=_NAME_HINT)
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise UnsafeArchive(f"has a '..' component in its {what} {name!r}: dtbuild refuses names that climb "
                            "out of a directory", member=member, hint=_NAME_HINT)
    return "/".join(parts)


class _Checker:
    """The state of one archive's walk: what kind each path has so far."""

    def __init__(self, lower_files: Callable[[str], bool] | None = None) -> None:
        self.kinds: dict[str, str] = {}
        self.lower_files = lower_files

    def check(self, info: tarfile.TarInfo) -> ArchiveEntry | None:
        raw = info.name
        path = normalize_name(raw)
        if not path:
            if info.isdir():
                return None  # the archive's root ("./"): nothing to make
            raise UnsafeArchive("names the archive's root but is not a directory", member=raw, hint=_NAME_HINT)
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            have = self.kinds.get(prefix)
            if have == "symlink":
                raise UnsafeArchive(f"lies below /{prefix}, which the archive made a symbolic link: dtbuild never "
                                    "follows links while extracting", member=raw,
                                    hint="store the files at the path the link points to instead")
            if have is not None and have != "dir":
                raise UnsafeArchive(f"lies below /{prefix}, which the archive made a {kind_text(have)}",
                                    member=raw, hint=_NAME_HINT)
            if have is None:
                self.kinds[prefix] = "dir"
        mode = info.mode & 0o7777
        common: dict[str, Any] = {"uid": info.uid, "gid": info.gid, "uname": info.uname, "gname": info.gname,
                                  "member": raw}
        entry: ArchiveEntry
        if info.isreg():
            contiguous = info.sparse is None and info.type != tarfile.GNUTYPE_SPARSE
            entry = ArchiveEntry(path, "file", mode, size=info.size, offset=info.offset_data if contiguous else -1,
                                 **common)
        elif info.isdir():
            entry = ArchiveEntry(path, "dir", mode, **common)
        elif info.issym():
            target = info.linkname
            if not target or "\x00" in target:
                raise UnsafeArchive(f"is a symbolic link with an {'empty' if not target else 'NUL in its'} target",
                                    member=raw, hint=_LINK_HINT)
            entry = ArchiveEntry(path, "symlink", 0o777, target=target, **common)
        elif info.islnk():
            linked = normalize_name(info.linkname, what="hard link target", member=raw) if info.linkname else ""
            have_target = self.kinds.get(linked)
            in_lower = (have_target is None and bool(linked) and self.lower_files is not None
                        and self.lower_files(linked))
            if have_target not in ("file", "hardlink") and not in_lower:
                raise UnsafeArchive(f"is a hard link to {info.linkname!r}, which is not a file stored earlier in the "
                                    "archive: a hard link may only share the content of an earlier member",
                                    member=raw, hint=_LINK_HINT)
            entry = ArchiveEntry(path, "hardlink", mode, target=linked, **common)
        elif info.ischr() or info.isblk() or info.isfifo():
            kind: ArchiveKind = "char" if info.ischr() else "block" if info.isblk() else "fifo"
            entry = ArchiveEntry(path, kind, mode, devmajor=info.devmajor, devminor=info.devminor, **common)
        else:
            raise UnsafeArchive(f"has tar type {info.type!r}, which dtbuild does not read", member=raw,
                                hint="repack the archive with GNU tar (files, directories and links only)")
        have = self.kinds.get(path)
        if have is not None and (have == "dir") != (entry.kind == "dir"):
            raise UnsafeArchive(f"is a {kind_text(entry.kind)}, but an earlier member made /{path} a "
                                f"{kind_text(have)}", member=raw, hint="repack the archive without the duplicate")
        self.kinds[path] = entry.kind
        return entry


def kind_text(kind: str) -> str:
    """How a message names an entry kind ("character device", "symbolic link")."""
    return {"file": "file", "hardlink": "file", "dir": "directory", "symlink": "symbolic link",
            "char": "character device", "block": "block device", "fifo": "fifo"}.get(kind, kind)


class _Content(io.RawIOBase):
    """A regular member's bytes; read errors (a truncated or corrupt archive) become
    :class:`UnsafeArchive`."""

    def __init__(self, stream: IO[bytes], member: str) -> None:
        self._stream = stream
        self._member = member

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._stream.read(len(buffer))
        except read_errors() as e:
            raise UnsafeArchive(f"cannot be read: the archive is truncated or corrupt ({e or type(e).__name__})",
                                member=self._member, hint="download or build the archive again", damaged=True) from None
        buffer[: len(data)] = data
        return len(data)


def read_entries(stream: IO[bytes], *, compressed: bool = True,
                 lower_files: Callable[[str], bool] | None = None) -> Iterator[tuple[ArchiveEntry, IO[bytes] | None]]:
    """The validated entries of the tar archive in ``stream`` (plain, or with
    ``compressed`` also gzip, bzip2 or xz, told by tarfile; read front to back, never
    seeking), in archive order. A regular file comes with a stream of its bytes, valid
    until the next entry is asked for (bytes not read are skipped); every other kind
    with None. Entries' offsets are positions in the uncompressed stream.

    :param lower_files: for a layer, whether the layers below hold a file at a path: a
        hard link may then share its content (as the OCI image spec lets layers do).
    :raises UnsafeArchive: at the first member that fails a check, or when the archive
        cannot be read.
    """
    checker = _Checker(lower_files)
    try:
        with tarfile.open(fileobj=stream, mode="r|*" if compressed else "r|", tarinfo=BoundedTarInfo) as tar:
            for info in tar:
                entry = checker.check(info)
                if entry is None:
                    continue
                if entry.kind == "file":
                    content = tar.extractfile(info)
                    assert content is not None
                    yield entry, _Content(content, info.name)  # type: ignore[misc]
                else:
                    yield entry, None
    except UnsafeArchive:
        raise
    except read_errors() as e:
        raise UnsafeArchive(f"is not a readable tar archive ({e or type(e).__name__})",
                            hint="check that the file is a tar archive (plain, gzip, zstd, bzip2 or xz)",
                            damaged=True) from None


class _Slice(io.RawIOBase):
    """``size`` bytes at ``offset`` of a seekable stream; closing closes the stream. Too
    few bytes there (the file changed or is truncated) is an :class:`UnsafeArchive`."""

    def __init__(self, stream: IO[bytes], entry: ArchiveEntry) -> None:
        self._stream = stream
        self._remaining = entry.size
        self._member = entry.member or entry.path
        stream.seek(entry.offset)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._remaining <= 0:
            return 0
        data = self._stream.read(min(len(buffer), self._remaining))
        if not data:
            raise UnsafeArchive("ends before its content does: the archive is truncated", member=self._member,
                                hint="download or build the archive again", damaged=True)
        self._remaining -= len(data)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


def open_content(stream: IO[bytes], entry: ArchiveEntry) -> IO[bytes]:
    """The bytes of a regular file ``entry`` that :func:`read_entries` found in a plain
    (uncompressed) tar, read from ``stream`` (the same archive, opened again and
    seekable) at the entry's offset; closing the result closes ``stream``.

    :raises UnsafeArchive: for an entry whose bytes are not stored in one piece.
    """
    if entry.kind != "file" or entry.offset < 0:
        stream.close()
        raise UnsafeArchive("is a sparse file, which dtbuild reads only front to back", member=entry.member,
                            hint="repack the archive without --sparse")
    return io.BufferedReader(_Slice(stream, entry), 1 << 20)  # type: ignore[return-value]


@contextlib.contextmanager
def decompressed(raw: IO[bytes]) -> Iterator[IO[bytes]]:
    """``raw`` (a seekable stream at its start) decompressed when its first bytes are
    gzip's or zstd's (through the built-in compressors); otherwise ``raw`` itself, for
    :func:`read_entries` (tarfile tells bzip2 and xz itself)."""
    from dtbuild.plugins.builtin.compressors import compressor_named, detect_compressor

    if not raw.seekable():
        raw = io.BufferedReader(raw, 1 << 16)  # type: ignore[arg-type, type-var]
        head = raw.peek(4)[:4]  # type: ignore[attr-defined]
    else:
        head = raw.read(4)
        raw.seek(0)
    compression = detect_compressor(head)
    if compression == "none":
        yield raw
        return
    stream = compressor_named(compression).decompress_from(raw)
    try:
        yield stream
    finally:
        stream.close()


def archive_entries(raw: IO[bytes], *, lower_files: Callable[[str], bool] | None = None,
                    ) -> Iterator[tuple[ArchiveEntry, IO[bytes] | None]]:
    """:func:`read_entries` of ``raw`` decompressed (gzip, zstd, bzip2, xz or none).

    :raises UnsafeArchive: as :func:`read_entries`, also when decompressing fails.
    """
    try:
        with decompressed(raw) as stream:
            yield from read_entries(stream, lower_files=lower_files)
    except UnsafeArchive:
        raise
    except read_errors() as e:  # the decompressor's own errors, at its first read or close
        raise UnsafeArchive(f"is not a readable tar archive ({e or type(e).__name__})",
                            hint="check that the file is a tar archive (plain, gzip, zstd, bzip2 or xz)",
                            damaged=True) from None
