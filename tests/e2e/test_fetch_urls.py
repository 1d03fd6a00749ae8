"""fetch_url tries every URL: a host that does not resolve or refuses the connection
falls through to the next URL (a mirror, a file:// fallback) just as an HTTP error does,
and when none works the error lists why each one failed (never an internal error)."""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
APACHE = Path("/usr/share/common-licenses/Apache-2.0")


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_build_example_license_builds_offline_through_its_file_fallback(tmp_path: Path, run_dtbuild: Any) -> None:
    """BUILD.example's //:license: its first URL is on a host that does not resolve
    (example.invalid), its second a file:// copy; the build succeeds with the file's bytes."""
    assert APACHE.exists(), "Debian's base-files ships /usr/share/common-licenses/Apache-2.0"
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "dtbuild.toml").write_text("")
    shutil.copy(ROOT / "BUILD.example", ws / "BUILD")
    (ws / "rootfs" / "etc").mkdir(parents=True)
    (ws / "rootfs" / "etc" / "motd").write_text("welcome\n")
    (ws / "app.conf").write_text("mode = 1\n")
    (ws / "vendor").mkdir()
    (ws / "vendor" / "base.tar").write_bytes(b"")
    run = run_dtbuild.build(ws, "//:license")
    assert run.exit_code == 0, run.stderr
    (output,) = run.summary["targets"]["//:license"]["outputs"]
    fetched = ws / output
    files = [fetched] if fetched.is_file() else [p for p in fetched.rglob("*") if p.is_file()]
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in files] == \
        [hashlib.sha256(APACHE.read_bytes()).hexdigest()]


def test_every_url_is_tried_and_the_error_names_each_failure(write_workspace: Any, run_dtbuild: Any) -> None:
    port = _closed_port()
    missing = "file:///nonexistent/dtbuild-test-file"
    ws = write_workspace({"BUILD": f"""
fetch_url(
    name = "f",
    urls = ["https://unknown-host.invalid/f", "http://127.0.0.1:{port}/f", "{missing}"],
    sha256 = "{'0' * 64}",
)
"""})
    code, _, err = run_dtbuild(ws, "build", "//:f")
    assert code == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    assert "could not download any of the URLs" in err
    for url in ("https://unknown-host.invalid/f", f"http://127.0.0.1:{port}/f", missing):
        assert f"{url}: " in err, err
    assert "unknown-host.invalid" in err and "Connection refused" in err and "No such file" in err, err
    # One line per URL: the tries of one URL are not listed one by one.
    assert err.count(f"http://127.0.0.1:{port}/f: ") == 1, err


def test_a_refused_first_url_falls_through_to_the_next(write_workspace: Any, run_dtbuild: Any,
                                                       tmp_path: Path) -> None:
    payload = tmp_path / "payload.txt"
    payload.write_bytes(b"the second URL's bytes\n")
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    ws = write_workspace({"BUILD": f"""
fetch_url(
    name = "f",
    urls = ["http://127.0.0.1:{_closed_port()}/f", "file://{payload}"],
    sha256 = "{digest}",
)
"""})
    run = run_dtbuild.build(ws, "//:f")
    assert run.exit_code == 0, run.stderr
    (output,) = run.summary["targets"]["//:f"]["outputs"]
    assert (ws / output).read_bytes() == payload.read_bytes()
