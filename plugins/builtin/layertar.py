"""Deterministic layer tars, written in one streaming pass that also hashes and
compresses them.

This module owns the byte format of every layer dtbuild writes:

* POSIX ustar headers built by hand (``ustar\\0`` magic, version ``00``), numeric owners
  (``uname``/``gname`` empty unless given), every mtime :data:`LAYER_MTIME`, directory
  names ending in ``/`` as GNU tar writes them. A path longer than 100 bytes is split
  into the prefix and name fields where GNU tar splits it (at the last ``/`` that fits
  the 155-byte prefix).
* A PAX extended header (type ``x``, named ``././@PaxHeader`` as Python's tarfile names
  it) only for a field that does not fit: a path that cannot be split, a link target over
  100 bytes, a size of 8 GiB or more, a uid/gid over 2097151, a long user/group name.
  Its records are sorted by key and never hold times, so they are deterministic.
* The archive ends with two zero blocks and is NOT padded to a 10240-byte record: Go's
  archive/tar (docker, containerd, skopeo, umoci) writes no padding either, they and
  GNU tar and Python's tarfile read it, and a layer stays 0-10 KiB smaller. For a small
  tree the bytes equal ``tar --format=ustar --sort=name --mtime=@1 --owner=0 --group=0
  --numeric-owner`` cut after its two zero blocks (the tests check this).

The writer does not sort: :func:`sorted_entries` gives GNU ``tar --sort=name`` order.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import IO, Literal

from dtbuild.plugins.builtin.compressors import NoneCompressor
from dtbuild.plugins.interfaces import Compressor

#: The mtime of every entry of every layer (SOURCE_DATE_EPOCH=1, as in dockerTools).
LAYER_MTIME = 1

BLOCK_SIZE = 512
#: How a tar ends: two zero blocks.
END_OF_ARCHIVE = bytes(2 * BLOCK_SIZE)

LayerEntryKind = Literal["file", "dir", "symlink", "hardlink", "char"]

_TYPEFLAGS: dict[str, bytes] = {"file": b"0", "hardlink": b"1", "symlink": b"2", "char": b"3", "dir": b"5"}
_MAX_OCTAL_7 = 0o7777777  # 8-byte numeric fields: mode, uid, gid
_MAX_OCTAL_11 = 0o77777777777  # 12-byte numeric fields: size (8 GiB - 1)
_MTIME_FIELD = b"%011o\0" % LAYER_MTIME
_ZERO_DEVICE = b"0000000\0"
_PAX_NAME = b"././@PaxHeader"
_HEADER_TAIL = bytes(12)


class LayerSourceChanged(ValueError):
    """A file gave more or fewer bytes than its declared size while it was archived."""


@dataclass(frozen=True, slots=True)
class LayerEntry:
    """One member of a layer tar.

    ``path`` is relative ('/'-separated, no leading or trailing '/', no '.' or '..'
    component). ``mode`` holds permission bits with setuid/setgid/sticky (file type bits
    are ignored). ``open`` returns a binary stream of a file's ``size`` bytes. ``linkname``
    is a symlink's target or, for a hardlink, the path of the entry it links to. ``char``
    is a character device of numbers ``devmajor``/``devminor`` (0/0 is overlayfs'
    whiteout; the image format's own whiteouts are empty files named ``.wh.NAME``).
    """

    path: str
    kind: LayerEntryKind
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    size: int = 0
    open: Callable[[], IO[bytes]] | None = None
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0


@dataclass(frozen=True, slots=True)
class LayerDigests:
    """What one pass of :func:`write_layer` computed."""

    #: "sha256:<hex>" of the uncompressed tar.
    diff_id: str
    tar_size: int
    #: "sha256:<hex>" of the compressed blob (equal to ``diff_id`` without compression).
    blob_digest: str
    blob_size: int
    #: OCI layer media type of the blob.
    media_type: str
    #: Docker schema 2 media type of the blob, or None where Docker has none (zstd).
    docker_media_type: str | None


def _path_key(path: str) -> list[bytes]:
    return path.encode("utf-8", "surrogateescape").split(b"/")


def sorted_entries(entries: Iterable[LayerEntry]) -> list[LayerEntry]:
    """``entries`` in GNU ``tar --sort=name`` order of a tree walk: each directory
    directly followed by its contents, siblings by the byte order of their names.

    :raises ValueError: when two entries have the same path.
    """
    ordered = sorted(entries, key=lambda e: _path_key(e.path))
    for before, after in itertools.pairwise(ordered):
        if before.path == after.path:
            raise ValueError(f"duplicate path in layer: /{after.path} appears twice "
                             f"(as a {before.kind} and as a {after.kind})")
    return _links_after_targets(ordered)


def _links_after_targets(ordered: list[LayerEntry]) -> list[LayerEntry]:
    """``ordered`` with every hard link after the entry it links to, as tar readers
    (umoci, GNU tar) need: where sorting put a link first, the first path of the group
    carries the data and the others link to it. A link to a path outside the layer (a
    lower layer's file) is left as it is."""
    position = {entry.path: i for i, entry in enumerate(ordered)}
    groups: dict[str, list[int]] = {}
    for i, entry in enumerate(ordered):
        if entry.kind == "hardlink" and position.get(entry.linkname, -1) > i \
                and ordered[position[entry.linkname]].kind != "hardlink":
            groups.setdefault(entry.linkname, []).append(i)
    if not groups:
        return ordered
    out = list(ordered)
    for target, early in groups.items():
        first = early[0]
        data = ordered[position[target]]
        out[first] = replace(data, path=ordered[first].path)
        out[position[target]] = replace(ordered[first], path=target, linkname=ordered[first].path)
        for i, entry in enumerate(ordered):
            if entry.kind == "hardlink" and entry.linkname == target and i != first:
                out[i] = replace(entry, linkname=ordered[first].path)
    return out


# --------------------------------------------------------------------------- headers


def _encode(text: str) -> bytes:
    # Names that were not UTF-8 on disk come back as surrogate escapes (os.fsdecode).
    return text.encode("utf-8", "surrogateescape")


def _split_ustar_name(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) fields for a path, split where GNU tar splits it; None if it
    cannot be split."""
    length = len(name)
    if length <= 100:
        return b"", name
    if length > 256:
        return None
    limit = 156 if length > 156 else (length - 1 if name.endswith(b"/") else length)
    cut = name.rfind(b"/", 1, limit)
    if cut <= 0 or not 0 < length - cut - 1 <= 100:
        return None
    return name[:cut], name[cut + 1:]


_MAGIC_VERSION = b"ustar\x0000"
#: Checksum contribution of the fields that never change: mtime, magic and version,
#: and the checksum field itself counted as 8 spaces.
_CONSTANT_CHECKSUM = sum(_MTIME_FIELD) + sum(_MAGIC_VERSION) + 8 * 0x20


#: The fields a layer's entries mostly share, by (mode, uid, gid, typeflag, uname,
#: gname, device numbers): (mode+uid+gid fields, magic through device numbers, their
#: checksum share with the constant fields and the typeflag).
_SHARED_FIELDS: dict[tuple[int, int, int, bytes, bytes, bytes, int, int], tuple[bytes, bytes, int]] = {}


def _shared_fields(mode: int, uid: int, gid: int, typeflag: bytes, uname: bytes,
                   gname: bytes, devmajor: int = 0, devminor: int = 0) -> tuple[bytes, bytes, int]:
    key = (mode, uid, gid, typeflag, uname, gname, devmajor, devminor)
    shared = _SHARED_FIELDS.get(key)
    if shared is None:
        owner = b"%07o\0%07o\0%07o\0" % (mode, uid, gid)
        devices = b"%07o\0%07o\0" % (devmajor, devminor) if devmajor or devminor else _ZERO_DEVICE * 2
        tail = b"".join((_MAGIC_VERSION, uname.ljust(32, b"\0"), gname.ljust(32, b"\0"), devices))
        shared = (owner, tail, _CONSTANT_CHECKSUM + sum(owner) + typeflag[0] + sum(uname) + sum(gname)
                  + sum(devices))
        if len(_SHARED_FIELDS) >= 256:
            _SHARED_FIELDS.clear()
        _SHARED_FIELDS[key] = shared
    return shared


def _ustar_header(name: bytes, mode: int, uid: int, gid: int, size: int, typeflag: bytes, linkname: bytes,
                  uname: bytes, gname: bytes, prefix: bytes, devmajor: int = 0, devminor: int = 0) -> bytes:
    owner, tail, shared_sum = _shared_fields(mode, uid, gid, typeflag, uname, gname, devmajor, devminor)
    size_f = b"%011o\0" % size
    # Padding is NUL, so the checksum sums the fields' contents only.
    checksum = shared_sum + sum(name) + sum(size_f) + (sum(linkname) if linkname else 0) + (
        sum(prefix) if prefix else 0)
    return b"".join((name.ljust(100, b"\0"), owner, size_f, _MTIME_FIELD, b"%06o\0 " % checksum, typeflag,
                     linkname.ljust(100, b"\0"), tail, prefix.ljust(155, b"\0"), _HEADER_TAIL))


def _pax_records(records: dict[str, bytes]) -> bytes:
    """PAX extended header data: "<len> <key>=<value>\\n" records, sorted by key."""
    binary = False
    out = []
    for key in sorted(records):
        value = records[key]
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            binary = True
        out.append((key.encode("ascii"), value))
    if binary:
        out.insert(0, (b"hdrcharset", b"BINARY"))
    data = []
    for key, value in out:
        body = b" " + key + b"=" + value + b"\n"
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length = len(str(length)) + len(body)
        data.append(b"%d" % length + body)
    return b"".join(data)


def entry_header(entry: LayerEntry) -> bytes:
    """The header block(s) of ``entry``: a PAX header first when a field needs one."""
    kind = entry.kind
    typeflag = _TYPEFLAGS.get(kind)
    if typeflag is None:
        raise ValueError(f"layer entry /{entry.path}: unknown kind {kind!r} "
                         f"(one of {', '.join(sorted(_TYPEFLAGS))})")
    _check_path(entry.path)
    path = entry.path.encode("utf-8", "surrogateescape")
    if kind == "dir":
        path += b"/"
    size = entry.size if kind == "file" else 0
    if size < 0:
        raise ValueError(f"layer entry /{entry.path}: negative size {size}")
    linkname = _encode(entry.linkname) if entry.linkname else b""
    if kind in ("symlink", "hardlink"):
        if not linkname:
            raise ValueError(f"layer entry /{entry.path}: a {kind} needs a linkname")
        if kind == "hardlink":
            _check_path(entry.linkname)
    elif linkname:
        raise ValueError(f"layer entry /{entry.path}: a {kind} has no linkname")
    uname = _encode(entry.uname) if entry.uname else b""
    gname = _encode(entry.gname) if entry.gname else b""
    uid, gid = entry.uid, entry.gid
    if uid < 0 or gid < 0:
        raise ValueError(f"layer entry /{entry.path}: negative owner {uid}:{gid}")
    devmajor, devminor = entry.devmajor, entry.devminor
    if (devmajor or devminor) and kind != "char":
        raise ValueError(f"layer entry /{entry.path}: a {kind} has no device numbers")
    if not (0 <= devmajor <= _MAX_OCTAL_7 and 0 <= devminor <= _MAX_OCTAL_7):
        raise ValueError(f"layer entry /{entry.path}: device numbers {devmajor},{devminor} do not fit a tar header "
                         f"(0 to {_MAX_OCTAL_7} each)")

    pax: dict[str, bytes] = {}
    split = _split_ustar_name(path)
    if split is None:
        pax["path"] = path
        prefix, name = b"", path[:100]
    else:
        prefix, name = split
    if len(linkname) > 100:
        pax["linkpath"] = linkname
        linkname = linkname[:100]
    if size > _MAX_OCTAL_11:
        pax["size"] = b"%d" % size
        size_field = 0
    else:
        size_field = size
    if uid > _MAX_OCTAL_7:
        pax["uid"] = b"%d" % uid
        uid = 0
    if gid > _MAX_OCTAL_7:
        pax["gid"] = b"%d" % gid
        gid = 0
    if len(uname) > 32:
        pax["uname"] = uname
        uname = uname[:32]
    if len(gname) > 32:
        pax["gname"] = gname
        gname = gname[:32]
    header = _ustar_header(name, entry.mode & 0o7777, uid, gid, size_field, typeflag, linkname, uname, gname,
                           prefix, devmajor, devminor)
    if not pax:
        return header
    records = _pax_records(pax)
    pax_header = _ustar_header(_PAX_NAME, 0o644, 0, 0, len(records), b"x", b"", b"", b"", b"")
    return b"".join((pax_header, records, _padding(len(records)), header))


#: Zero bytes for any padding to a block boundary.
_ZERO_BLOCK = bytes(BLOCK_SIZE)


def _padding(size: int) -> bytes:
    return _ZERO_BLOCK[: -size % BLOCK_SIZE]


def _check_path(path: str) -> None:
    if not path or path[0] == "/" or path[-1] == "/" or "\0" in path:
        raise ValueError(f"layer entry path {path!r} must be relative, non-empty, without a trailing '/'")
    if "//" not in path and not (path in (".", "..") or path.startswith(("./", "../"))
                                 or path.endswith(("/.", "/..")) or "/./" in path or "/../" in path):
        return  # no empty, '.' or '..' component
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"layer entry path {path!r} has an empty, '.' or '..' component")


# --------------------------------------------------------------------------- streaming


def hashes_itself(out: IO[bytes] | None) -> bool:
    """Whether ``out`` is a writer that hashes what it is given (a store writer: the
    ``output_writer`` of an action, with ``hexdigest()``), so its digest need not be
    computed a second time."""
    return out is not None and callable(getattr(out, "hexdigest", None))


class _HashingSink:
    """A write-only stream that hashes (unless ``hashing`` is off) and counts what passes
    to ``sink`` (or nowhere)."""

    def __init__(self, sink: IO[bytes] | None, *, hashing: bool = True) -> None:
        self.sink = sink
        self.hash = hashlib.sha256() if hashing else None
        self.size = 0

    def hexdigest(self) -> str:
        """The sha256 of what passed: this sink's, or the sink's own when it hashes."""
        if self.hash is not None:
            return self.hash.hexdigest()
        return self.sink.hexdigest()  # type: ignore[union-attr]

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.hash is not None:
            self.hash.update(data)
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self.size += n
        if self.sink is not None:
            self.sink.write(data)
        return n

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()


class TarStream:
    """Assembles tar bytes in one fixed buffer; each full buffer is hashed (unless
    ``hashing`` is off) and handed to every output in ``outputs``. File contents are read
    straight into the buffer, so nothing is copied twice and memory stays bounded.
    Outputs must not keep the buffers they are given (file objects and the compressors
    copy them)."""

    def __init__(self, chunk_size: int, outputs: list[IO[bytes]], *, hashing: bool = True) -> None:
        if chunk_size < BLOCK_SIZE:
            raise ValueError(f"chunk_size must be at least {BLOCK_SIZE}")
        self.buffer = bytearray(chunk_size)
        self.view = memoryview(self.buffer)
        self.pos = 0
        self.hash = hashlib.sha256() if hashing else None
        #: Bytes flushed so far.
        self.size = 0
        self.outputs = outputs

    def flush(self) -> None:
        if self.pos:
            chunk = self.view[: self.pos]
            if self.hash is not None:
                self.hash.update(chunk)
            for out in self.outputs:
                out.write(chunk)
            self.size += self.pos
            self.pos = 0

    def put(self, data: bytes) -> None:
        n = len(data)
        if n <= len(self.buffer) - self.pos:
            self.view[self.pos: self.pos + n] = data
            self.pos += n
            return
        offset = 0
        while offset < n:
            space = len(self.buffer) - self.pos
            if space == 0:
                self.flush()
                continue
            take = min(space, n - offset)
            self.view[self.pos: self.pos + take] = data[offset: offset + take]
            self.pos += take
            offset += take

    def put_contents(self, opener: Callable[[], IO[bytes]] | None, size: int, what: str) -> None:
        """Copy exactly ``size`` bytes from the stream ``opener`` returns, then the zero
        padding to a block boundary. ``what`` names the file in errors.

        :raises LayerSourceChanged: when the stream is shorter or longer than ``size``.
        """
        if opener is None:
            if size:
                raise ValueError(f"{what}: a file of {size} bytes needs an opener")
            return
        buffer_size = len(self.buffer)
        with opener() as stream:
            readinto = getattr(stream, "readinto", None)
            remaining = size
            if readinto is not None and 0 < size <= buffer_size - self.pos:
                # A file that fits in the buffer (the common small file): one read.
                pos = self.pos
                n = readinto(self.view[pos: pos + size]) or 0
                self.pos = pos + n
                remaining -= n
            while remaining:
                if self.pos == buffer_size:
                    self.flush()
                want = min(buffer_size - self.pos, remaining)
                target = self.view[self.pos: self.pos + want]
                if readinto is not None:
                    n = readinto(target) or 0
                else:
                    data = stream.read(want)
                    n = len(data)
                    target[:n] = data
                if n == 0:
                    raise LayerSourceChanged(f"{what} ended after {size - remaining} of its {size} bytes: "
                                             f"it changed while it was archived")
                self.pos += n
                remaining -= n
            if stream.read(1):
                raise LayerSourceChanged(f"{what} holds more than its {size} bytes: it changed while it was "
                                         f"archived")
        pad = -size % BLOCK_SIZE
        if pad:
            if pad <= buffer_size - self.pos:
                self.view[self.pos: self.pos + pad] = _ZERO_BLOCK[:pad]
                self.pos += pad
            else:
                self.put(_ZERO_BLOCK[:pad])


def write_layer(entries: Iterable[LayerEntry], *, tar_out: IO[bytes] | None = None,
                compressor: Compressor | None = None, blob_out: IO[bytes] | None = None,
                chunk_size: int = 1 << 20) -> LayerDigests:
    """Write ``entries`` (in the order given) as a layer tar, in one streaming pass.

    :param tar_out: receives the uncompressed tar (optional).
    :param compressor: compresses the blob; ``None`` or the ``none`` compressor make the
        blob the tar itself.
    :param blob_out: receives the compressed blob (optional; without compression it
        receives the tar too).

    Every byte is hashed once: the tar by this function (or, when a writer that receives
    exactly the tar hashes it, see :func:`hashes_itself`, by that writer), the compressed
    blob by ``blob_out`` when it hashes, else here.
    :param chunk_size: size of the one buffer used; memory stays bounded by it whatever
        the file sizes.
    :return: the digests and sizes of the tar and of the blob.
    :raises ValueError: for an invalid entry.
    :raises LayerSourceChanged: when a file's bytes differ in length from its ``size``.
    """
    plain = compressor is None or not compressor.MAGIC
    outputs: list[IO[bytes]] = []
    if tar_out is not None:
        outputs.append(tar_out)
    blob_sink: _HashingSink | None = None
    blob_stream: IO[bytes] | None = None
    if plain:
        if blob_out is not None:
            outputs.append(blob_out)
    else:
        assert compressor is not None
        blob_sink = _HashingSink(blob_out, hashing=not hashes_itself(blob_out))
        blob_stream = compressor.compress_to(blob_sink)  # type: ignore[arg-type]
        outputs.append(blob_stream)
    # The tar's hash: a writer that gets exactly the tar and hashes it anyway gives it.
    tar_hasher = next((out for out in outputs if out is not blob_stream and hashes_itself(out)), None)
    stream = TarStream(chunk_size, outputs, hashing=tar_hasher is None)
    try:
        put, put_contents = stream.put, stream.put_contents
        for entry in entries:
            put(entry_header(entry))
            if entry.kind == "file" and (entry.size or entry.open is not None):
                put_contents(entry.open, entry.size, "/" + entry.path)
        stream.put(END_OF_ARCHIVE)
        stream.flush()
    finally:
        if blob_stream is not None:
            blob_stream.close()
    diff_id = "sha256:" + (stream.hash.hexdigest() if stream.hash is not None
                           else tar_hasher.hexdigest())  # type: ignore[union-attr]
    if blob_sink is None:
        # An uncompressed layer has the none compressor's media types.
        plain = compressor if compressor is not None else NoneCompressor
        media_type, docker_type = plain.OCI_LAYER_MEDIA_TYPE, plain.DOCKER_LAYER_MEDIA_TYPE
        return LayerDigests(diff_id, stream.size, diff_id, stream.size, media_type, docker_type)
    assert compressor is not None
    return LayerDigests(diff_id, stream.size, "sha256:" + blob_sink.hexdigest(), blob_sink.size,
                        compressor.OCI_LAYER_MEDIA_TYPE, compressor.DOCKER_LAYER_MEDIA_TYPE)
