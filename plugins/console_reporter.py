"""The console reporter: the plugin the command line registers to show build progress,
fed by the observer hooks (as pytest's terminal reporter is). It shows builds, whatever
they build, so it sits beside the plugin API rather than among the feature plugins of
:mod:`dtbuild.plugins.builtin`, and the engine's command line may use it.

Plain lines when the output is not a terminal; a live display of running actions,
done/total, cache hits and elapsed time on a terminal.

Action logs carry text from images and scripts (a root script's output, a pulled
image's names): every line is shown with control characters escaped
(:func:`dtbuild.plugins.text.printable`) and, on the live display, without rich markup,
highlighting or emoji codes, so neither an escape sequence nor ``[bold]`` in an image
does anything."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from dtbuild.plugins import hookimpl
from dtbuild.plugins.text import printable


class ConsoleReporter:
    def __init__(self, stream: IO[str] | None = None, *, live: bool | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.quiet = quiet
        self.total = 0
        self.done = 0
        self.cached = 0
        self.running: dict[str, float] = {}
        self.started = time.monotonic()
        self._live: Any = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ rendering

    def _render(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        table = Table.grid(padding=(0, 1))
        elapsed = time.monotonic() - self.started
        table.add_row(Text(f"[{self.done}/{self.total}] {self.cached} cached, {elapsed:.1f}s", style="bold"))
        now = time.monotonic()
        for desc, since in sorted(self.running.items(), key=lambda kv: kv[1])[:8]:
            table.add_row(Text(f"  {printable(desc)}  {now - since:.1f}s", style="cyan"))
        if len(self.running) > 8:
            table.add_row(Text(f"  ... and {len(self.running) - 8} more"))
        return table

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        text = printable(text, keep_newlines=True)
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False, emoji=False)
        else:
            print(text, file=self.stream, flush=True)

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def dtbuild_build_started(self, targets: Sequence[str], total_actions: int) -> None:
        self.total = total_actions
        self.started = time.monotonic()
        if self.live and not self.quiet:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._render(), console=Console(file=self.stream), refresh_per_second=8,
                              transient=True)
            self._live.start()

    @hookimpl
    def dtbuild_action_started(self, label: str, mnemonic: str, description: str) -> None:
        with self._lock:
            self.running[description] = time.monotonic()
            if self._live is None:
                self._print(f"[{self.done + 1}/{self.total}] {description}")
            self._refresh()

    @hookimpl
    def dtbuild_action_finished(self, label: str, mnemonic: str, description: str, status: str,
                                seconds: float) -> None:
        with self._lock:
            self.running.pop(description, None)
            self.done += 1
            if status in ("cached", "remote_cached"):
                self.cached += 1
            elif status == "failed":
                self._print(f"FAILED: {description}")
            self._refresh()

    @hookimpl
    def dtbuild_action_log(self, label: str, mnemonic: str, message: str) -> None:
        with self._lock:
            self._print(f"  {label}: {message}")

    @hookimpl
    def dtbuild_build_finished(self, summary: Mapping[str, Any], success: bool) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        line = critical_path_line(summary)
        if line:
            self._print(line)


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
