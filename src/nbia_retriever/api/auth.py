"""Logging in: credentials, where they may go, and the shared OAuth token.

A manifest comes by email from anyone, and its ``downloadServerUrl`` is a claim, not
the user's choice. So a password or token is sent only to a host the user chose
(:class:`HostPolicy`): a TCIA host over https (``*.cancerimagingarchive.net``), the host
of ``--api-url``, a host listed in the user's config file (``trusted_hosts``), or one
confirmed at a prompt that names it; and never over plain http except to loopback.
Anything else stops the run before a single request carries a secret.

The token request never follows a redirect (a 307 would re-send the password to the
redirect's target), and the password and every token are registered with
:data:`~nbia_retriever.untrusted.SECRETS` so no message, file or event can carry them.

:class:`TokenManager` fetches one token for all threads, refreshes it shortly before it
expires (NBIA tokens live two hours, large downloads live for days) and again on a 401.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ApiError, AuthError, TlsError, UntrustedHostError
from ..untrusted import SECRETS, host_entry
from .http import Origin, Transport, is_loopback
from .records import json_records

#: The TCIA domain: its hosts are trusted over https without asking.
TCIA_DOMAIN = "cancerimagingarchive.net"
GUEST_USER = "nbia_guest"
KEYRING_SERVICE = "nbia-retriever"


@dataclass(frozen=True)
class Credentials:
    """A username and password; ``repr`` never shows the password."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        SECRETS.add_password(self.password)  # whole: its pieces are ordinary words

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=***)"

    @property
    def is_guest(self) -> bool:
        """The public guest login: no secret of the user's."""
        return self.username == GUEST_USER and not self.password


def keyring_service(host: str) -> str:
    """Keyring entries are keyed by host and user: a password for one server is never
    offered to another."""
    return f"{KEYRING_SERVICE}:{host.lower()}"


def stored_password(host: str, user: str) -> str | None:
    """``NBIA_PASSWORD``, else the system keyring's entry for (host, user); None if neither.

    Never from argv: command lines are visible to every user of a shared HPC node.
    """
    password = os.environ.get("NBIA_PASSWORD")
    if password is not None:
        return password
    try:
        import keyring  # optional dependency

        found = keyring.get_password(keyring_service(host), user)
    except Exception:
        return None
    return found if isinstance(found, str) else None


def token_url_for(api_url: str) -> str:
    """``https://h/nbia-api/services[/v1]`` -> ``https://h/nbia-api/oauth/token``."""
    base = api_url.rstrip("/")
    marker = "/nbia-api/services"
    if marker in base:
        return base[: base.index(marker)] + "/nbia-api/oauth/token"
    return base + "/nbia-api/oauth/token"


def _host_label(origin: Origin) -> str:
    return origin.label  # ASCII (xn--) form, IPv6 in brackets: as the config takes it


def _entry(text: str) -> str:
    """A ``trusted_hosts`` entry in the form labels take (the config file's loader has
    refused what cannot be a host; one that slips through matches nothing)."""
    try:
        return host_entry(text)
    except ValueError:
        return text.strip().lower()


class HostPolicy:
    """Decides which hosts may receive the user's password or token.

    ``chosen`` are URLs the user typed (``--api-url``); ``trusted_hosts`` come from the
    user's config file (``host`` for any port, ``host:port`` for one); ``confirm`` is
    asked, once per host, when neither covers it (an interactive prompt that names the
    host; ``None`` in batch mode, so the answer is no).
    """

    def __init__(self, *, chosen: Iterable[str] = (), trusted_hosts: Iterable[str] = (),
                 confirm: Callable[[str], bool] | None = None,
                 config_path: Path | None = None) -> None:
        self._chosen = {Origin.of(u) for u in chosen if u}
        self._hosts = {_entry(h) for h in trusted_hosts if h.strip()}
        self._confirm = confirm
        self._confirmed: set[str] = set()
        self._refused: set[str] = set()
        self._config_path = config_path
        self._lock = threading.Lock()

    def trusts(self, url: str) -> bool:
        origin = Origin.of(url)
        label = _host_label(origin)
        tcia = origin.host == TCIA_DOMAIN or origin.host.endswith("." + TCIA_DOMAIN)
        if tcia and origin.scheme == "https":
            return True
        bare = f"[{origin.host}]" if ":" in origin.host else origin.host
        return (origin in self._chosen or bare in self._hosts or label in self._hosts
                or label in self._confirmed)

    def check(self, url: str, user: str) -> None:
        """Raise :class:`UntrustedHostError` unless ``user``'s secret may go to ``url``."""
        origin = Origin.of(url)
        label = _host_label(origin)
        if origin.scheme != "https" and not is_loopback(origin.host):
            raise UntrustedHostError(
                f"not sending the password of {user!r} to {label} over plain http (anyone "
                "on the way could read it); use an https URL for this server")
        if self.trusts(url):
            return
        with self._lock:
            if label not in self._refused and self._confirm is not None:
                if self._confirm(label):
                    self._confirmed.add(label)
                    return
                self._refused.add(label)
        where = f" in {self._config_path}" if self._config_path else " in your config file"
        base = f"{origin}/nbia-api/services"
        raise UntrustedHostError(
            f"not sending the password of {user!r} to {label}: only the manifest names this "
            f"server, you did not choose it; if you trust it, pass --api-url {base} or add "
            f"\"{label}\" to trusted_hosts{where}")

    @property
    def trusted_hosts(self) -> tuple[str, ...]:
        return tuple(sorted(self._hosts | self._confirmed))


class TokenManager:
    """Fetches, shares and refreshes one OAuth token for all threads.

    Refreshes ``refresh_margin`` seconds (or a tenth of the lifetime, whichever is
    smaller) before expiry, and on demand after a 401 via :meth:`invalidate`. Every
    token request is checked against the :class:`HostPolicy` first.
    """

    def __init__(
        self,
        transport: Transport,
        token_url: str,
        credentials: Credentials,
        *,
        policy: HostPolicy | None = None,
        refresh_margin: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self._url = token_url
        self._credentials = credentials
        self._policy = policy or HostPolicy()
        self._margin = refresh_margin
        self._clock = clock
        self._lock = threading.Lock()
        self._access: str | None = None
        self._refresh: str | None = None
        self._expires_at = 0.0
        self._lifetime = 0.0

    def __repr__(self) -> str:
        return f"TokenManager(user={self._credentials.username!r})"

    @property
    def username(self) -> str:
        return self._credentials.username

    @property
    def url(self) -> str:
        return self._url

    def check_host(self) -> None:
        """Raise :class:`UntrustedHostError` now if the token's host is not trusted."""
        if not self._credentials.is_guest:
            self._policy.check(self._url, self._credentials.username)

    def authorization(self) -> str:
        """The ``Authorization`` header value, fetching or refreshing the token if due."""
        with self._lock:
            now = self._clock()
            margin = min(self._margin, self._lifetime / 10) if self._lifetime else 0.0
            if self._access is None or now >= self._expires_at - margin:
                self._obtain(now)
            assert self._access is not None
            return f"Bearer {self._access}"

    def invalidate(self, header: str | None = None) -> None:
        """Forget the token (after a 401), unless another thread already replaced it."""
        with self._lock:
            if header is None or header == f"Bearer {self._access}":
                self._expires_at = 0.0

    def _obtain(self, now: float) -> None:
        self.check_host()
        if self._refresh is not None:
            form = {"grant_type": "refresh_token", "refresh_token": self._refresh,
                    "client_id": "NBIA"}
            if self._request(form, now, quiet=True):
                return
        form = {
            "grant_type": "password",
            "username": self._credentials.username,
            "password": self._credentials.password,
            "client_id": "NBIA",
        }
        self._request(form, now, quiet=False)

    def _request(self, form: Mapping[str, str], now: float, *, quiet: bool) -> bool:
        who = self._credentials.username
        try:
            answer = self._transport.call("POST", self._url, data=dict(form),
                                        what=f"login at {self._url}", redirects=False,
                                        limit=1 << 20)
        except TlsError:
            raise
        except ApiError as exc:
            if quiet:
                return False
            raise AuthError(f"login as {who!r} at {self._url} failed: {exc}") from None
        if answer.status != 200:
            if quiet:
                return False
            raise AuthError(f"login as {who!r} at {self._url} failed: HTTP {answer.status}")
        try:
            records = json_records(answer, "login")
            body = records[0] if records else {}
            access = str(body["access_token"])
        except (ApiError, KeyError, TypeError, IndexError):
            if quiet:
                return False
            raise AuthError(f"login at {self._url} failed: no access_token in the answer") \
                from None
        try:
            lifetime = float(body.get("expires_in") or 7200)
        except (TypeError, ValueError):
            lifetime = 7200.0
        refresh = body.get("refresh_token")
        SECRETS.add(access, refresh if isinstance(refresh, str) else None)
        self._access = access
        self._refresh = refresh if isinstance(refresh, str) else self._refresh
        self._lifetime = max(1.0, lifetime)
        self._expires_at = now + self._lifetime
        return True
