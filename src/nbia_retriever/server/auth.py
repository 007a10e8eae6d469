"""OAuth2 password and refresh grants, as NBIA's Spring server answers them.

Tokens are random strings held in memory only. The clock is injectable (``ServerClock``)
so tests can expire a token by advancing time instead of sleeping.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from .config import ServerConfig


class ServerClock:
    """Wall time plus an offset that tests move forward with :meth:`advance`."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += float(seconds)


@dataclass(frozen=True)
class _Grant:
    user: str
    expires_at: float
    refresh: str = ""


class TokenStore:
    """Issues and checks tokens; never logs or exposes them except in the grant answer."""

    def __init__(self, config: ServerConfig, clock: ServerClock) -> None:
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._access: dict[str, _Grant] = {}
        self._refresh: dict[str, _Grant] = {}

    def check_password(self, username: str, password: str) -> bool:
        user = self.config.user(username)
        if user is None:
            # Compare anyway so a wrong user name costs the same as a wrong password.
            hmac.compare_digest(password.encode(), b"x" * len(password.encode()))
            return False
        return hmac.compare_digest(password.encode("utf-8"), user.password.encode("utf-8"))

    def issue(self, username: str, refresh: str | None = None) -> dict[str, object]:
        """A new access token (and refresh token unless refreshing): the JSON answer."""
        now = self.clock.now()
        lifetime = self.config.token_lifetime
        access = secrets.token_urlsafe(24)
        with self._lock:
            self._expire(now)
            if refresh is None:
                refresh = secrets.token_urlsafe(24)
                self._refresh[refresh] = _Grant(
                    username, now + self.config.refresh_token_lifetime
                )
            self._access[access] = _Grant(username, now + lifetime, refresh)
        return {
            "access_token": access,
            "token_type": "bearer",
            "refresh_token": refresh,
            # The real server reports 7199 for a two-hour token: whole seconds, one less.
            "expires_in": max(1, int(lifetime) - 1),
            "scope": "read",
        }

    def refresh(self, token: str) -> dict[str, object] | None:
        now = self.clock.now()
        with self._lock:
            grant = self._refresh.get(token)
            if grant is None or grant.expires_at <= now:
                self._refresh.pop(token, None)
                return None
        return self.issue(grant.user, refresh=token)

    def user_for(self, token: str) -> tuple[str | None, str]:
        """(user, "") for a valid token, else (None, why): ``invalid`` or ``expired``."""
        now = self.clock.now()
        with self._lock:
            grant = self._access.get(token)
        if grant is None:
            return None, "invalid"
        if grant.expires_at <= now:
            return None, "expired"
        return grant.user, ""

    def _expire(self, now: float) -> None:
        """Forget long-dead tokens so a long soak does not grow memory without bound."""
        if len(self._access) < 10_000:
            return
        horizon = now - 3600
        self._access = {k: g for k, g in self._access.items() if g.expires_at > horizon}
        self._refresh = {k: g for k, g in self._refresh.items() if g.expires_at > now}


def visible_to(config: ServerConfig, user: str | None, collection: str) -> bool:
    """Public collections are visible to all; restricted ones to users granted them (v2)."""
    if not config.is_restricted(collection):
        return True
    if user is None:
        return False
    granted = config.user(user)
    return granted is not None and collection in granted.collections
