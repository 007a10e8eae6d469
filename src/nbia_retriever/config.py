"""The user's own settings file: which NBIA servers they trust with their password.

``config.toml`` in the platform's config folder (``~/.config/nbia-retriever/`` on
Linux; ``NBIA_RETRIEVER_CONFIG`` names another file)::

    # Servers that may receive your password or token, besides *.cancerimagingarchive.net
    # (always trusted over https) and the host of --api-url.
    trusted_hosts = ["nbia.example.org", "imaging.lab.internal:8443"]

    # Every request through this proxy (http://, https://, socks5://, socks5h://), unless
    # --proxy or NBIA_PROXY names another.
    proxy = "socks5h://127.0.0.1:1080"

A host entry matches any port; ``host:port`` matches that port only (``[::1]:8443`` for
an IPv6 address; an international name in either form, it is kept in its ASCII ``xn--``
form). The file is the
user's, never a manifest's: that is the point. A malformed file is an error naming it,
not a silently empty trust list.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .untrusted import host_entry

APP_NAME = "nbia-retriever"
ENV_CONFIG = "NBIA_RETRIEVER_CONFIG"


def config_path() -> Path:
    """Where the settings file is (it need not exist)."""
    override = os.environ.get(ENV_CONFIG)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_config_dir  # 4 ms: only when the config file is read

    return Path(user_config_dir(APP_NAME, appauthor=False)) / "config.toml"


@dataclass(frozen=True)
class UserConfig:
    trusted_hosts: tuple[str, ...] = ()
    path: Path | None = None
    #: The proxy URL (``--proxy`` and ``NBIA_PROXY`` come first); checked where it is used.
    proxy: str | None = None


def load_user_config(path: Path | None = None) -> UserConfig:
    """The settings, or the defaults when there is no file."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return UserConfig(path=path)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML: {exc}") from None
    hosts = data.get("trusted_hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h.strip() for h in hosts):
        raise UsageError(f"{path}: trusted_hosts must be a list of host names")
    proxy = data.get("proxy")
    if proxy is not None and not isinstance(proxy, str):
        raise UsageError(f"{path}: proxy must be a URL in quotes")
    unknown = sorted(set(data) - {"trusted_hosts", "proxy"})
    if unknown:
        raise UsageError(f"{path}: unknown setting {unknown[0]!r}")
    entries = []
    for host in hosts:
        try:  # the form messages name hosts in: what they tell the user to add
            entries.append(host_entry(host))
        except ValueError as exc:
            raise UsageError(f"{path}: trusted_hosts entry {host!r} {exc}") from None
    return UserConfig(trusted_hosts=tuple(entries), path=path, proxy=proxy or None)
