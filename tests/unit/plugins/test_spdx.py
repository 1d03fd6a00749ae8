"""The pure pieces of the SPDX document: its creation time from an image's ``created``,
element ids, the package verification code (SPDX 2.3 section 7.9's algorithm)."""

from __future__ import annotations

import hashlib
import re

import pytest
from dtbuild.plugins.builtin.spdx import spdx_created, spdx_id, verification_code
from dtbuild.plugins.interfaces import ActionFailed


@pytest.mark.parametrize(("created", "expected"), [
    ("1970-01-01T00:00:01Z", "1970-01-01T00:00:01Z"),
    ("2024-05-06T07:08:09+02:00", "2024-05-06T05:08:09Z"),
    ("2024-05-06T23:30:00.75-01:00", "2024-05-07T00:30:00Z"),
])
def test_created_is_utc_in_whole_seconds(created: str, expected: str) -> None:
    assert spdx_created(created) == expected


def test_created_now_is_the_clock_and_garbage_is_an_error() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", spdx_created("now"))
    with pytest.raises(ActionFailed, match="not an RFC 3339 time"):
        spdx_created("yesterday")


def test_element_ids_are_valid_readable_and_distinct() -> None:
    ids = [spdx_id("File", p) for p in ("usr/bin/a b", "usr/bin/a_b", "usr/bin/a-b", "ü", "")]
    assert all(re.fullmatch(r"SPDXRef-[A-Za-z0-9.-]+", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert ids[0].startswith("SPDXRef-File-usr-bin-a-b-")
    assert spdx_id("Package", "//pkgs:libc") == spdx_id("Package", "//pkgs:libc")


def test_verification_code_is_the_sha1_of_the_sorted_sha1s() -> None:
    a, b = hashlib.sha1(b"a").hexdigest(), hashlib.sha1(b"b").hexdigest()
    assert verification_code([b, a]) == hashlib.sha1((a + b).encode()).hexdigest() == verification_code([a, b])
