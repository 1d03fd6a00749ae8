"""Canonical JSON, the one encoding of every document whose bytes are hashed: image
configs, manifests and indexes, image descriptions, action keys and cache records.

Sorted keys, no insignificant white space, UTF-8 (no ``\\u`` escapes): the same value
always gives the same bytes, so the same inputs give the same digests. A public module
of the plugin API, importing only the standard library, so that the engine and plugins
share it without importing each other.
"""

from __future__ import annotations

import json
from typing import Any

#: Made once: ``json.dumps`` with options makes a new encoder per call, which costs more
#: than encoding a small document (an action key is one per action of every build).
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON bytes: sorted keys, no spaces, UTF-8."""
    return _ENCODER.encode(value).encode("utf-8")


__all__ = ["canonical_json"]
