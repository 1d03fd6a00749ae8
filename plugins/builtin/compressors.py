"""The built-in compressors ``none``, ``gz`` and ``zstd`` for layer blobs and image
archives, and recognising a compressed stream by its first bytes.

Every compressor here gives the same bytes for the same input on any machine, whatever
the number of CPUs and however the input is split into ``write`` calls:

* ``gz`` is isa-l's deflate (the ``isal`` package, pinned) at its level 2, split into
  1 MiB blocks compressed in parallel, pigz style: each block is deflated with the last
  32 KiB of the block before as its dictionary, so the bytes do not depend on the thread
  count (checked by the tests). The blocks are cut here, at fixed 1 MiB boundaries,
  because isal cuts them where the writes fall. One gzip member, header without name,
  mtime 0.
* ``zstd`` is the ``zstandard`` package (pinned) at level 3 with checksums, always in
  multi-threaded mode: zstd's multi-threaded output is the same for 1 or N workers, but
  differs from its single-threaded mode, so a one-CPU machine still uses one worker.
  The content size is not written (the stream's length is not known in advance).
* ``none`` passes bytes through.

Readers accept concatenated gzip members and zstd frames (archives splice compressed
layer blobs between compressed headers, see :mod:`dtbuild.plugins.builtin.imageformat`)
and raise on a truncated stream (EOFError for gzip, zstandard.ZstdError for zstd).

The compression libraries are imported when first used, so registering the compressors
costs nothing.
"""

from __future__ import annotations

import io
import os
from typing import IO, ClassVar

from dtbuild.plugins.interfaces import Compressor

#: Size of the blocks that ``gz`` compresses independently (part of its output format).
GZIP_BLOCK_SIZE = 1 << 20
#: isa-l compression level of ``gz`` (0-3; 2 is isal's default, about zlib -6 in size).
GZIP_LEVEL = 2
ZSTD_LEVEL = 3


def available_cpus() -> int:
    """CPUs this process may run on (compressor threads; never changes output bytes)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _PassThroughWriter(io.RawIOBase):
    """Writes go to ``sink`` unchanged; closing leaves ``sink`` open."""

    def __init__(self, sink: IO[bytes]) -> None:
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data)
        self._sink.write(view)
        return view.nbytes

    def flush(self) -> None:
        if not self.closed:
            self._sink.flush()


class _NonClosingReader(io.RawIOBase):
    """Reads from ``source``; closing leaves ``source`` open."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        readinto = getattr(self._source, "readinto", None)
        view = memoryview(buffer).cast("B")
        if readinto is not None:
            return readinto(view) or 0
        data = self._source.read(len(view))
        view[: len(data)] = data
        return len(data)


class _BlockingGzipWriter(io.RawIOBase):
    """Feeds an isal threaded gzip writer exactly :data:`GZIP_BLOCK_SIZE` bytes at a
    time, so that the compressed bytes depend on the data only."""

    def __init__(self, sink: IO[bytes], threads: int) -> None:
        from isal import igzip_threaded

        self._gzip = igzip_threaded.open(sink, "wb", compresslevel=GZIP_LEVEL, threads=threads,
                                         block_size=GZIP_BLOCK_SIZE)
        # Exact blocks go straight to the raw writer (it copies them into its queue).
        self._raw = self._gzip.raw
        self._pending = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        total = view.nbytes
        block = GZIP_BLOCK_SIZE
        if self._pending:
            take = min(block - len(self._pending), total)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < block:
                return total
            self._raw.write(self._pending)
            self._pending = bytearray()
        while view.nbytes >= block:
            self._raw.write(view[:block])
            view = view[block:]
        if view.nbytes:
            self._pending += view
        return total

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._pending:
                self._raw.write(self._pending)
                self._pending = bytearray()
            self._gzip.close()  # writes the trailer; the sink stays open (isal never closes a file object)
        finally:
            super().close()


class _ZstdFramesReader(io.RawIOBase):
    """Decompresses concatenated zstd frames, and fails on a stream that ends inside a
    frame (zstandard's ``stream_reader`` returns a short stream without error there)."""

    _INPUT_CHUNK = 256 << 10

    def __init__(self, source: IO[bytes]) -> None:
        import zstandard

        self._source = source
        self._dctx = zstandard.ZstdDecompressor()
        self._error = zstandard.ZstdError
        self._frame: zstandard.ZstdDecompressionObj | None = None
        self._pending = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            if self._eof:
                return 0
            self._decompress_more()
        view = memoryview(buffer).cast("B")
        n = min(view.nbytes, self._pending.nbytes)
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress_more(self) -> None:
        data = self._source.read(self._INPUT_CHUNK)
        if not data:
            if self._frame is not None:
                raise self._error("zstd stream ended inside a frame: the data is truncated")
            self._eof = True
            return
        out = []
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(data))
            if self._frame.eof:
                data = self._frame.unused_data
                self._frame = None
            else:
                data = b""
        self._pending = memoryview(out[0] if len(out) == 1 else b"".join(out))


class NoneCompressor(Compressor):
    """No compression: layer blobs are the tars themselves."""

    NAME: ClassVar[str] = "none"
    EXTENSION: ClassVar[str] = ""
    OCI_LAYER_MEDIA_TYPE: ClassVar[str] = "application/vnd.oci.image.layer.v1.tar"
    DOCKER_LAYER_MEDIA_TYPE: ClassVar[str | None] = "application/vnd.docker.image.rootfs.diff.tar"
    MAGIC: ClassVar[bytes] = b""

    def compress_to(self, sink: IO[bytes]) -> IO[bytes]:
        return _PassThroughWriter(sink)  # type: ignore[return-value]

    def decompress_from(self, source: IO[bytes]) -> IO[bytes]:
        return io.BufferedReader(_NonClosingReader(source), buffer_size=1 << 20)  # type: ignore[return-value]


class GzipCompressor(Compressor):
    """gzip through isa-l, multi-threaded, deterministic (see the module docstring)."""

    NAME: ClassVar[str] = "gz"
    #: isal version, level and block size fix the bytes.
    VERSION: ClassVar[str] = f"1;isal=1.9.1;level={GZIP_LEVEL};block={GZIP_BLOCK_SIZE}"
    EXTENSION: ClassVar[str] = ".gz"
    OCI_LAYER_MEDIA_TYPE: ClassVar[str] = "application/vnd.oci.image.layer.v1.tar+gzip"
    DOCKER_LAYER_MEDIA_TYPE: ClassVar[str | None] = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    MAGIC: ClassVar[bytes] = b"\x1f\x8b"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads if threads is not None else min(available_cpus(), 8)

    def compress_to(self, sink: IO[bytes]) -> IO[bytes]:
        return _BlockingGzipWriter(sink, self.threads)  # type: ignore[return-value]

    def decompress_from(self, source: IO[bytes]) -> IO[bytes]:
        # isal's reader handles concatenated members; threads=1 decompresses in a
        # background thread while the caller consumes.
        from isal import igzip_threaded

        return igzip_threaded.open(source, "rb", threads=1)  # type: ignore[no-any-return]


class ZstdCompressor(Compressor):
    """zstd level 3 with checksums, in multi-threaded mode (see the module docstring)."""

    NAME: ClassVar[str] = "zstd"
    VERSION: ClassVar[str] = f"1;zstandard=0.25.0;level={ZSTD_LEVEL};mt"
    EXTENSION: ClassVar[str] = ".zst"
    OCI_LAYER_MEDIA_TYPE: ClassVar[str] = "application/vnd.oci.image.layer.v1.tar+zstd"
    DOCKER_LAYER_MEDIA_TYPE: ClassVar[str | None] = None
    MAGIC: ClassVar[bytes] = b"\x28\xb5\x2f\xfd"

    def __init__(self, threads: int | None = None) -> None:
        # Never 0: zstd's single-threaded mode writes different bytes.
        self.threads = max(1, threads if threads is not None else min(available_cpus(), 8))

    def compress_to(self, sink: IO[bytes]) -> IO[bytes]:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=self.threads, write_checksum=True,
                                        write_content_size=False)
        return cctx.stream_writer(sink, closefd=False)  # type: ignore[return-value]

    def decompress_from(self, source: IO[bytes]) -> IO[bytes]:
        return io.BufferedReader(_ZstdFramesReader(source), buffer_size=1 << 20)  # type: ignore[return-value]


BUILTIN_COMPRESSORS: list[type[Compressor]] = [NoneCompressor, GzipCompressor, ZstdCompressor]


def detect_compressor(first_bytes: bytes) -> str:
    """The NAME of the built-in compressor whose magic starts ``first_bytes``
    (``"gz"``, ``"zstd"``), else ``"none"``. Give at least 4 bytes."""
    for cls in (GzipCompressor, ZstdCompressor):
        if first_bytes.startswith(cls.MAGIC):
            return cls.NAME
    return NoneCompressor.NAME


def compressor_named(name: str) -> Compressor:
    """A built-in compressor by NAME (for code that runs outside the plugin manager)."""
    for cls in BUILTIN_COMPRESSORS:
        if name == cls.NAME:
            return cls()
    raise ValueError(f"unknown compressor {name!r}; built-in ones are "
                     f"{', '.join(c.NAME for c in BUILTIN_COMPRESSORS)}")
