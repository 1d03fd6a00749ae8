"""An example of build globals: ``NONROOT_CONFIG``, an image ``config`` that runs as
the unprivileged user 65534 (nobody), visible in every BUILD and ``.bzl`` file.

After ``[plugins] modules = ["tools/image_presets.py"]``::

    image(name = "app", copy_to_root = [":site"], config = NONROOT_CONFIG)

Globals are plain data (strings, numbers, lists and dicts of them), never functions:
BUILD files stay pure. They reach actions only through the attributes they are given,
so changing one re-runs exactly the targets whose attributes change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dtbuild.plugins import hookimpl

NONROOT_CONFIG = {
    "User": "65534:65534",
    "WorkingDir": "/tmp",
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/tmp"],
}


@hookimpl
def dtbuild_register_build_globals() -> Mapping[str, Any]:
    return {"NONROOT_CONFIG": NONROOT_CONFIG}
