"""What an archive says about itself beyond its DICOM files: licenses, access, users.

Read from ``ROOT/nbia-archive.toml``. Everything is optional: an archive without the file
is fully public under a CC BY 4.0 licence, with the guest user only::

    token_lifetime = 7200                 # seconds an access token lives
    refresh_token_lifetime = 86400        # seconds a refresh token lives

    [collections."LIDC-IDRI"]
    license_name = "Creative Commons Attribution 3.0 Unported License"
    license_url = "https://creativecommons.org/licenses/by/3.0/"
    description_uri = "https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX"
    license_text = "..."                  # the LICENSE entry of every zip (optional)
    date_released = "2011-09-01"
    third_party = false                   # "3rd Party Analysis"
    restricted = false                    # restricted: visible on v2 to listed users only

    [users."alice"]
    password = "secret"
    collections = ["RESTRICTED-COLL"]

Unknown keys are errors rather than warnings: a typo such as ``restriced = true`` would
otherwise silently publish a restricted collection.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArchiveError as ArchiveError  # re-export

CONFIG_NAME = "nbia-archive.toml"
GUEST_USER = "nbia_guest"
DEFAULT_LICENSE_NAME = "Creative Commons Attribution 4.0 International License"
DEFAULT_LICENSE_URL = "https://creativecommons.org/licenses/by/4.0/"
DEFAULT_TOKEN_LIFETIME = 7200.0
DEFAULT_REFRESH_LIFETIME = 86400.0


@dataclass(frozen=True)
class CollectionConfig:
    """Per-collection facts the DICOM headers do not carry."""

    license_name: str = DEFAULT_LICENSE_NAME
    license_url: str = DEFAULT_LICENSE_URL
    license_text: str = ""
    description_uri: str = ""
    date_released: str = ""
    third_party: bool = False
    restricted: bool = False

    def license_entry(self, collection: str) -> bytes:
        """The text of the ``LICENSE`` zip entry (the real server sends one per series)."""
        if self.license_text:
            text = self.license_text
        else:
            text = (
                f"{self.license_name}\n{self.license_url}\n\n"
                f"The images of the collection {collection} are distributed under the "
                "license above. Cite the collection when you use them.\n"
            )
        return text.encode("utf-8")


@dataclass(frozen=True)
class UserConfig:
    """A login; ``repr`` hides the password so logs and tracebacks never show it."""

    password: str = field(repr=False)
    collections: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server knows besides the index."""

    token_lifetime: float = DEFAULT_TOKEN_LIFETIME
    refresh_token_lifetime: float = DEFAULT_REFRESH_LIFETIME
    collections: Mapping[str, CollectionConfig] = field(default_factory=dict)
    users: Mapping[str, UserConfig] = field(default_factory=dict)

    def collection(self, name: str) -> CollectionConfig:
        return self.collections.get(name) or CollectionConfig()

    def is_restricted(self, name: str) -> bool:
        return self.collection(name).restricted

    def user(self, name: str) -> UserConfig | None:
        """The guest always exists (empty password) unless the file redefines it."""
        if name in self.users:
            return self.users[name]
        if name == GUEST_USER:
            return UserConfig(password="")
        return None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = CONFIG_NAME) -> ServerConfig:
        """Validate a parsed TOML document; errors name the file and the offending key."""
        known = {"token_lifetime", "refresh_token_lifetime", "collections", "users"}
        _no_unknown(data, known, source, "")
        collections: dict[str, CollectionConfig] = {}
        for name, table in _table(data, "collections", source).items():
            where = f"collections.{name!r}"
            if not isinstance(table, Mapping):
                raise ArchiveError(f"{source}: [{where}] must be a table")
            _no_unknown(table, set(CollectionConfig.__dataclass_fields__), source, where)
            values: dict[str, Any] = {}
            for key, value in table.items():
                expected = bool if key in ("restricted", "third_party") else str
                if not isinstance(value, expected):
                    raise ArchiveError(
                        f"{source}: {where}.{key} must be a {expected.__name__}"
                    )
                values[key] = value
            collections[str(name)] = CollectionConfig(**values)
        users: dict[str, UserConfig] = {}
        for name, table in _table(data, "users", source).items():
            where = f"users.{name!r}"
            if not isinstance(table, Mapping):
                raise ArchiveError(f"{source}: [{where}] must be a table")
            _no_unknown(table, {"password", "collections"}, source, where)
            password = table.get("password", "")
            granted = table.get("collections", [])
            if not isinstance(password, str):
                raise ArchiveError(f"{source}: {where}.password must be a string")
            if not isinstance(granted, list) or not all(isinstance(c, str) for c in granted):
                raise ArchiveError(f"{source}: {where}.collections must be a list of strings")
            users[str(name)] = UserConfig(password=password, collections=tuple(granted))
        return cls(
            token_lifetime=_seconds(data, "token_lifetime", DEFAULT_TOKEN_LIFETIME, source),
            refresh_token_lifetime=_seconds(
                data, "refresh_token_lifetime", DEFAULT_REFRESH_LIFETIME, source
            ),
            collections=collections,
            users=users,
        )


def load_config(archive: str | Path) -> ServerConfig:
    """``ROOT/nbia-archive.toml`` if present, else the all-public defaults."""
    path = Path(archive) / CONFIG_NAME
    if not path.is_file():
        return ServerConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ArchiveError(f"{path}: invalid TOML: {exc}") from None
    return ServerConfig.from_mapping(data, source=str(path))


def _table(data: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ArchiveError(f"{source}: {key} must be a table")
    return value


def _no_unknown(table: Mapping[str, Any], known: set[str], source: str, where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ArchiveError(f"{source}: unknown key {prefix}{unknown[0]}")


def _seconds(data: Mapping[str, Any], key: str, default: float, source: str) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArchiveError(f"{source}: {key} must be a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise ArchiveError(f"{source}: {key} must be positive")
    return float(value)
