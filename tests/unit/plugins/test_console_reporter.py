"""The console reporter fed hook calls directly: what the live display shows as time
passes and bytes move, and the plain lines written when the output is not a terminal."""

from __future__ import annotations

import io
import re

import pytest
from dtbuild.plugins import console_reporter
from dtbuild.plugins.console_reporter import ConsoleReporter
from rich.console import Console

PULL = {"label": "//base:debian", "description": "pull docker.io/library/debian:12"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(console_reporter.time, "monotonic", fake)
    return fake


def shown(reporter: ConsoleReporter) -> str:
    """The live display's text as a terminal 100 columns wide would show it."""
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=100, color_system=None).print(reporter.render())
    return out.getvalue()


def filled(text: str, description: str) -> int:
    """How many cells of the progress bar on the line of ``description`` are drawn."""
    line = next(line for line in text.splitlines() if description in line)
    return len(re.findall("[━╸╺]", line))


def live_reporter() -> ConsoleReporter:
    # live=True without a terminal: the display is kept (and rendered by the tests) but
    # rich writes nothing to a non-terminal stream while it runs.
    return ConsoleReporter(io.StringIO(), live=True, environ={})


def test_running_actions_show_timers_that_advance(clock: FakeClock) -> None:
    reporter = live_reporter()
    reporter.dtbuild_build_started(targets=["//web:all"], total_actions=3)
    reporter.dtbuild_action_started(label="//web:httpd", mnemonic="Genrule", description="Genrule //web:httpd")
    clock.now += 1.5
    reporter.dtbuild_action_started(label="//web:conf", mnemonic="Genrule", description="Genrule //web:conf")
    clock.now += 0.5
    first = shown(reporter)
    clock.now += 3.0
    second = shown(reporter)
    reporter.dtbuild_build_finished(summary={}, success=True)

    assert "[0/3] 0 cached, 2.0s, 2 running" in first
    assert "Genrule //web:httpd  2.0s" in first and "Genrule //web:conf  0.5s" in first
    assert "Genrule //web:httpd  5.0s" in second and "Genrule //web:conf  3.5s" in second
    # The longest running first.
    assert second.index("//web:httpd") < second.index("//web:conf")


def test_at_most_eight_running_actions_are_named(clock: FakeClock) -> None:
    reporter = live_reporter()
    reporter.dtbuild_build_started(targets=["//pkg:all"], total_actions=11)
    for n in range(11):
        reporter.dtbuild_action_started(label=f"//pkg:g{n}", mnemonic="Genrule", description=f"Genrule //pkg:g{n}")
        clock.now += 1
    text = shown(reporter)
    reporter.dtbuild_build_finished(summary={}, success=True)
    assert "Genrule //pkg:g7 " in text and "//pkg:g8 " not in text
    assert "... and 3 more" in text


def test_a_transfer_has_a_progress_bar_that_moves_and_goes_when_done(clock: FakeClock) -> None:
    reporter = live_reporter()
    reporter.dtbuild_build_started(targets=["//base:debian"], total_actions=1)
    reporter.dtbuild_action_started(label="//base:debian", mnemonic="ImagePull", description="ImagePull //base:debian")
    reporter.dtbuild_transfer_progress(**PULL, done_bytes=1 << 20, total_bytes=4 << 20)
    clock.now += 1.0
    early = shown(reporter)
    reporter.dtbuild_transfer_progress(**PULL, done_bytes=3 << 20, total_bytes=4 << 20)
    clock.now += 1.0
    later = shown(reporter)

    assert "1.0/4.0 MiB" in early and "3.0/4.0 MiB" in later
    assert 0 < filled(early, PULL["description"]) < filled(later, PULL["description"])
    reporter.dtbuild_transfer_progress(**PULL, done_bytes=4 << 20, total_bytes=4 << 20)
    assert PULL["description"] not in shown(reporter)
    reporter.dtbuild_build_finished(summary={}, success=True)


def test_a_transfer_bar_goes_with_its_action() -> None:
    reporter = live_reporter()
    reporter.dtbuild_build_started(targets=["//base:debian"], total_actions=1)
    reporter.dtbuild_action_started(label="//base:debian", mnemonic="ImagePull", description="ImagePull //base:debian")
    reporter.dtbuild_transfer_progress(**PULL, done_bytes=10, total_bytes=None)  # size unknown
    assert PULL["description"] in shown(reporter)
    reporter.dtbuild_action_finished(label="//base:debian", mnemonic="ImagePull",
                                     description="ImagePull //base:debian", status="executed", seconds=1.0)
    assert PULL["description"] not in shown(reporter)
    reporter.dtbuild_build_finished(summary={}, success=True)


def test_transfer_descriptions_are_shown_inert() -> None:
    reporter = live_reporter()
    reporter.dtbuild_build_started(targets=["//x:y"], total_actions=1)
    reporter.dtbuild_transfer_progress(label="//x:y", description="pull [bold]evil\x1b[2J", done_bytes=1,
                                       total_bytes=2)
    text = shown(reporter)
    reporter.dtbuild_build_finished(summary={}, success=True)
    assert "pull [bold]evil\\x1b[2J" in text


def plain(**kwargs: object) -> tuple[ConsoleReporter, io.StringIO]:
    out = io.StringIO()
    return ConsoleReporter(out, environ={}, **kwargs), out  # type: ignore[arg-type]


def run_two_actions(reporter: ConsoleReporter) -> None:
    reporter.dtbuild_build_started(targets=["//web:all"], total_actions=2)
    reporter.action_key(label="//web:conf", mnemonic="Files", description="Files //web:conf", key="k" * 64)
    reporter.dtbuild_action_finished(label="//web:conf", mnemonic="Files", description="Files //web:conf",
                                     status="cached", seconds=0.0)
    reporter.dtbuild_action_started(label="//web:httpd", mnemonic="Genrule", description="Genrule //web:httpd")
    reporter.action_command(label="//web:httpd", mnemonic="Genrule", description="Genrule //web:httpd",
                            command="/bin/bash -c 'make httpd'")
    reporter.action_key(label="//web:httpd", mnemonic="Genrule", description="Genrule //web:httpd", key="a" * 64)
    reporter.dtbuild_action_finished(label="//web:httpd", mnemonic="Genrule", description="Genrule //web:httpd",
                                     status="executed", seconds=1.25)
    reporter.dtbuild_build_finished(summary={}, success=True)


def test_without_a_terminal_one_line_per_finished_action() -> None:
    reporter, out = plain()
    run_two_actions(reporter)
    assert out.getvalue() == "[1/2] Files //web:conf cached\n[2/2] Genrule //web:httpd 1.2s\n"


def test_verbose_shows_commands_and_cache_keys() -> None:
    reporter, out = plain(verbose=True)
    run_two_actions(reporter)
    assert out.getvalue().splitlines() == [
        f"[1/2] Files //web:conf cached  key {'k' * 64}",
        "Genrule //web:httpd: $ /bin/bash -c 'make httpd'",
        f"[2/2] Genrule //web:httpd 1.2s  key {'a' * 64}",
    ]


def test_quiet_shows_failures_and_warnings_only() -> None:
    from dtbuild.engine.errors import ActionError

    reporter, out = plain(quiet=True, verbose=True)
    run_two_actions(reporter)
    reporter.dtbuild_action_log(label="dtbuild", mnemonic="warning", message="warning: the remote is gone")
    reporter.dtbuild_action_log(label="//web:httpd", mnemonic="Genrule", message="compiling")
    error = ActionError("Genrule failed: command exited with status 2", target="//web:bad",
                        detail="--- output (last lines) ---\nno rule to make httpd\n---")
    reporter.dtbuild_action_finished(label="//web:bad", mnemonic="Genrule", description="Genrule //web:bad",
                                     status="failed", seconds=0.1)
    reporter.action_failed(label="//web:bad", mnemonic="Genrule", description="Genrule //web:bad", error=error)
    assert out.getvalue() == ("  dtbuild: warning: the remote is gone\n"
                              "ERROR: in //web:bad: Genrule failed: command exited with status 2\n"
                              "--- output (last lines) ---\nno rule to make httpd\n---\n")
    assert reporter.shown_errors == [error]


def test_closing_lines_name_the_elapsed_time_slowest_actions_and_critical_path(clock: FakeClock) -> None:
    reporter, _ = plain()
    reporter.dtbuild_build_started(targets=["//pkg:all"], total_actions=4)
    for name, seconds in (("a", 0.5), ("b", 3.0), ("c", 1.0), ("d", 2.0)):
        reporter.dtbuild_action_finished(label=f"//pkg:{name}", mnemonic="Genrule", description=f"Genrule //pkg:{name}",
                                         status="executed", seconds=seconds)
    clock.now += 4.5
    summary = {"critical_path": {"seconds": 5.0, "actions": [
        {"label": "//pkg:b", "mnemonic": "Genrule", "seconds": 3.0},
        {"label": "//pkg:d", "mnemonic": "Genrule", "seconds": 2.0}]}}
    assert reporter.closing_lines(summary) == [
        "Elapsed 4.5s. Slowest: Genrule //pkg:b 3.0s, Genrule //pkg:d 2.0s, Genrule //pkg:c 1.0s.",
        "critical path: 5.0s through 2 action(s): Genrule //pkg:b (3.0s) -> Genrule //pkg:d (2.0s)",
    ]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("environ", "live", "styled"), [
    ({"TERM": "xterm"}, True, True),
    ({"TERM": "dumb"}, False, False),
    ({"TERM": "xterm", "NO_COLOR": "1"}, True, False),
])
def test_term_dumb_means_no_live_display_and_no_color_means_no_styles(environ: dict[str, str], live: bool,
                                                                     styled: bool) -> None:
    terminal = Terminal()
    reporter = ConsoleReporter(terminal, environ=environ)
    assert reporter.live is live
    if live:
        reporter._console().print(reporter.render())
        assert "[0/0] 0 cached" in terminal.getvalue()
        assert ("\x1b[" in terminal.getvalue()) is styled
