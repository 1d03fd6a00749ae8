"""An example compressor: ``xz``, with Python's own ``lzma``.

After ``[plugins] modules = ["tools/xz_compressor.py"]``, ``image(..., compressor = "xz")``
writes ``NAME.tar.xz`` and xz-compressed layer blobs, and images built on xz layers
(``image_archive``) read them. docs/plugins.md, "A compressor", explains each line.
"""

from __future__ import annotations

import ctypes
import lzma
from typing import IO, ClassVar

from dtbuild.plugins import hookimpl
from dtbuild.plugins.interfaces import Compressor

PRESET = 6  # xz's default: about 94 MiB of memory to compress, 9 MiB to decompress


def _liblzma_version() -> str:
    """The version of the liblzma that Python's lzma module uses: its output for one
    preset may change between releases, so it belongs in VERSION."""
    import _lzma

    try:
        version = ctypes.CDLL(_lzma.__file__).lzma_version_string
        version.restype = ctypes.c_char_p
        return version().decode()
    except (AttributeError, OSError):  # a static or unusual build: no symbol to ask
        return "unknown"


class XzCompressor(Compressor):
    """xz (LZMA2), single-threaded, so the bytes never depend on the machine."""

    NAME: ClassVar[str] = "xz"
    VERSION: ClassVar[str] = f"1;preset={PRESET};liblzma={_liblzma_version()}"
    EXTENSION: ClassVar[str] = ".xz"
    # Neither OCI nor Docker defines an xz layer type. dtbuild reads this one back, but
    # tools that keep to the OCI spec (umoci) refuse such a layout; the docker-archive
    # NAME.tar.xz (plain layers in one xz stream) loads in podman and skopeo.
    OCI_LAYER_MEDIA_TYPE: ClassVar[str] = "application/vnd.oci.image.layer.v1.tar+xz"
    DOCKER_LAYER_MEDIA_TYPE: ClassVar[str | None] = None
    MAGIC: ClassVar[bytes] = b"\xfd7zXZ\x00"

    def compress_to(self, sink: IO[bytes]) -> IO[bytes]:
        # An xz header holds no name and no time; closing the LZMAFile writes the
        # stream's footer and leaves ``sink`` open (it did not open it).
        return lzma.LZMAFile(sink, "wb", format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=PRESET)

    def decompress_from(self, source: IO[bytes]) -> IO[bytes]:
        # LZMAFile reads concatenated xz streams, as archives need, and raises EOFError
        # on a truncated one.
        return lzma.LZMAFile(source, "rb")


@hookimpl
def dtbuild_register_compressors() -> list[type[Compressor]]:
    return [XzCompressor]
