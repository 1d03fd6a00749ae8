"""``dtbuild inspect`` on a hostile image: tags, file names, config values and layer
history holding terminal escape sequences (an OSC that retitles the window, a CSI that
clears the screen) and a bidi override are printed escaped, never raw.

The image is a docker-archive crafted here and imported with ``image_archive``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

pytestmark = pytest.mark.e2e

EVIL_FILE = "evil\x1b]0;pwned\x07"
EVIL_DIR = "\u202eexe.txt"
EVIL_TAG = "evil/app:v1\x1b[2J"
EVIL_HISTORY = "RUN echo \x1b]52;c;cm0gLXJmIH4K\x07 \x9b31m"
RAW = ("\x1b", "\x07", "\x9b", "\u202e")


def _tar(members: dict[str, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _hostile_archive() -> bytes:
    layer = _tar({EVIL_FILE: b"x\n", EVIL_DIR: None, EVIL_DIR + "/f": b"y\n"})
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux\x1b[31m", "created": "1970-01-01T00:00:00Z\x1b[0m",
        "config": {"Labels": {"x": "\x1b]0;label\x07 \u202e"}, "Env": ["A=\x1b[5m"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": EVIL_HISTORY}],
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_name = diff_id.removeprefix("sha256:") + "/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [EVIL_TAG], "Layers": [layer_name]}]).encode()
    return _tar({"manifest.json": manifest, config_name: config, layer_name.split("/")[0]: None,
                 layer_name: layer})


def test_inspect_escapes_what_the_image_says(write_workspace, run_dtbuild) -> None:
    ws = write_workspace({"BUILD": 'image_archive(\n    name = "base",\n    src = "evil.tar",\n)\n',
                          "evil.tar": _hostile_archive()})
    code, out, err = run_dtbuild(ws, "inspect", "//:base")
    assert code == 0, f"{out}\n{err}"
    for raw in RAW:
        assert raw not in out and raw not in err, f"{raw!r} reached the terminal raw:\n{out!r}"
    assert "evil/app:v1\\x1b[2J" in out, out
    assert "/evil\\x1b]0;pwned\\x07" in out, out
    assert "/\\u202eexe.txt" in out, out
    assert "linux\\x1b[31m" in out and "\\x9b31m" in out and "\\x1b]52;c;" in out, out
    assert "\\u001b]0;label\\u0007" in out, out  # config values: JSON escapes
