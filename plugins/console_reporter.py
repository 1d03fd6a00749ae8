"""The console reporter: the plugin the command line registers to show build progress,
fed by the observer hooks (as pytest's terminal reporter is). It shows builds, whatever
they build, so it sits beside the plugin API rather than among the feature plugins of
:mod:`dtbuild.plugins.builtin`, and the engine's command line may use it.

On a terminal (and not ``TERM=dumb``) a live display, redrawn several times a second:
done/total, cache hits, elapsed time, each running action with its own timer, and a
byte progress bar per transfer. Elsewhere (CI logs, pipes) one line per finished action
with its status and duration, and nothing while it runs. ``NO_COLOR`` (non-empty, see
no-color.org) turns colour and every other text style off; the live display stays.

Besides the hooks, the command line hands this reporter what the hooks do not carry, as
the build's observer (``ActionRunner.observe``): each command as it starts, each cache
key, each failure's error. It prints them (commands and keys with ``verbose``) and
remembers which errors it showed, so the command line prints each error once.

Action logs carry text from images and scripts (a root script's output, a pulled
image's names): every line is shown with control characters escaped
(:func:`dtbuild.plugins.text.printable`) and, on the live display, without rich markup,
highlighting or emoji codes, so neither an escape sequence nor ``[bold]`` in an image
does anything."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from dtbuild.plugins import hookimpl
from dtbuild.plugins.text import printable

#: Running actions listed by name on the live display; the others are counted.
SHOWN_RUNNING = 8
#: Actions named after "slowest:" in the closing lines.
SHOWN_SLOWEST = 3


@dataclass(slots=True)
class _Transfer:
    done: int
    total: int | None
    task: Any = None  # its row on the live display (a rich TaskID), once shown


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class _Display:
    """What the live display shows: rendered afresh at every refresh (rich calls
    ``__rich__``), so timers move while nothing else happens."""

    def __init__(self, reporter: ConsoleReporter) -> None:
        self.reporter = reporter

    def __rich__(self) -> Any:
        return self.reporter.render()


class ConsoleReporter:
    """Shows a build on ``stream`` (standard error by default).

    :param live: force the live display on or off (default: when ``stream`` is a
        terminal and ``TERM`` is not ``dumb``).
    :param quiet: show only errors and warnings (the command line prints the summary).
    :param verbose: also show each action's command and cache key.
    :param action_lines: without the live display, a line per finished action (a
        command that prints its own results may not want them).
    :param environ: the environment to read ``NO_COLOR`` and ``TERM`` from.
    """

    def __init__(self, stream: IO[str] | None = None, *, live: bool | None = None, quiet: bool = False,
                 verbose: bool = False, action_lines: bool = True, environ: Mapping[str, str] | None = None) -> None:
        self.stream = stream or sys.stderr
        env = os.environ if environ is None else environ
        #: no-color.org: a non-empty NO_COLOR means no colour (and here no style at all).
        self.no_color = env.get("NO_COLOR", "") != ""
        self.live = (_isatty(self.stream) and env.get("TERM", "") != "dumb") if live is None else live
        self.quiet = quiet
        self.verbose = verbose and not quiet
        self.action_lines = action_lines
        self.total = 0
        self.done = 0
        self.cached = 0
        #: (label, description) -> when it started, for the actions running now.
        self.running: dict[tuple[str, str], float] = {}
        #: (seconds, description) of every action that ran, for the slowest.
        self.ran: list[tuple[float, str]] = []
        #: (label, description) -> cache key, between action_key and action_finished.
        self._keys: dict[tuple[str, str], str] = {}
        #: (label, description) -> bytes moved so far, for transfers under way.
        self.transfers: dict[tuple[str, str], _Transfer] = {}
        #: The errors printed as their actions failed (the command line skips them).
        self.shown_errors: list[Any] = []
        self.started = time.monotonic()
        self._in_build = False
        self._live: Any = None
        self._progress: Any = None
        # Two locks: state (held briefly, also by the live display's refresh thread
        # while it renders) and output (held while printing). Printing never happens
        # under the state lock, so a refresh never waits on a print that waits on it.
        self._state = threading.Lock()
        self._output = threading.RLock()

    # ------------------------------------------------------------------ the live display

    def render(self) -> Any:
        """The live display as it is now: a header, the running actions (longest first)
        and a progress bar per transfer."""
        from rich.console import Group
        from rich.text import Text

        now = time.monotonic()
        with self._state:
            running = sorted(self.running.items(), key=lambda kv: kv[1])
            header = (f"[{self.done}/{self.total}] {self.cached} cached, {now - self.started:.1f}s"
                      + (f", {len(running)} running" if running else ""))
        rows: list[Any] = [Text(header, style="bold")]
        for (_label, description), since in running[:SHOWN_RUNNING]:
            rows.append(Text.assemble("  ", (printable(description), "cyan"), f"  {now - since:.1f}s"))
        if len(running) > SHOWN_RUNNING:
            rows.append(Text(f"  ... and {len(running) - SHOWN_RUNNING} more"))
        progress = self._progress
        if progress is not None and progress.tasks:
            rows.append(progress.make_tasks_table(progress.tasks))
        return Group(*rows)

    def _console(self) -> Any:
        from rich.console import Console

        return Console(file=self.stream, color_system=None if self.no_color else "auto", highlight=False,
                       emoji=False, markup=False)

    def _start_live(self) -> None:
        """Start the live display (on a terminal, unless quiet), if it is not running."""
        if self._live is not None or not self.live or self.quiet:
            return
        from rich.live import Live
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        console = self._console()
        # Never started itself: it keeps the transfers' samples (for the speed) and
        # renders their rows inside the display.
        self._progress = Progress(TextColumn("  {task.description}", markup=False), BarColumn(bar_width=30),
                                  DownloadColumn(binary_units=True), TransferSpeedColumn(), console=console,
                                  auto_refresh=False)
        # Not redirecting stdout: a command such as `stream` writes an image there.
        self._live = Live(_Display(self), console=console, refresh_per_second=8, transient=True,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def _stop_live(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()
        self._progress = None
        with self._state:
            for transfer in self.transfers.values():
                transfer.task = None

    def close(self) -> None:
        """Stop the live display (the terminal gets its cursor back)."""
        with self._output:
            self._stop_live()

    # ------------------------------------------------------------------ output

    def _print(self, text: str, *, style: str | None = None, always: bool = False) -> None:
        """Print one message (above the live display when it runs). ``always``: also
        when quiet (errors and warnings)."""
        if self.quiet and not always:
            return
        text = printable(text, keep_newlines=True)
        with self._output:
            if self._live is not None:
                from rich.text import Text

                self._live.console.print(Text(text, style=style or ""), soft_wrap=True)
            else:
                print(text, file=self.stream, flush=True)

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def dtbuild_build_started(self, targets: Sequence[str], total_actions: int) -> None:
        with self._state:
            self.total += total_actions  # a command may build more than once
            self._in_build = True
        with self._output:
            self._start_live()

    @hookimpl
    def dtbuild_action_started(self, label: str, mnemonic: str, description: str) -> None:
        with self._state:
            self.running[(label, description)] = time.monotonic()

    @hookimpl
    def dtbuild_action_finished(self, label: str, mnemonic: str, description: str, status: str,
                                seconds: float) -> None:
        with self._state:
            self.running.pop((label, description), None)
            self.done += 1
            done, total = self.done, self.total
            key = self._keys.pop((label, description), None)
            if status in ("cached", "remote_cached"):
                self.cached += 1
            elif status in ("executed", "remote_executed"):
                self.ran.append((seconds, description))
            # Bars of what this action moved go with it, finished or not.
            ended = [k for k in self.transfers if k[0] == label]
            for k in ended:
                self._end_transfer(k)
        if status == "failed":
            if self._live is not None or self.action_lines:
                self._print(f"[{done}/{total}] {description} FAILED after {seconds:.1f}s", style="bold red")
            return
        if self._live is not None or not self.action_lines:
            if key is not None and self.verbose:
                self._print(f"{description}: key {key}")
            return
        shown = {"executed": f"{seconds:.1f}s", "remote_executed": f"{seconds:.1f}s (remote)",
                 "cached": "cached", "remote_cached": "cached (remote)"}.get(status, status)
        self._print(f"[{done}/{total}] {description} {shown}" + (f"  key {key}" if key and self.verbose else ""))

    @hookimpl
    def dtbuild_action_log(self, label: str, mnemonic: str, message: str) -> None:
        self._print(f"  {label}: {message}", always=mnemonic == "warning")

    @hookimpl
    def dtbuild_transfer_progress(self, label: str, description: str, done_bytes: int,
                                  total_bytes: int | None) -> None:
        """A bar per transfer on the live display; elsewhere nothing (with ``verbose``,
        a line when one completes)."""
        key = (label, description)
        finished = total_bytes is not None and done_bytes >= total_bytes
        with self._output:  # locks in this order: output, state, the bars' own
            if not finished:
                self._start_live()
            with self._state:
                transfer = self.transfers.get(key)
                if transfer is None:
                    transfer = self.transfers[key] = _Transfer(done_bytes, total_bytes)
                transfer.done, transfer.total = done_bytes, total_bytes
                progress = self._progress
                if finished:
                    self._end_transfer(key)
                elif progress is not None:
                    if transfer.task is None:
                        transfer.task = progress.add_task(printable(description), total=total_bytes)
                    progress.update(transfer.task, completed=done_bytes, total=total_bytes)
                idle = not self.transfers and not self._in_build
            if finished:
                if self.verbose and self._live is None:
                    self._print(f"  {label}: {description}: {_size(done_bytes)}")
                if idle:  # a transfer outside a build (a push): the display goes with the last one
                    self._stop_live()

    def _end_transfer(self, key: tuple[str, str]) -> None:
        """Drop a transfer and its bar (the caller holds the state lock)."""
        transfer = self.transfers.pop(key, None)
        progress = self._progress
        if transfer is not None and transfer.task is not None and progress is not None:
            progress.remove_task(transfer.task)

    @hookimpl
    def dtbuild_build_finished(self, summary: Mapping[str, Any], success: bool) -> None:
        with self._state:
            self._in_build = False
            self.running.clear()
            for key in list(self.transfers):
                self._end_transfer(key)
        with self._output:
            self._stop_live()

    # ------------------------------------------------------------------ the build's observer

    def action_command(self, label: str, mnemonic: str, description: str, command: str) -> None:
        if self.verbose:
            self._print(f"{description}: $ {command}")

    def action_key(self, label: str, mnemonic: str, description: str, key: str) -> None:
        if key:
            with self._state:
                self._keys[(label, description)] = key

    def action_failed(self, label: str, mnemonic: str, description: str, error: Any) -> None:
        """Print a failed action's reason as it fails (its status, command and output)."""
        render = getattr(error, "render", None)
        self._print(f"ERROR: {render() if callable(render) else error}", always=True)
        self.shown_errors.append(error)

    # ------------------------------------------------------------------ the closing lines

    def closing_lines(self, summary: Mapping[str, Any]) -> list[str]:
        """The last lines of a build's output: the elapsed time and the slowest actions,
        then the critical path (when anything ran)."""
        elapsed = time.monotonic() - self.started
        with self._state:
            slowest = sorted(self.ran, key=lambda sd: -sd[0])[:SHOWN_SLOWEST]
        line = f"Elapsed {elapsed:.1f}s."
        if slowest:
            line += " Slowest: " + ", ".join(f"{printable(desc)} {seconds:.1f}s" for seconds, desc in slowest) + "."
        lines = [line]
        path = critical_path_line(summary)
        if path:
            lines.append(path)
        return lines


def critical_path_line(summary: Mapping[str, Any]) -> str | None:
    """"critical path: 2.4s through 3 action(s): Genrule //a:x (1.9s) -> ...", or None
    when no action ran."""
    path = summary.get("critical_path")
    if not isinstance(path, Mapping) or not path.get("actions"):
        return None
    steps = path["actions"]
    shown = [f"{step['mnemonic']} {step['label']} ({step['seconds']:.1f}s)" for step in steps[:3]]
    if len(steps) > 3:
        shown.append(f"... {len(steps) - 3} more")
    return f"critical path: {path['seconds']:.1f}s through {len(steps)} action(s): {' -> '.join(shown)}"
