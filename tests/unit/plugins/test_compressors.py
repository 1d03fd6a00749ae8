"""The built-in compressors: known output bytes, determinism whatever the threads and
write sizes, headers without timestamps, and readers of concatenated members."""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess

import pytest
import zstandard
from dtbuild.plugins.builtin.compressors import (
    BUILTIN_COMPRESSORS,
    GzipCompressor,
    NoneCompressor,
    ZstdCompressor,
    compressor_named,
    detect_compressor,
)
from dtbuild.plugins.interfaces import Compressor

#: 3 MiB of compressible text: more than one gz block, enough for zstd to use its jobs.
KNOWN_INPUT = b"".join(b"line %d of the known answer\n" % i for i in range(100000))


def compress(compressor: Compressor, data: bytes, write_size: int | None = None) -> bytes:
    out = io.BytesIO()
    stream = compressor.compress_to(out)
    step = write_size or max(len(data), 1)
    for start in range(0, len(data), step):
        stream.write(data[start:start + step])
    stream.close()
    assert not out.closed, "closing the compressor must leave the sink open"
    return out.getvalue()


def decompress(compressor: Compressor, data: bytes) -> bytes:
    with compressor.decompress_from(io.BytesIO(data)) as stream:
        return stream.read()


def test_builtin_compressors_have_the_documented_names_and_media_types():
    table = {cls.NAME: (cls.EXTENSION, cls.OCI_LAYER_MEDIA_TYPE, cls.DOCKER_LAYER_MEDIA_TYPE, cls.MAGIC)
             for cls in BUILTIN_COMPRESSORS}
    assert table == {
        "none": ("", "application/vnd.oci.image.layer.v1.tar", "application/vnd.docker.image.rootfs.diff.tar", b""),
        "gz": (".gz", "application/vnd.oci.image.layer.v1.tar+gzip",
               "application/vnd.docker.image.rootfs.diff.tar.gzip", b"\x1f\x8b"),
        "zstd": (".zst", "application/vnd.oci.image.layer.v1.tar+zstd", None, b"\x28\xb5\x2f\xfd"),
    }
    assert all(issubclass(cls, Compressor) for cls in BUILTIN_COMPRESSORS)


@pytest.mark.parametrize(("cls", "sha256"), [
    (GzipCompressor, "7da98fc1e92e34976c7e0ade1ab38cdac62e14ca236b0a95e1c3aec56283b962"),
    (ZstdCompressor, "dbe877afdde72c60cba0e2f51d4a4b71f70efc2fc7c699d438d4600a9462a253"),
])
def test_known_output_whatever_the_thread_count_and_write_sizes(cls, sha256):
    # The digests pin isal 1.9.1 / zstandard 0.25.0 and our settings: if this fails after
    # an upgrade, bump the compressor's VERSION (it is part of action keys).
    outputs = {compress(cls(threads=threads), KNOWN_INPUT, write_size)
               for threads in (1, 2, 3) for write_size in (None, 1000, 65536, 777777)}
    assert len(outputs) == 1
    (output,) = outputs
    assert hashlib.sha256(output).hexdigest() == sha256
    assert decompress(cls(), output) == KNOWN_INPUT


@pytest.mark.parametrize("cls", BUILTIN_COMPRESSORS)
@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 5000], ids=["empty", "one-byte", "binary"])
def test_round_trip(cls, data):
    compressor = cls()
    compressed = compress(compressor, data)
    assert compressed.startswith(cls.MAGIC)
    assert decompress(compressor, compressed) == data


@pytest.mark.parametrize(("cls", "error"), [(GzipCompressor, EOFError), (ZstdCompressor, zstandard.ZstdError)])
def test_a_truncated_stream_is_an_error(cls, error):
    whole = compress(cls(), KNOWN_INPUT)
    for cut in (len(whole) // 2, len(whole) - 1, 5):
        with pytest.raises(error):
            decompress(cls(), whole[:cut])


def test_none_passes_bytes_through():
    assert compress(NoneCompressor(), b"abc" * 10, write_size=7) == b"abc" * 10


def test_gzip_header_has_no_name_and_no_mtime():
    out = io.BytesIO()
    out.name = "/some/file.tar"  # type: ignore[attr-defined]  # a named sink must not leak its name
    stream = GzipCompressor().compress_to(out)
    stream.write(b"data")
    stream.close()
    header = out.getvalue()[:10]
    assert header[:3] == b"\x1f\x8b\x08"
    assert header[3] == 0, "no FNAME/FEXTRA/FCOMMENT flags"
    assert header[4:8] == b"\0\0\0\0", "mtime must be 0"


def test_zstd_frame_has_checksum_and_no_content_size():
    params = zstandard.get_frame_parameters(compress(ZstdCompressor(), KNOWN_INPUT))
    assert params.has_checksum
    assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN


@pytest.mark.parametrize("cls", [GzipCompressor, ZstdCompressor])
def test_concatenated_members_read_as_one_stream(cls, require_tool):
    first, second = b"first part\n" * 1000, bytes(range(256)) * 300
    joined = compress(cls(), first) + compress(cls(), second) + compress(cls(), b"")
    assert decompress(cls(), joined) == first + second
    if cls is GzipCompressor:
        assert gzip.decompress(joined) == first + second
        tool = [require_tool("zcat")]
    else:
        assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(joined), read_across_frames=True).read() \
            == first + second
        tool = [require_tool("zstd"), "-dc"]
    assert subprocess.run(tool, input=joined, capture_output=True, check=True).stdout == first + second


@pytest.mark.parametrize("cls", BUILTIN_COMPRESSORS)
def test_decompress_reads_in_chunks_and_leaves_the_source_open(cls):
    source = io.BytesIO(compress(cls(), KNOWN_INPUT))
    stream = cls().decompress_from(source)
    parts = []
    while chunk := stream.read(100_000):
        parts.append(chunk)
    stream.close()
    assert b"".join(parts) == KNOWN_INPUT
    assert not source.closed


@pytest.mark.parametrize(("first_bytes", "name"), [
    (b"\x1f\x8b\x08\x00", "gz"), (b"\x28\xb5\x2f\xfd\x04", "zstd"), (b"etc/\0\0\0", "none"), (b"", "none"),
])
def test_detect_compressor_by_magic(first_bytes, name):
    assert detect_compressor(first_bytes) == name


def test_compressor_named():
    assert isinstance(compressor_named("gz"), GzipCompressor)
    with pytest.raises(ValueError, match="unknown compressor 'gzip'"):
        compressor_named("gzip")


def test_zstd_never_uses_single_threaded_mode():
    # zstd's single-threaded mode writes other bytes than its multi-threaded mode.
    assert ZstdCompressor(threads=0).threads == 1
