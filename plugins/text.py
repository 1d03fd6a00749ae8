"""Showing untrusted text on a terminal.

Tags, file names, config values, layer history and registry answers come from images
and servers dtbuild does not control. Printed raw, an escape sequence among them is
executed by the user's terminal (it can retitle the window, rewrite earlier lines, or
paste into the shell), and a bidi override makes a name read differently from what it
is. This module owns the one function that makes such text inert before it is printed:
the engine's CLI and plugins (reporters, the registry client) both use it.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, the bidi embeddings/overrides/isolates and marks, and
# lone surrogates (what a non-UTF-8 byte in a tar name decodes to with surrogateescape;
# printing one would raise UnicodeEncodeError).
_OTHER_UNSAFE = "\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(f"[\x00-\x1f{_OTHER_UNSAFE}]")
#: The same without tab and newline (a carriage return still rewrites the line: escaped).
_UNSAFE_KEEPING_LINES = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHER_UNSAFE}]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: show the original byte
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character (C0, DEL, C1), bidi control and lone
    surrogate shown as an escape: ``\\x1b``, ``\\x9b``, ``\\u202e``. With
    ``keep_newlines``, newlines and tabs stay (multi-line logs and error messages);
    otherwise they are escaped too (one name, one line). Everything else, backslashes
    included, is unchanged, so ordinary text prints as it always did."""
    if not isinstance(text, str):
        text = str(text)
    pattern = _UNSAFE_KEEPING_LINES if keep_newlines else _UNSAFE
    if pattern.search(text) is None:
        return text
    return pattern.sub(_escape, text)


__all__ = ["printable"]
