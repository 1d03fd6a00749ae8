"""The remote cache and executor a build uses, from the settings.

``[remote]`` of dtbuild.toml, the environment (``DTBUILD_REMOTE_CACHE``,
``DTBUILD_REMOTE_EXECUTOR``, ``DTBUILD_REMOTE_UPLOAD``, ``DTBUILD_REMOTE_USERNAME``,
``DTBUILD_REMOTE_PASSWORD``, ``DTBUILD_REMOTE_TOKEN``) and the command line
(``--remote-cache``, ``--remote-executor``, ``--remote-upload``) are merged by the
workspace (command line over environment over file, see ``workspace.py``); this module
turns the result into :class:`~dtbuild.engine.remote.Endpoint` objects and rejects a bad
value with the setting's name and how to write it. Credentials go to both endpoints;
each error names where they came from, never what they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dtbuild.engine.errors import WorkspaceError
from dtbuild.engine.remote import CACHE_SCHEMES, EXECUTOR_SCHEMES, Credentials, Endpoint, parse_endpoint

if TYPE_CHECKING:
    from dtbuild.plugins.interfaces import Settings

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class RemoteConfig:
    cache: Endpoint | None = None
    executor: Endpoint | None = None
    upload: bool = True
    #: REAPI platform properties of remotely executed commands.
    platform: Mapping[str, str] = field(default_factory=dict)


def configured(settings: Settings) -> bool:
    """Whether a remote cache or executor is set (cheap: no parsing)."""
    remote = settings.section("remote")
    return bool(remote.get("cache") or remote.get("executor"))


def origin(settings: Settings, key: str) -> str:
    """Where ``[remote] key`` came from: the flag, ``$VARIABLE`` or the file."""
    found = settings.origin("remote", key)
    return "$" + found if found.startswith("DTBUILD_") else found


def remote_config(settings: Settings) -> RemoteConfig:
    """The remote endpoints of these settings.

    :raises WorkspaceError: for a bad URL, header, platform property, timeout or flag.
    """
    remote = settings.section("remote")
    if not configured(settings):
        return RemoteConfig()
    headers = _table(settings, "headers")
    instance = remote.get("instance_name", "")
    if not isinstance(instance, str):
        raise WorkspaceError(f"{origin(settings, 'instance_name')}: the instance name must be a string",
                             hint='write instance_name = "main"')
    timeout = remote.get("timeout", DEFAULT_TIMEOUT)
    try:
        timeout = float(timeout)
        if not 0 < timeout <= 86400:
            raise ValueError
    except (TypeError, ValueError):
        raise WorkspaceError(f"{origin(settings, 'timeout')}: {timeout!r} is not a number of seconds",
                             hint="write timeout = 60") from None
    credentials = _credentials(settings)
    endpoints: dict[str, Endpoint | None] = {}
    for key, schemes in (("cache", CACHE_SCHEMES), ("executor", EXECUTOR_SCHEMES)):
        url = remote.get(key)
        if not url:
            endpoints[key] = None
            continue
        if not isinstance(url, str):
            raise WorkspaceError(f"{origin(settings, key)}: the URL must be a string",
                                 hint=f'write {key} = "{schemes[0]}://HOST:PORT"')
        try:
            endpoint = parse_endpoint(url, origin(settings, key), schemes=schemes, instance_name=instance,
                                      headers=headers, credentials=credentials)
        except ValueError as e:
            raise WorkspaceError(str(e)) from None
        endpoints[key] = Endpoint(endpoint.url, endpoint.origin, endpoint.instance_name, endpoint.headers,
                                  endpoint.credentials, timeout=timeout, connect_timeout=min(5.0, timeout),
                                  role=f"remote {key}")
    return RemoteConfig(endpoints["cache"], endpoints["executor"], _flag(settings, "upload", True),
                        _table(settings, "platform"))


def _table(settings: Settings, key: str) -> dict[str, str]:
    value: Any = settings.setting("remote", key, {})
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in value.items()):
        raise WorkspaceError(f"{origin(settings, key)}: {key} must be a table of names to strings",
                             hint=f'write {key} = {{ "x-name" = "value" }}' if key == "headers"
                             else f'write {key} = {{ OSFamily = "linux" }}')
    return dict(value)


def _flag(settings: Settings, key: str, default: bool) -> bool:
    value = settings.setting("remote", key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise WorkspaceError(f"{origin(settings, key)}: {value!r} is neither true nor false",
                         hint=f"write {key} = true or {key} = false")


def _credentials(settings: Settings) -> Credentials:
    remote = settings.section("remote")
    token = remote.get("token")
    if token:
        return Credentials(token=str(token), origin=origin(settings, "token"))
    username = remote.get("username")
    password = remote.get("password")
    if username or password:
        where = origin(settings, "password") if password else origin(settings, "username")
        if username and password and origin(settings, "username") != origin(settings, "password"):
            where = f"{origin(settings, 'username')} and {origin(settings, 'password')}"
        return Credentials(str(username or ""), str(password or ""), origin=where)
    return Credentials()
