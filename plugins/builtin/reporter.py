"""The console reporter, kept importable under its old name: it lives in
:mod:`dtbuild.plugins.console_reporter`, beside the plugin API, so that the engine's
command line shows progress without importing a feature plugin."""

from __future__ import annotations

from dtbuild.plugins.console_reporter import ConsoleReporter

__all__ = ["ConsoleReporter"]
