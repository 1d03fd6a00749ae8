"""An example of build summary fields: ``dtbuild_describe_target`` gives every image
target's entry in ``--summary-json`` its ``layer_count`` and ``layer_bytes`` (the sum of
its compressed layer blobs), read from the image's ``NAME.json``.

After ``[plugins] modules = ["tools/layer_sizes.py"]``, ``dtbuild build //images:web
--summary-json s.json`` writes ``"layer_bytes": 2811904`` beside the image's digest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from dtbuild.plugins import hookimpl
from dtbuild.rules.providers import ImageInfo


@hookimpl
def dtbuild_describe_target(label: str, providers: Mapping[type, Any],
                            read_output: Callable[[Any], bytes]) -> Mapping[str, Any] | None:
    image = providers.get(ImageInfo)
    if image is None:
        return None  # not an image: no fields from this plugin
    description = json.loads(read_output(image.description))  # NAME.json, checked as it is read
    layers = description["layers"]
    return {"layer_count": len(layers), "layer_bytes": sum(layer["size"] for layer in layers)}
