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
        text = head + self.message
        if self.detail:
            text += "\n" + self.detail.rstrip()
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text

    def __str__(self) -> str:
        return self.render()


class UsageError(DtbuildError):
    """A bad command line."""


class WorkspaceError(DtbuildError):
    """No workspace, or a bad dtbuild.toml."""


class LabelError(DtbuildError):
    """A malformed label or target pattern."""


class BuildFileError(DtbuildError):
    """A BUILD or .bzl file failed to evaluate (syntax, runtime error, bad rule call)."""


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
