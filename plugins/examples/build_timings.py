"""An example of the observer hooks: a build log for dashboards. When ``$BUILD_TIMINGS_LOG``
names a file, each build appends JSON lines to it: one per finished action (label,
mnemonic, status, seconds and the number of lines it logged), one per finished transfer
of 1 MiB or more (a download, pull or remote cache transfer) and one for the build.

After ``[plugins] modules = ["tools/build_timings.py"]``::

    BUILD_TIMINGS_LOG=timings.jsonl dtbuild build //...

Observers are called from the thread that reports progress, in order: they must be
quick (this one buffers, and writes once, at the end) and never fail the build.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from dtbuild.plugins import hookimpl

_records: list[dict[str, Any]] = []
_log_lines: dict[tuple[str, str], int] = {}


@hookimpl
def dtbuild_build_started(targets: Sequence[str], total_actions: int) -> None:
    _records.clear()
    _log_lines.clear()
    _records.append({"event": "started", "targets": list(targets), "total_actions": total_actions})


@hookimpl
def dtbuild_action_started(label: str, mnemonic: str, description: str) -> None:
    _log_lines[(label, mnemonic)] = 0  # it missed the cache: it runs


@hookimpl
def dtbuild_action_log(label: str, mnemonic: str, message: str) -> None:
    _log_lines[(label, mnemonic)] = _log_lines.get((label, mnemonic), 0) + 1


@hookimpl
def dtbuild_transfer_progress(label: str, description: str, done_bytes: int, total_bytes: int | None) -> None:
    if done_bytes == total_bytes:  # the last call of a transfer (a download, a push, ...)
        _records.append({"event": "transfer", "label": label, "description": description, "bytes": done_bytes})


@hookimpl
def dtbuild_action_finished(label: str, mnemonic: str, description: str, status: str, seconds: float) -> None:
    _records.append({"event": "action", "label": label, "mnemonic": mnemonic, "status": status,
                     "seconds": round(seconds, 3), "log_lines": _log_lines.pop((label, mnemonic), 0)})


@hookimpl
def dtbuild_build_finished(summary: Mapping[str, Any], success: bool) -> None:
    path = os.environ.get("BUILD_TIMINGS_LOG")
    if not path:
        return
    _records.append({"event": "finished", "success": success, "actions": dict(summary.get("actions", {}))})
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(record, sort_keys=True) + "\n" for record in _records)
    except OSError:
        pass  # a log that cannot be written must not fail the build
