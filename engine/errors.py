"""The error hierarchy. Every error a user can cause is a DtbuildError subclass that
renders as ``file:line: in <rule> <target>: what is wrong`` plus an optional hint.
Only the CLI turns them into exit codes (2 for loading and analysis problems the user
fixes in BUILD files or on the command line, 1 for build failures)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Location:
    file: str
    line: int | None = None
    col: int | None = None

    def __str__(self) -> str:
        parts = [self.file]
        if self.line is not None:
            parts.append(str(self.line))
            if self.col is not None:
                parts.append(str(self.col))
        return ":".join(parts)


class DtbuildError(Exception):
    """Base of every error dtbuild reports to its user."""

    #: The process exit code the CLI uses for this kind of error.
    exit_code = 2

    def __init__(self, message: str, *, location: Location | None = None, target: str | None = None,
                 rule: str | None = None, hint: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: Verbatim text shown under the message (a Starlark caret snippet, a command's output).
        self.detail = detail
        self.location = location
        self.target = target
        self.rule = rule
        self.hint = hint

    def render(self) -> str:
        head = ""
        if self.location is not None:
            head += f"{self.location}: "
        if self.target is not None:
            head += f"in {self.rule + ' ' if self.rule else ''}{self.target}: "
        parts = [head + self.message, *self._sections()]
        if self.detail:
            parts.append(self.detail.rstrip())
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)

    def _sections(self) -> list[str]:
        """Blocks shown between the message and the detail (a subclass's context)."""
        return []

    def __str__(self) -> str:
        return self.render()


class UsageError(DtbuildError):
    """A bad command line."""


class WorkspaceError(DtbuildError):
    """No workspace, or a bad dtbuild.toml."""


class LabelError(DtbuildError):
    """A malformed label or target pattern."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One call on the way to an error: where it was made, and what was running there
    (``in my_macro``) or what it did (``load("//tools:defs.bzl")``)."""

    location: Location
    what: str


class BuildFileError(DtbuildError):
    """A BUILD or .bzl file failed to evaluate (syntax, runtime error, bad rule call).

    It renders once, rustc-style: ``file:line:col: message``, the source line (escaped)
    with a caret under the column, the calls that led there (innermost last), the hint."""

    def __init__(self, message: str, *, location: Location | None = None, target: str | None = None,
                 rule: str | None = None, hint: str | None = None, detail: str | None = None,
                 source_line: str | None = None, stack: Iterable[Frame] = ()) -> None:
        super().__init__(message, location=location, target=target, rule=rule, hint=hint, detail=detail)
        #: The text of the location's line, quoted under the message.
        self.source_line = source_line
        #: The calls that led to the error, outermost first.
        self.stack: list[Frame] = list(stack)

    def _sections(self) -> list[str]:
        parts = []
        where = self.location
        if self.source_line is not None and where is not None and where.line is not None:
            parts.append(source_excerpt(self.source_line, where.line, where.col))
        if self.stack:
            parts.append("call stack (innermost last):")
            parts.extend(f"  {frame.location}: {frame.what}" for frame in self.stack)
        return parts


class AttrError(BuildFileError):
    """A rule attribute is unknown, missing or of the wrong type."""


class UnknownTargetError(DtbuildError):
    """A label names no target."""


class CycleError(DtbuildError):
    """The target graph has a dependency cycle."""


class RuleError(DtbuildError):
    """A rule implementation rejected its attributes or inputs during analysis."""


class PluginError(DtbuildError):
    """A plugin failed to load or misbehaved."""


class BuildFailure(DtbuildError):
    """The execution phase failed (an action failed, or the build was interrupted)."""

    exit_code = 1


class ActionError(BuildFailure):
    """An action failed."""


class Interrupted(BuildFailure):
    """The build was stopped by a signal."""


class StoreError(BuildFailure):
    """The local cache is unusable (permissions, disk full)."""


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``word`` (difflib), or None when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A ``did you mean 'x'?`` hint for the closest choice, or None."""
    close = closest(word, choices)
    return f"did you mean '{close}'?" if close else None


#: Widest source text an excerpt shows; a longer line is cut around the column.
EXCERPT_WIDTH = 100


def source_excerpt(text: str, line: int, col: int | None = None) -> str:
    """Line ``line`` of a file (``text``) as shown under an error: escaped (a control
    character cannot reach the terminal, a tab shows as ``\\x09``), numbered, and with a
    caret under column ``col`` (1-based, in characters) when there is one."""
    from dtbuild.plugins.text import printable

    text = text.rstrip("\r\n")
    start = 0
    if len(text) > EXCERPT_WIDTH:
        at = max(0, (col or 1) - 1)
        start = max(0, min(at - EXCERPT_WIDTH // 2, len(text) - EXCERPT_WIDTH))
    shown = text[start:start + EXCERPT_WIDTH]
    lead = "..." if start else ""
    tail = "..." if start + EXCERPT_WIDTH < len(text) else ""
    gutter = str(line)
    excerpt = f"  {gutter} | {lead}{printable(shown)}{tail}".rstrip()
    if col is not None:
        before = lead + printable(text[start:max(start, col - 1)])
        excerpt += f"\n  {' ' * len(gutter)} | {' ' * _display_width(before)}^"
    return excerpt


def _display_width(text: str) -> int:
    """Columns ``text`` takes on a terminal: wide (CJK) characters two, combining none."""
    import unicodedata

    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)
