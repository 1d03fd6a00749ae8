"""The dtbuild plugin API.

Plugin authors write ``from dtbuild.plugins import hookimpl`` and implement hooks
from :mod:`dtbuild.plugins.hookspecs`. The interfaces a plugin implements
(compressors, executors, action kinds, layer kinds) live in
:mod:`dtbuild.plugins.interfaces`. Built-in features register through exactly the
same hooks, from :mod:`dtbuild.plugins.builtin`.
"""

import pluggy

PROJECT_NAME = "dtbuild"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]
