"""Gen3 credentials and the access token (Fence), with the trust rules of issue 11.

A Gen3 API key is a long-lived secret (a JWT the user downloads from the data commons'
profile page); it buys short-lived access tokens (``POST
/user/credentials/api/access_token``, 20 minutes at Fence's default). Where TCIA's Go
retriever fetches one token per run, never refreshes it and logs it in full, we follow
gen3sdk (``gen3/auth.py``): the token's own ``exp`` claim (decoded, not verified: it
is the server's business) says when to fetch the next one, shortly before it expires,
and a 401 on an API call gets one fresh token and one more try. A second 401 means the
key itself is dead: :class:`~nbia_retriever.errors.AuthError` (exit 3), one line naming
the host and where to get a new key.

The key and every token go only to a Gen3 API origin the user chose (:func:`check_origin`):
a known CRDC host over https, the ``--gen3-endpoint`` origin, a host of the config
file's ``trusted_hosts``; never over plain http except to loopback, never across a
redirect (the token request and every API call are sent with ``redirects=False``), never
to the signed URL's storage host. Both are registered with
:data:`~nbia_retriever.untrusted.SECRETS` before anything is sent, so no message or log
line can carry them.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..api.auth import HostPolicy
from ..api.client import parse_retry_after
from ..api.http import Answer, Origin, Transport, is_loopback
from ..errors import ApiError, AuthError, NotPublicError, UntrustedHostError, UsageError
from ..untrusted import SECRETS, quote

__all__ = ["AUTH_ENV", "GEN3_ENV", "KNOWN_GEN3_HOSTS", "Gen3Auth", "Gen3Credentials",
           "check_origin", "find_credentials", "jwt_claims", "raise_for_status"]

#: The credentials file, when ``--auth`` is not given (ours first, then gen3sdk's).
AUTH_ENV = "NBIA_GEN3_AUTH"
GEN3_ENV = "GEN3_API_KEY"
#: Gen3 API hosts trusted over https without being named: the CRDC's, which every
#: TCIA controlled-access manifest names (a bare ``dg.4DFC/<uuid>`` means it too).
KNOWN_GEN3_HOSTS = frozenset({"nci-crdc.datacommons.io"})
#: Refresh a token this long before its ``exp`` (gen3sdk's margin) or a tenth of its
#: life, whichever is shorter: a file of 2.5 GB on a slow link outlives a token, and a
#: request that starts with a token about to expire would 401 half-way.
REFRESH_MARGIN = 300.0
#: The life assumed for a token whose ``exp`` cannot be read (Fence's default).
DEFAULT_TTL = 1200.0
TOKEN_PATH = "/user/credentials/api/access_token"
#: Largest credentials file or token answer read (a JWT is a few kB).
_SMALL = 1 << 20


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT (the base64url JSON between its two dots), unverified; ``{}``
    when it is not one. Only used to learn ``exp`` and ``iss``: trust comes from the
    user's choice of host, never from what a token says."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    middle = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(middle.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


@dataclass(frozen=True)
class Gen3Credentials:
    """A Gen3 credentials file (``{"api_key": ..., "key_id": ...}``); ``repr`` never
    shows the key. ``warning``: a line for the user (the file is readable by others)."""

    api_key: str = field(repr=False)
    key_id: str = ""
    path: Path | None = None
    warning: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        SECRETS.add(self.api_key)  # before anything can print or send it

    @property
    def where(self) -> str:
        """How messages name the key: its file."""
        return str(self.path) if self.path is not None else "the Gen3 API key"

    @classmethod
    def load(cls, path: Path) -> Gen3Credentials:
        """Read a credentials file. A file that cannot be read is a :class:`UsageError`,
        one that holds no usable key an :class:`AuthError`; both name the file and never
        quote its content (it is a secret)."""
        where = str(path)
        try:
            with open(path, "rb") as handle:
                info = os.fstat(handle.fileno())
                raw = handle.read(_SMALL + 1)
        except OSError as exc:
            raise UsageError(f"{where}: cannot read the Gen3 credentials file "
                             f"({exc.strerror or type(exc).__name__})") from None
        if len(raw) > _SMALL:
            raise AuthError(f"{where}: not a Gen3 credentials file (larger than 1 MiB)")
        try:
            data = json.loads(raw.decode("utf-8-sig"))
        except json.JSONDecodeError as exc:  # its position only: the text is a secret
            raise AuthError(f"{where}:{exc.lineno}: not a Gen3 credentials file (malformed "
                            "JSON); download it again from your data commons' profile page"
                            ) from None
        except (UnicodeDecodeError, RecursionError):
            raise AuthError(f"{where}: not a Gen3 credentials file (not UTF-8 JSON)") from None
        key = data.get("api_key") if isinstance(data, dict) else None
        if not isinstance(key, str) or not key.strip():
            raise AuthError(f"{where}: 'api_key' not found in the Gen3 credentials file")
        key = key.strip()
        if any(c.isspace() or not c.isprintable() for c in key):
            SECRETS.add(key)
            raise AuthError(f"{where}: the 'api_key' is not a Gen3 API key (it holds spaces "
                            "or control characters)")
        key_id = data.get("key_id")
        warning = None
        if os.name == "posix" and stat.S_IMODE(info.st_mode) & 0o077:
            warning = (f"warning: {where} can be read by other users of this machine; "
                       f"chmod 600 {where}")
        return cls(key, key_id if isinstance(key_id, str) else "", Path(path), warning)


def find_credentials(auth: Path | None, env: Mapping[str, str]) -> Gen3Credentials | None:
    """The credentials a run uses: ``--auth FILE``, else :data:`AUTH_ENV`, else
    :data:`GEN3_ENV` (a path, as gen3sdk reads it); None when none is given."""
    if auth is not None:
        return Gen3Credentials.load(auth)
    for name in (AUTH_ENV, GEN3_ENV):
        value = env.get(name, "").strip()
        if value:
            return Gen3Credentials.load(Path(value).expanduser())
    return None


def check_origin(origin: str, policy: HostPolicy | None, *, chosen: str | None = None) -> None:
    """:class:`UntrustedHostError` unless the Gen3 API key may go to ``origin``: https
    (or http to loopback), and a known CRDC host, the ``chosen`` origin
    (``--gen3-endpoint``) or one ``policy`` trusts. Nothing has been sent when it raises."""
    where = Origin.of(origin)
    label = where.label
    if where.scheme != "https" and not (where.scheme == "http" and is_loopback(where.host)):
        raise UntrustedHostError(
            f"not sending the Gen3 API key to {label} over {where.scheme or 'no scheme'} "
            "(anyone on the way could read it); use an https URL for this host")
    if where.scheme == "https" and where.host in KNOWN_GEN3_HOSTS:
        return
    if chosen is not None and Origin.of(chosen) == where:
        return
    if policy is not None and policy.trusts(origin):
        return
    raise UntrustedHostError(
        f"not sending the Gen3 API key to {label}: only the manifest names this host, you "
        f"did not choose it; if you trust it, pass --gen3-endpoint {where} or add "
        f"\"{label}\" to trusted_hosts in your config file")


class Gen3Auth:
    """One Gen3 API origin's access token, shared by all threads (see the module
    docstring). ``host`` names the data commons in messages (the manifest's DRS host,
    where the user logs in), which may differ from ``origin`` under
    ``--gen3-endpoint``. ``clock`` is wall time: ``exp`` is a Unix time."""

    def __init__(self, origin: str, creds: Gen3Credentials, transport: Transport,
                 policy: HostPolicy | None = None, *, host: str | None = None,
                 chosen: str | None = None, margin: float = REFRESH_MARGIN,
                 clock: Callable[[], float] = time.time) -> None:
        self.origin = str(Origin.of(origin))
        self.host = host or Origin.of(origin).label
        self._creds = creds
        self._transport = transport
        self._policy = policy
        self._chosen = chosen
        self._margin = margin
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        #: Tokens fetched (the first and every refresh), for tests and the report.
        self.fetched = 0

    def __repr__(self) -> str:
        return f"Gen3Auth({self.origin!r})"

    def check(self) -> None:
        check_origin(self.origin, self._policy, chosen=self._chosen)

    def _rejected(self, status: int) -> AuthError:
        return AuthError(
            f"the Gen3 API key {self._creds.where} was rejected by {self.host} (HTTP "
            f"{status}: expired or revoked); log in to https://{self.host}/ and download a "
            "new API key (Profile > Create API key), then pass it with --auth FILE")

    def authorization(self) -> str:
        """The ``Authorization`` header value, the token fetched or refreshed when due."""
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                self._obtain()
            assert self._token is not None
            return f"Bearer {self._token}"

    def invalidate(self, header: str) -> None:
        """Forget the token ``header`` carried (after a 401), unless another thread
        already replaced it."""
        with self._lock:
            if header == f"Bearer {self._token}":
                self._refresh_at = 0.0

    def _obtain(self) -> None:
        self.check()
        what = f"Gen3 token at {self.host}"
        answer = self._transport.call("POST", self.origin + TOKEN_PATH,
                                      json={"api_key": self._creds.api_key}, what=what,
                                      redirects=False, limit=_SMALL)
        if answer.status in (400, 401, 403):
            raise self._rejected(answer.status)
        raise_for_status(answer, what)
        try:
            body = json.loads(answer.body)
            token = body["access_token"] if isinstance(body, dict) else None
        except (ValueError, RecursionError):
            token = None
        if not isinstance(token, str) or not token:
            raise ApiError(f"{what}: no access_token in the answer", status=answer.status)
        SECRETS.add(token)
        now = self._clock()
        exp = jwt_claims(token).get("exp")
        expires = float(exp) if isinstance(exp, int | float) else now + DEFAULT_TTL
        life = expires - now
        self._token = token
        self._refresh_at = expires - min(self._margin, max(0.0, life) / 10)
        self.fetched += 1

    def get(self, path: str, *, what: str) -> Answer:
        """``GET origin + path`` with the bearer token, never following a redirect; a
        401 gets one fresh token and one more try, a second is :class:`AuthError` (a
        401 on a token another thread has already replaced is no strike: at most four
        tries)."""
        strikes = 0
        for _ in range(4):
            header = self.authorization()
            answer = self._transport.call("GET", self.origin + path, what=what,
                                          headers={"Authorization": header},
                                          redirects=False, limit=_SMALL)
            if answer.status != 401:
                return answer
            with self._lock:
                # Another thread refreshed while this request was out: its 401 says the
                # old token ended (many threads share one), not that the key is dead.
                stale = header != f"Bearer {self._token}"
            self.invalidate(header)
            strikes += 0 if stale else 1
            if strikes >= 2:
                break
        raise self._rejected(401)


def raise_for_status(answer: Answer, what: str, *, name: str = "") -> None:
    """Our error for a Gen3 answer that is not a 200: 404 "not found on HOST" (the item
    fails), 403 not authorised (:class:`NotPublicError`: never retried), anything else
    an :class:`ApiError` with its status for :func:`~nbia_retriever.retry.classify`."""
    status = answer.status
    if status == 200:
        return
    subject = name or what
    if status == 404:
        raise ApiError(f"{subject}: not found on {Origin.of(answer.url).label}", status=404)
    if status == 403:
        raise NotPublicError(f"{subject}: not authorized at {Origin.of(answer.url).label} "
                             "(your API key does not grant access to it)", status=403)
    reason = quote(answer.text, 120) if answer.body and answer.status < 500 else ""
    raise ApiError(f"{what}: HTTP {status}" + (f" ({reason})" if reason else ""),
                   status=status, retry_after=parse_retry_after(answer.header("Retry-After")))
