"""Untrusted text made inert for a terminal (``dtbuild.plugins.text.printable``), and the
console reporter using it for action logs."""

from __future__ import annotations

import io

import pytest
from dtbuild.plugins.builtin.reporter import ConsoleReporter
from dtbuild.plugins.text import printable


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain text, ünïcödé, back\\slash", "plain text, ünïcödé, back\\slash"),
    ("evil\x1b]0;pwned\x07", "evil\\x1b]0;pwned\\x07"),
    ("\x00\x08\x7f\x85\x9b", "\\x00\\x08\\x7f\\x85\\x9b"),
    ("a\nb\tc\rd", "a\\x0ab\\x09c\\x0dd"),
    ("\u202aa\u202bb\u202cc\u202dd\u202ee", "\\u202aa\\u202bb\\u202cc\\u202dd\\u202ee"),
    ("\u2066\u2067\u2068\u2069\u200e\u200f\u061c", "\\u2066\\u2067\\u2068\\u2069\\u200e\\u200f\\u061c"),
    (b"caf\xe9".decode("utf-8", "surrogateescape"), "caf\\xe9"),  # a non-UTF-8 byte in a tar name
])
def test_printable(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    shown.encode("utf-8")  # always printable on a UTF-8 terminal


def test_printable_keeping_lines() -> None:
    assert printable("one\n\ttwo\x1b[2J\r", keep_newlines=True) == "one\n\ttwo\\x1b[2J\\x0d"


def test_the_reporter_escapes_action_logs() -> None:
    stream = io.StringIO()
    reporter = ConsoleReporter(stream, live=False)
    reporter.dtbuild_action_log(label="//:img", mnemonic="RootLayer",
                                message="installing\x1b]0;pwned\x07 [bold red]x[/]\nnext line")
    text = stream.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert "installing\\x1b]0;pwned\\x07 [bold red]x[/]\nnext line" in text


def test_the_live_reporter_shows_markup_literally() -> None:
    """On a terminal, rich must neither interpret markup nor pass escapes through."""
    stream = io.StringIO()
    reporter = ConsoleReporter(stream, live=True)
    reporter.dtbuild_build_started(targets=["//:img"], total_actions=1)
    try:
        reporter.dtbuild_action_log(label="//:img", mnemonic="RootLayer",
                                    message="[link=file:///etc/shadow]x[/link] :warning: \x1b[31mred")
    finally:
        reporter.dtbuild_build_finished(summary={}, success=True)
    text = stream.getvalue()
    assert "[link=file:///etc/shadow]x[/link] :warning: \\x1b[31mred" in text
    assert "\x1b[31mred" not in text and "\x1b]8;" not in text
