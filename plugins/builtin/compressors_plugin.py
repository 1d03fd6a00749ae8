"""The built-in plugin ``compressors``: ``none``, ``gz`` and ``zstd``
(:mod:`dtbuild.plugins.builtin.compressors`). Another plugin may replace one of them by
registering a compressor of the same NAME with ``REPLACES = True``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dtbuild.plugins import hookimpl

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import Compressor


@hookimpl
def dtbuild_register_compressors() -> Sequence[type[Compressor]]:
    from dtbuild.plugins.builtin.compressors import BUILTIN_COMPRESSORS

    return list(BUILTIN_COMPRESSORS)
