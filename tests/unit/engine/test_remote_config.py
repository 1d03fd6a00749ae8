"""The remote endpoints from the settings (engine/remote/config.py and parse_endpoint):
the command line wins over the environment, which wins over dtbuild.toml; every bad
value is a WorkspaceError that names where it came from and how to write it; credentials
come from the URL, the settings or a netrc file, and no URL or message shows a secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dtbuild.engine.errors import WorkspaceError
from dtbuild.engine.remote import CACHE_SCHEMES, Credentials, parse_endpoint
from dtbuild.engine.remote.config import RemoteConfig, configured, remote_config
from dtbuild.engine.workspace import Workspace

FILE = "[remote] {} in dtbuild.toml"


@pytest.fixture(autouse=True)
def no_user_netrc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The user's own ~/.netrc never leaks into a test."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NETRC", raising=False)


def _config(remote: dict[str, Any] | None = None, environ: dict[str, str] | None = None,
            flags: dict[str, Any] | None = None) -> RemoteConfig:
    ws = Workspace("/nonexistent-root", {"remote": remote} if remote is not None else {})
    for key, value in (flags or {}).items():
        ws.override(f"remote.{key}", value, "--remote-" + key.replace("_", "-"))
    return remote_config(ws.settings(environ or {}))


def _error(remote: dict[str, Any] | None = None, environ: dict[str, str] | None = None,
           flags: dict[str, Any] | None = None) -> WorkspaceError:
    with pytest.raises(WorkspaceError) as info:
        _config(remote, environ, flags)
    return info.value


# --------------------------------------------------------------------------- precedence


def test_nothing_configured_is_no_remote() -> None:
    assert _config() == RemoteConfig()
    assert _config({"headers": {"x": "y"}, "upload": False}) == RemoteConfig()
    ws = Workspace("/nonexistent-root", {"remote": {"instance_name": "main"}})
    assert not configured(ws.settings({}))


def test_the_flag_wins_over_the_environment_which_wins_over_the_file() -> None:
    remote = {"cache": "http://file.test:1", "executor": "grpc://file.test:2"}
    env = {"DTBUILD_REMOTE_CACHE": "https://env.test:3", "DTBUILD_REMOTE_EXECUTOR": "grpcs://env.test:4"}
    from_file = _config(remote)
    assert from_file.cache is not None and from_file.executor is not None
    assert (from_file.cache.url, from_file.cache.origin) == ("http://file.test:1", FILE.format("cache"))
    assert (from_file.executor.url, from_file.executor.origin) == ("grpc://file.test:2", FILE.format("executor"))
    from_env = _config(remote, env)
    assert from_env.cache is not None and from_env.executor is not None
    assert (from_env.cache.url, from_env.cache.origin) == ("https://env.test:3", "$DTBUILD_REMOTE_CACHE")
    assert (from_env.executor.url, from_env.executor.origin) == ("grpcs://env.test:4", "$DTBUILD_REMOTE_EXECUTOR")
    from_flag = _config(remote, env, {"cache": "grpc://flag.test:5"})
    assert from_flag.cache is not None and from_flag.executor is not None
    assert (from_flag.cache.url, from_flag.cache.origin) == ("grpc://flag.test:5", "--remote-cache")
    assert from_flag.executor.origin == "$DTBUILD_REMOTE_EXECUTOR"


def test_an_empty_variable_overrides_nothing() -> None:
    got = _config({"cache": "http://file.test:1"}, {"DTBUILD_REMOTE_CACHE": "  "})
    assert got.cache is not None and got.cache.origin == FILE.format("cache")


def test_a_url_is_normalized() -> None:
    got = _config({"cache": " https://Cache.Test:8443/prefix/ "})
    assert got.cache is not None and got.cache.url == "https://cache.test:8443/prefix"
    assert got.cache.scheme == "https"
    v6 = _config({"cache": "grpc://[::1]:9092"})
    assert v6.cache is not None and v6.cache.url == "grpc://[::1]:9092"


def test_settings_reach_the_endpoints() -> None:
    got = _config({"cache": "grpc://c.test:1", "executor": "grpc://e.test:2", "instance_name": "main",
                   "headers": {"x-team": "builds"}, "timeout": 7, "platform": {"OSFamily": "linux"}})
    assert got.cache is not None and got.executor is not None
    for endpoint in (got.cache, got.executor):
        assert endpoint.instance_name == "main" and dict(endpoint.headers) == {"x-team": "builds"}
        assert endpoint.timeout == 7.0 and endpoint.connect_timeout == 5.0
    assert got.platform == {"OSFamily": "linux"}
    short = _config({"cache": "grpc://c.test:1", "timeout": 0.5})
    assert short.cache is not None and short.cache.connect_timeout == 0.5


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("url", ["cache.test:9090", "ftp://cache.test", "http://", "grpc:///path", "",
                                 "file:///tmp/cache", "http//cache.test"])
def test_a_bad_cache_url_names_its_origin(url: str) -> None:
    if not url:
        assert _config({"cache": url}) == RemoteConfig()  # empty: not configured
        return
    e = _error({"cache": url})
    assert str(e).startswith(FILE.format("cache") + ":") and repr(url) in str(e)
    assert "http://HOST:PORT" in str(e) and "grpcs://HOST:PORT" in str(e)
    e = _error(environ={"DTBUILD_REMOTE_CACHE": url})
    assert str(e).startswith("$DTBUILD_REMOTE_CACHE:")
    e = _error(flags={"cache": url})
    assert str(e).startswith("--remote-cache:")


@pytest.mark.parametrize("url", ["http://cache.test:9092", "https://cache.test"])
def test_an_executor_must_be_grpc(url: str) -> None:
    e = _error({"executor": url})
    assert str(e).startswith(FILE.format("executor") + ":") and "grpc://HOST:PORT" in str(e)
    assert "http://HOST" not in str(e)


@pytest.mark.parametrize("url", ["http://cache.test:port", "grpc://cache.test:99999", "http://[::1:80"])
def test_a_url_with_a_bad_port_names_its_origin(url: str) -> None:
    e = _error({"cache": url})
    assert str(e).startswith(FILE.format("cache") + ":") and "HOST:PORT" in str(e)


@pytest.mark.parametrize("value", [42, ["http://a.test"], {"url": "http://a.test"}])
def test_a_url_that_is_not_a_string_is_refused(value: Any) -> None:
    e = _error({"cache": value})
    assert str(e).startswith(FILE.format("cache")) and "must be a string" in str(e)
    assert e.hint is not None and "http://HOST:PORT" in e.hint


@pytest.mark.parametrize("key", ["headers", "platform"])
@pytest.mark.parametrize("value", ["x-a: b", ["x-a", "b"], {"x-a": 1}, {"x-a": {"nested": "v"}}, {"x-a": True}])
def test_headers_and_platform_must_be_tables_of_strings(key: str, value: Any) -> None:
    e = _error({"cache": "grpc://c.test:1", key: value})
    assert str(e).startswith(FILE.format(key)) and "table of names to strings" in str(e)
    assert e.hint is not None and e.hint.startswith(f"write {key} = {{")


def test_a_bad_instance_name_or_timeout_is_refused() -> None:
    e = _error({"cache": "grpc://c.test:1", "instance_name": 3})
    assert str(e).startswith(FILE.format("instance_name")) and e.hint == 'write instance_name = "main"'
    for timeout in ("soon", 0, -1, 86401, [1], float("nan")):
        e = _error({"cache": "grpc://c.test:1", "timeout": timeout})
        assert str(e).startswith(FILE.format("timeout")) and "seconds" in str(e) and e.hint == "write timeout = 60"


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False), ("true", True), ("1", True), ("YES", True), (" on ", True),
    ("false", False), ("0", False), ("no", False), ("Off", False),
])
def test_upload_parsing(value: Any, expected: bool) -> None:
    assert _config({"cache": "grpc://c.test:1", "upload": value}).upload is expected


def test_upload_defaults_to_true_and_the_environment_and_flag_win() -> None:
    remote = {"cache": "grpc://c.test:1", "upload": True}
    assert _config({"cache": "grpc://c.test:1"}).upload is True
    assert _config(remote, {"DTBUILD_REMOTE_UPLOAD": "false"}).upload is False
    assert _config(remote, {"DTBUILD_REMOTE_UPLOAD": "false"}, {"upload": True}).upload is True


@pytest.mark.parametrize(("remote", "environ", "flags", "origin"), [
    ({"upload": "maybe"}, {}, {}, FILE.format("upload")),
    ({"upload": 2}, {}, {}, FILE.format("upload")),
    ({}, {"DTBUILD_REMOTE_UPLOAD": "sometimes"}, {}, "$DTBUILD_REMOTE_UPLOAD"),
    ({}, {}, {"upload": "perhaps"}, "--remote-upload"),
])
def test_a_bad_upload_value_names_its_origin(remote: dict[str, Any], environ: dict[str, str],
                                             flags: dict[str, Any], origin: str) -> None:
    e = _error({"cache": "grpc://c.test:1", **remote}, environ, flags)
    assert str(e).startswith(origin + ":") and "neither true nor false" in str(e)
    assert e.hint == "write upload = true or upload = false"


# --------------------------------------------------------------------------- credentials


def _credentials(remote: dict[str, Any], environ: dict[str, str] | None = None) -> Credentials:
    got = _config({"cache": "https://c.test", "executor": "grpcs://e.test", **remote}, environ)
    assert got.cache is not None and got.executor is not None
    assert got.cache.credentials == got.executor.credentials  # both endpoints get them
    return got.cache.credentials


def test_a_token_and_its_origin() -> None:
    creds = _credentials({"token": "file-token"})
    assert (creds.token, creds.origin) == ("file-token", FILE.format("token"))
    assert creds.header() == ("Authorization", "Bearer file-token")
    creds = _credentials({"token": "file-token"}, {"DTBUILD_REMOTE_TOKEN": "env-token"})
    assert (creds.token, creds.origin) == ("env-token", "$DTBUILD_REMOTE_TOKEN")


def test_a_token_wins_over_basic_credentials() -> None:
    creds = _credentials({"username": "u", "password": "p"}, {"DTBUILD_REMOTE_TOKEN": "tok"})
    assert creds.token == "tok" and creds.username is None and creds.header() == ("Authorization", "Bearer tok")


def test_basic_credentials_and_their_origins() -> None:
    creds = _credentials({"username": "ann", "password": "pw-file"})
    assert (creds.username, creds.password) == ("ann", "pw-file")
    assert creds.origin == FILE.format("username") + " and " + FILE.format("password")
    assert creds.header() == ("Authorization", "Basic YW5uOnB3LWZpbGU=")
    creds = _credentials({"username": "ann"}, {"DTBUILD_REMOTE_PASSWORD": "pw-env"})
    assert creds.password == "pw-env"
    assert creds.origin == FILE.format("username") + " and $DTBUILD_REMOTE_PASSWORD"
    creds = _credentials({}, {"DTBUILD_REMOTE_USERNAME": "bob", "DTBUILD_REMOTE_PASSWORD": "pw"})
    assert (creds.username, creds.origin) == ("bob", "$DTBUILD_REMOTE_USERNAME and $DTBUILD_REMOTE_PASSWORD")
    creds = _credentials({"password": "only-pw"})
    assert (creds.username, creds.password, creds.origin) == ("", "only-pw", FILE.format("password"))
    creds = _credentials({"username": "solo"})
    assert (creds.username, creds.password, creds.origin) == ("solo", "", FILE.format("username"))


def _netrc(tmp_path: Path, text: str) -> str:
    path = tmp_path / "netrc"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def test_netrc_credentials_for_the_host(tmp_path: Path) -> None:
    path = _netrc(tmp_path, "machine cache.test login nina password netrc-pw\nmachine other login x password y\n")
    endpoint = parse_endpoint("https://cache.test:443", "--remote-cache", schemes=CACHE_SCHEMES,
                              environ={"NETRC": path})
    creds = endpoint.credentials
    assert (creds.username, creds.password) == ("nina", "netrc-pw")
    assert creds.origin == f"the netrc file {path} (machine cache.test)"
    none = parse_endpoint("https://elsewhere.test", "--remote-cache", schemes=CACHE_SCHEMES, environ={"NETRC": path})
    assert none.credentials == Credentials()
    missing = parse_endpoint("https://cache.test", "x", schemes=CACHE_SCHEMES, environ={"NETRC": str(tmp_path / "no")})
    assert missing.credentials == Credentials()
    directory = parse_endpoint("https://cache.test", "x", schemes=CACHE_SCHEMES, environ={"NETRC": str(tmp_path)})
    assert directory.credentials == Credentials()  # unreadable: no credentials, no error


def test_netrc_from_the_process_environment_in_remote_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETRC", _netrc(tmp_path, "machine c.test login nina password netrc-pw\n"))
    got = _config({"cache": "https://c.test", "executor": "grpcs://e.test"})
    assert got.cache is not None and got.executor is not None
    assert got.cache.credentials.username == "nina" and "netrc" in got.cache.credentials.origin
    assert got.executor.credentials == Credentials()  # another host
    # settings win over the netrc file
    assert _credentials({"token": "tok"}).token == "tok"


def test_netrc_in_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine c.test login hana password home-pw\n")
    (home / ".netrc").chmod(0o600)
    got = _config({"cache": "https://c.test"})
    assert got.cache is not None
    creds = got.cache.credentials
    assert creds.username == "hana" and creds.origin == "the netrc file ~/.netrc (machine c.test)"


def test_credentials_in_the_url_win(tmp_path: Path) -> None:
    path = _netrc(tmp_path, "machine c.test login nina password netrc-pw\n")
    endpoint = parse_endpoint("https://url%40user:p%3Ass@c.test:8080/x", "--remote-cache", schemes=CACHE_SCHEMES,
                              credentials=Credentials(token="tok", origin="$DTBUILD_REMOTE_TOKEN"),
                              environ={"NETRC": path})
    creds = endpoint.credentials
    assert (creds.username, creds.password, creds.token) == ("url@user", "p:ss", None)
    assert creds.origin == "the user name and password in the URL of --remote-cache"
    assert endpoint.url == "https://c.test:8080/x"
    got = _config({"cache": "https://ann:url-pw@c.test", "token": "tok"})
    assert got.cache is not None and got.cache.credentials.password == "url-pw"
    assert got.cache.credentials.origin == f"the user name and password in the URL of {FILE.format('cache')}"


@pytest.mark.parametrize("url", ["https://ann:hunter2-pw@c.test:1/p", "grpcs://ann:hunter2-pw@c.test",
                                 "http://:hunter2-pw@c.test"])
def test_the_url_and_the_repr_never_hold_the_password(url: str) -> None:
    got = _config({"cache": url})
    assert got.cache is not None
    assert "hunter2" not in got.cache.url and "@" not in got.cache.url
    assert "hunter2" not in repr(got) and "hunter2" not in str(got.cache)
    assert got.cache.credentials.password == "hunter2-pw"


def test_redact_hides_every_secret() -> None:
    got = _config({"cache": "https://ann:hunter2-pw@c.test", "headers": {"x-api-key": "header-secret"}})
    assert got.cache is not None
    text = "refused: user ann, password hunter2-pw, key header-secret, again hunter2-pw"
    assert got.cache.redact(text) == "refused: user ann, password ***, key ***, again ***"
    token = _config({"cache": "https://c.test"}, {"DTBUILD_REMOTE_TOKEN": "tok-123456"})
    assert token.cache is not None and token.cache.redact("Bearer tok-123456") == "Bearer ***"
    assert "tok-123456" not in repr(token)
    assert token.cache.all_headers() == {"Authorization": "Bearer tok-123456"}


def test_a_credential_error_names_the_origin_without_the_secret() -> None:
    creds = _credentials({"password": "pw-secret", "username": "ann"})
    assert "pw-secret" not in creds.origin and "pw-secret" not in repr(creds)
