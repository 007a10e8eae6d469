"""The user's own settings file: which NBIA servers they trust with their password.

``config.toml`` in the platform's config folder (``~/.config/nbia-retriever/`` on
Linux; ``NBIA_RETRIEVER_CONFIG`` names another file)::

    # Servers that may receive your password or token, besides *.cancerimagingarchive.net
    # (always trusted over https) and the host of --api-url.
    trusted_hosts = ["nbia.example.org", "imaging.lab.internal:8443"]

    # Every request through this proxy (http://, https://, socks5://, socks5h://), unless
    # --proxy or NBIA_PROXY names another.
    proxy = "socks5h://127.0.0.1:1080"

    # Collections whose licence (not a plain CC BY) you have accepted: not asked again.
    # Written by the download's question ("Accept? [y/N]") and the view's dialog.
    [licenses]
    accepted = ["LIDC-IDRI", "NLST"]

A host entry matches any port; ``host:port`` matches that port only (``[::1]:8443`` for
an IPv6 address; an international name in either form, it is kept in its ASCII ``xn--``
form). The file is the
user's, never a manifest's: that is the point. A malformed file is an error naming it,
not a silently empty trust list.
"""

from __future__ import annotations

import json
import os
import re
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
    #: Collections whose licence the user has accepted (``[licenses] accepted``).
    accepted_licenses: tuple[str, ...] = ()


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
    licenses = data.get("licenses", {})
    accepted = licenses.get("accepted", []) if isinstance(licenses, dict) else None
    if not isinstance(accepted, list) or not all(isinstance(c, str) for c in accepted) \
            or set(licenses) - {"accepted"}:
        raise UsageError(f"{path}: [licenses] must hold only accepted = [collection names]")
    unknown = sorted(set(data) - {"trusted_hosts", "proxy", "licenses"})
    if unknown:
        raise UsageError(f"{path}: unknown setting {unknown[0]!r}")
    entries = []
    for host in hosts:
        try:  # the form messages name hosts in: what they tell the user to add
            entries.append(host_entry(host))
        except ValueError as exc:
            raise UsageError(f"{path}: trusted_hosts entry {host!r} {exc}") from None
    return UserConfig(trusted_hosts=tuple(entries), path=path, proxy=proxy or None,
                      accepted_licenses=tuple(accepted))


#: The one line this module writes in ``[licenses]`` (see :func:`accept_licenses`).
_ACCEPTED_LINE = re.compile(r"(?m)^accepted\s*=\s*\[.*\]\s*$")


def accept_licenses(collections: list[str] | tuple[str, ...], path: Path | None = None) -> Path:
    """Remember that the user accepted these collections' licences (``[licenses]
    accepted``), keeping the rest of the file as it is (comments too): the table is added
    at the end, or its one-line ``accepted`` list is rewritten. The result is parsed
    again before it replaces the file (atomically), so a file this cannot edit safely is
    an error naming it, never a damaged settings file."""
    path = path or config_path()
    current = load_user_config(path)
    names = list(dict.fromkeys([*current.accepted_licenses, *collections]))
    line = "accepted = [" + ", ".join(json.dumps(n) for n in names) + "]"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if "[licenses]" in text:
        text, n = _ACCEPTED_LINE.subn(line, text, count=1)
        if n == 0:
            text = text.replace("[licenses]", "[licenses]\n" + line, 1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"[licenses]\n{line}\n"
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        parsed = {}
    if parsed.get("licenses", {}).get("accepted") != names:
        raise UsageError(f"{path}: cannot add the accepted licences safely; add "
                         f"[licenses] {line} by hand")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return path
