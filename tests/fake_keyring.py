"""A keyring backend for tests: entries in the JSON file that FAKE_KEYRING names.

Selected with PYTHON_KEYRING_BACKEND=fake_keyring.FileKeyring (tests/ on PYTHONPATH),
so a subprocess CLI reads passwords from it like from the system keyring. Keys are
"<service> <username>".
"""

from __future__ import annotations

import json
import os

from keyring.backend import KeyringBackend


class FileKeyring(KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def _data(self) -> dict[str, str]:
        with open(os.environ["FAKE_KEYRING"], encoding="utf-8") as handle:
            data: dict[str, str] = json.load(handle)
        return data

    def get_password(self, service: str, username: str) -> str | None:
        return self._data().get(f"{service} {username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        raise NotImplementedError("read-only test keyring")

    def delete_password(self, service: str, username: str) -> None:
        raise NotImplementedError("read-only test keyring")
