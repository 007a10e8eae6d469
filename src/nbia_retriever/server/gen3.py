"""A Gen3 (Fence + GA4GH DRS) emulator and a PathDB-like file server, on loopback.

Controlled-access TCIA data comes from the NCI CRDC's Gen3 since 2025-07-08, pathology
slides from PathDB (reference section 10 C, D, and "What a local Gen3/PathDB test server
must answer"). The clients under test need both, with every fault a real run meets, and
nothing here may depend on the wall clock except the JWT ``exp`` values (a test forces
a refresh with ``token_uses``, an expired URL with ``url_uses``, never by waiting).

Three origins, each on its own port, so a test can prove which one saw a secret:

* ``url`` (Gen3's API, Fence and DRS):

  - ``POST /user/credentials/api/access_token`` and its deprecated alias
    ``/user/credentials/cdis/access_token``: body ``{"api_key": ...}`` (gen3sdk sends the
    whole credentials JSON: ``key_id`` is ignored) -> 200 ``{"access_token": <JWT,
    exp=now+token_ttl>}`` (``?expires_in=`` may shorten it); 401 JSON for a bad, expired
    or revoked key, 400 for a body that is not such JSON.
  - ``GET /user/data/download/<id>`` (``dg.4DFC/<uuid>`` or ``dg.4DFC%2F<uuid>``) with
    ``Authorization: Bearer <token>``: 200 ``{"url": <signed URL>}``; 401 for a missing,
    bad, expired or used-up token, 403 ``forbidden``, 404 unknown or ``missing``;
    ``?expires_in=S`` shortens the URL's life, ``?redirect=true`` answers 302 to it.
  - ``GET /ga4gh/drs/v1/objects/<id>`` -> the DRS object (``id, self_uri, name, size,
    created_time, checksums[md5], access_methods[{type: https, access_id: s3}]``) and
    ``GET /ga4gh/drs/v1/objects/<id>/access/s3`` -> ``{"url"}``; Bearer required; errors
    as ``{"msg", "status_code"}``; all 404 under ``no_drs``.

* ``files_url`` (the signed-URL host, S3-like): ``GET|HEAD /signed/<id>?exp=&n=&sig=``:
  200 with Content-Length and ETag ``"<md5>"``; ``Range: bytes=a-|a-b|-n`` -> 206 with
  Content-Range (``If-Range`` with another ETag -> 200 whole); 416 past the end; 403 S3
  XML ``SignatureDoesNotMatch`` for a bad signature, ``AccessDenied`` "Request has
  expired" past ``exp`` or once ``url_uses`` GETs were served; 400 S3 XML for ANY request
  carrying an Authorization header (a client leaking its bearer token to the storage
  host fails loudly).

* ``pathdb_url``: ``GET|HEAD /system/files/wsi/<path>`` and
  ``/index.php/system/files/wsi/<path>``: no auth (an Authorization header is refused,
  400, as on the files host), 200/206/416, Content-Length, ETag ``"<md5>"`` unless
  ``etag`` is off (whether real PathDB sends one is unknown: section 10 D);
  ``GET /listofimages/<collectionId>?_format=json&page=N`` -> tcia_utils' pages
  (Drupal's JSON, :data:`PAGE_SIZE` a page from 0, ``[]`` past the last) and ``GET
  /collections?_format=json``.

Faults (:class:`Gen3Faults`, ``--gen3-faults``): comma-separated ``key=value`` items,
flags without a value:

====================  =====================================================================
``token_ttl=S``       seconds until issued access tokens expire (1200; 0: born expired)
``token_uses=N``      an access token answers N API calls, then 401 (forces a refresh)
``url_uses=N``        a signed URL serves N GETs, then 403 "Request has expired"
``url_ttl=S``         seconds a signed URL is valid (3600)
``drop_after=N[:T]``  close the connection after N body bytes (short of its
                      Content-Length: the client holds exactly N), on the first T (1)
                      GETs of each object (signed files and slides)
``reset_after=N[:T]`` the same with a TCP reset (SO_LINGER 0) instead of a close: how
                      much of the N bytes the client keeps is then up to its kernel
``wrong_byte=ID[:T]`` the body of object ID (a DRS id, or a slide's ``wsi/...`` path) has
                      the byte at size//2 inverted, every time or the first T GETs
                      covering it; repeatable
``ignore_range``      answer a Range request with 200 and the whole body
``forbidden=ID``      403 at ``/user/data/download/`` and DRS; repeatable
``missing=ID``        404 there; repeatable
``no_drs``            every ``/ga4gh/`` path is 404 (a Gen3 without DRS)
``rate=R``            each file response paced to R bytes/s (``80mbit``, ``10MB``)
``first_byte_delay=S`` each file response waits S first (``50ms``)
``latency=S``         every request (any origin) waits S first
``etag=off``          PathDB sends no ETag
====================  =====================================================================

The request log (:attr:`Gen3Server.requests`) records method, path, status, bytes, the
origin and the NAMES of the request's headers, and whether Authorization was present:
never a header's value, a key, a token or a body.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote, unquote

from aiohttp import web

from ..errors import ArchiveError, FaultSpecError
from .app import RequestRecord
from .appthread import AppThread
from .faults import parse_rate
from .gen3data import (
    CREATED,
    DRS_PREFIX,
    Gen3Object,
    PathdbSlide,
    drs_uri,
    gen3_view,
    object_id_for,
    pathdb_url,
    write_drs_manifest,
    write_pathdb_manifest,
)
from .requestlog import RequestLog, RequestState, answered, bytes_sent, request_state, state_key
from .s3 import _parse_range
from .sendfile import send_range

__all__ = [
    "DRS_PREFIX",
    "PAGE_SIZE",
    "Gen3Faults",
    "Gen3Object",
    "Gen3Request",
    "Gen3Server",
    "Gen3Service",
    "PathdbSlide",
    "drs_uri",
    "gen3_view",
    "jwt_claims",
    "object_id_for",
    "pathdb_url",
    "write_drs_manifest",
    "write_pathdb_manifest",
]

TOKEN_PATHS = ("/user/credentials/api/access_token", "/user/credentials/cdis/access_token")
DOWNLOAD_PREFIX = "/user/data/download/"
DRS_OBJECTS = "/ga4gh/drs/v1/objects/"
SIGNED_PREFIX = "/signed/"
#: tcia_utils' ``listofimages`` page size here (small, so tests see several pages)
PAGE_SIZE = 2
#: Fence's API keys live 30 days
KEY_TTL = 30 * 24 * 3600
_DRUPAL_TIME = "2025-07-08T00:00:00+00:00"
_LOG_LIMIT = 200_000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- JWTs ----------------------------------------------------------------------------
# Fence signs with RS256; clients never verify the signature (gen3sdk and the Go
# retriever only read ``exp``/``iss``), so HS256 with a per-server secret, written with
# hmac, stands in: no JWT library for the sake of a test server.
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _jwt(claims: Mapping[str, Any], secret: bytes) -> str:
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64(json.dumps(dict(claims), separators=(",", ":")).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode("ascii"), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def jwt_claims(token: str, secret: bytes | None = None) -> dict[str, Any] | None:
    """The claims of a JWT, or None when it is not one; with ``secret``, also None unless
    its HS256 signature checks out."""
    try:
        head, body, sig = token.split(".")
        if secret is not None:
            want = hmac.new(secret, f"{head}.{body}".encode("ascii"), hashlib.sha256).digest()
            if not hmac.compare_digest(want, _unb64(sig)):
                return None
        claims = json.loads(_unb64(body))
    except (ValueError, UnicodeError):
        return None
    return claims if isinstance(claims, dict) else None


# -- faults --------------------------------------------------------------------------
@dataclass(frozen=True)
class Gen3Faults:
    """What the Gen3 and PathDB servers break (see the module docstring). The default
    breaks nothing (tokens live 1200 s, as Fence's ``ACCESS_TOKEN_EXPIRES_IN``)."""

    token_ttl: int = 1200
    token_uses: int | None = None
    url_uses: int | None = None
    url_ttl: int = 3600
    drop_after: int | None = None
    drop_times: int = 1
    drop_reset: bool = False
    wrong_byte: frozenset[str] = frozenset()
    wrong_byte_times: int | None = None
    ignore_range: bool = False
    forbidden: frozenset[str] = frozenset()
    missing: frozenset[str] = frozenset()
    no_drs: bool = False
    rate: float | None = None
    first_byte_delay: float = 0.0
    latency: float = 0.0
    etag: bool = True

    def __post_init__(self) -> None:
        for name in ("wrong_byte", "forbidden", "missing"):
            value = getattr(self, name)
            object.__setattr__(self, name, frozenset(
                [value] if isinstance(value, str) else value))
        for name, least in (("token_uses", 1), ("url_uses", 1), ("drop_after", 0),
                            ("wrong_byte_times", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < least):
                raise FaultSpecError(f"{name}={value!r}: must be a whole number of at "
                                     f"least {least}")
        if self.drop_times < 1:
            raise FaultSpecError(f"drop_times={self.drop_times!r}: must be at least 1")
        if self.url_ttl < 0:
            raise FaultSpecError(f"url_ttl={self.url_ttl!r}: must not be negative")
        for name in ("first_byte_delay", "latency"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise FaultSpecError(f"{name}={value!r} must be a non-negative number")
        if self.rate is not None and not (self.rate > 0):
            raise FaultSpecError(f"rate={self.rate!r} must be positive")

    def describe(self) -> str:
        """One line for the CLI banner."""
        parts = [] if self.token_ttl == 1200 else [f"token_ttl={self.token_ttl}s"]
        for name in ("token_uses", "url_uses"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)}")
        if self.url_ttl != 3600:
            parts.append(f"url_ttl={self.url_ttl}s")
        if self.drop_after is not None:
            parts.append(f"{'reset' if self.drop_reset else 'drop'}_after={self.drop_after}"
                         f" (first {self.drop_times} GET(s))")
        for name in ("wrong_byte", "forbidden", "missing"):
            if getattr(self, name):
                parts.append(f"{name}={len(getattr(self, name))} object(s)")
        if self.wrong_byte and self.wrong_byte_times is not None:
            parts.append(f"wrong_byte_times={self.wrong_byte_times}")
        parts += [name for name in ("ignore_range", "no_drs") if getattr(self, name)]
        if self.rate:
            parts.append(f"rate={self.rate:.0f}B/s")
        for name in ("first_byte_delay", "latency"):
            if getattr(self, name):
                parts.append(f"{name}={getattr(self, name) * 1000:g}ms")
        if not self.etag:
            parts.append("etag=off")
        return ", ".join(parts) if parts else "none"

    @classmethod
    def parse(cls, spec: str | None) -> Gen3Faults:
        """The ``--gen3-faults`` syntax of the module docstring."""
        from .s3 import _seconds, _whole  # the S3 mode's spec parsing (aiohttp: lazy)

        text = (spec or "").strip()
        if text.lower() in ("", "none", "off", "no"):
            return cls()
        values: dict[str, Any] = {}
        sets: dict[str, set[str]] = {"wrong_byte": set(), "forbidden": set(), "missing": set()}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            key, value = key.strip().lower().replace("-", "_"), value.strip()
            where = f"--gen3-faults {item!r}"
            if key in ("ignore_range", "no_drs") and not eq:
                values[key] = True
                continue
            if not eq or not value:
                raise FaultSpecError(f"--gen3-faults: {item!r} is not key=value")
            if key in ("token_ttl", "url_ttl"):
                values[key] = _whole(value, where, minimum=0)
            elif key in ("token_uses", "url_uses"):
                values[key] = _whole(value, where)
            elif key in ("drop_after", "reset_after"):
                count, _, times = value.partition(":")
                values["drop_after"] = _whole(count, where, minimum=0)
                values["drop_reset"] = key == "reset_after"
                if times.strip():
                    values["drop_times"] = _whole(times, where)
            elif key == "wrong_byte":
                target, _, times = value.partition(":")
                sets[key].add(target.strip())
                if times.strip():
                    values["wrong_byte_times"] = _whole(times, where)
            elif key in ("forbidden", "missing"):
                sets[key].add(value)
            elif key in ("ignore_range", "no_drs", "etag"):
                if value.lower() not in ("on", "off", "yes", "no", "true", "false", "1", "0"):
                    raise FaultSpecError(f"{where}: {value!r} is not on or off")
                values[key] = value.lower() in ("on", "yes", "true", "1")
            elif key in ("rate", "bandwidth"):
                values["rate"] = parse_rate(value)
            elif key in ("first_byte_delay", "latency"):
                values[key] = _seconds(value, where)
            else:
                known = ["token_ttl", "token_uses", "url_uses", "url_ttl", "drop_after",
                         "reset_after", "wrong_byte", "ignore_range", "forbidden", "missing",
                         "no_drs", "rate", "first_byte_delay", "latency", "etag"]
                raise FaultSpecError(f"--gen3-faults: unknown key {key!r}; known: "
                                     f"{', '.join(known)}")
        values.update({k: frozenset(v) for k, v in sets.items()})
        return cls(**values)


class _FaultState:
    """A plan with its counters (GETs per object, uses per token and signed URL)."""

    def __init__(self, plan: Gen3Faults) -> None:
        self.plan = plan
        self.lock = threading.Lock()
        self.gets: dict[str, int] = {}
        self.flips: dict[str, int] = {}
        self.token_uses: dict[str, int] = {}
        self.url_uses: dict[str, int] = {}

    def use(self, table: dict[str, int], key: str) -> int:
        """Count one use of ``key``; return the count so far (1 for the first)."""
        with self.lock:
            table[key] = table.get(key, 0) + 1
            return table[key]


# -- the log -------------------------------------------------------------------------
@dataclass(frozen=True)
class Gen3Request(RequestRecord):
    """A :class:`RequestRecord` plus which origin answered (``api``, ``files``,
    ``pathdb``), the request's header NAMES (lower-case, sorted), whether it carried an
    Authorization header, its Range header and the object asked for."""

    origin: str = ""
    headers: tuple[str, ...] = ()
    authorization: bool = False
    range: str | None = None
    object_id: str | None = None


@dataclass
class _State(RequestState):
    object_id: str | None = None


_STATE_KEY: Any = state_key("gen3_state", _State)


def _state(request: web.Request) -> _State:
    return request_state(request, _STATE_KEY, _State)


def _json(status: int, body: Mapping[str, Any]) -> web.Response:
    return web.json_response(dict(body), status=status)


def _drs_error(status: int, message: str) -> web.Response:
    return _json(status, {"msg": message, "status_code": status})


def _fence_error(status: int, message: str) -> web.Response:
    return _json(status, {"error": {"message": message, "code": status}})


def _s3_error(request: web.Request, status: int, code: str, message: str) -> web.Response:
    from xml.sax.saxutils import escape  # only for the rare XML error page

    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{escape(message)}</Message>"
            f"<RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>")
    if request.method == "HEAD":
        return web.Response(status=status)
    return web.Response(status=status, body=body.encode("utf-8"),
                        content_type="application/xml")


# -- the service ---------------------------------------------------------------------
class Gen3Service(RequestLog):
    """State and handlers of the three origins over ``objects`` and ``slides``."""

    def __init__(self, objects: Iterable[Gen3Object], slides: Iterable[PathdbSlide],
                 faults: Gen3Faults | None = None) -> None:
        self.objects: dict[str, Gen3Object] = {o.object_id: o for o in objects}
        self.slides: dict[str, PathdbSlide] = {s.url_path: s for s in slides}
        self._faults = _FaultState(faults or Gen3Faults())
        self.secret = secrets.token_bytes(32)
        self._log_lock = threading.Lock()
        self._log: deque[RequestRecord] = deque(maxlen=_LOG_LIMIT)
        self._counts_lock = threading.Lock()
        self.token_requests = 0
        self.url_requests = 0
        self.revoked: set[str] = set()  # key ids
        self.issued_keys: list[str] = []
        self.url = ""  # the API origin, set once it listens (issuer, self_uri)
        self.files_url = ""
        self.pathdb_url = ""
        self._nonce = itertools.count(1)

    # -- knobs ------------------------------------------------------------------------
    @property
    def faults(self) -> Gen3Faults:
        return self._faults.plan

    def set_faults(self, plan: Gen3Faults | None) -> None:
        """Swap the plan; its counters (GETs, token and URL uses) start afresh."""
        self._faults = _FaultState(plan or Gen3Faults())

    def mint_key(self, *, valid: bool = True) -> tuple[str, str]:
        """A new API key (key id, JWT) as Fence issues them: ``iss`` = ``<url>/user``,
        ``purpose`` ``api_key``, 30 days. ``valid=False``: signed with another secret."""
        key_id = str(secrets.token_hex(16))
        now = int(time.time())
        claims = {"iss": self.url + "/user", "sub": "7", "jti": key_id, "iat": now,
                  "exp": now + KEY_TTL, "purpose": "api_key", "aud": ["openid", "user",
                                                                     "data", "fence"]}
        secret = self.secret if valid else secrets.token_bytes(32)
        if valid:
            self.issued_keys.append(key_id)
        return key_id, _jwt(claims, secret)

    def revoke_keys(self) -> None:
        """Every key issued so far (and every access token made from one) now 401s."""
        with self._counts_lock:
            self.revoked.update(self.issued_keys)

    # -- apps -------------------------------------------------------------------------
    def api_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware("api")])
        for path in TOKEN_PATHS:
            app.router.add_route("*", path, self._token)
        app.router.add_route("*", DOWNLOAD_PREFIX + "{id:.+}", self._download)
        app.router.add_route("*", "/ga4gh/{rest:.*}", self._drs)
        return app

    def files_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware("files")])
        app.router.add_route("*", SIGNED_PREFIX + "{id:.+}", self._signed)
        return app

    def pathdb_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware("pathdb")])
        app.router.add_route("*", "/system/files/{path:.+}", self._slide)
        app.router.add_route("*", "/index.php/system/files/{path:.+}", self._slide)
        app.router.add_get("/listofimages/{cid}", self._list_images, allow_head=False)
        app.router.add_get("/collections", self._collections, allow_head=False)
        return app

    # -- plumbing ---------------------------------------------------------------------
    def _middleware(self, origin: str) -> Any:
        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            state = _state(request)
            state.started = time.time()
            state.t0 = time.perf_counter()

            async def answer() -> web.StreamResponse:
                if self._faults.plan.latency:
                    await asyncio.sleep(self._faults.plan.latency)
                return await handler(request)

            return await answered(request, answer, lambda request, status, response:
                                  self._log_request(request, status, response, origin))

        return middleware

    def _log_request(self, request: web.Request, status: int,
                     response: web.StreamResponse | None = None, origin: str = "") -> None:
        state = _state(request)
        if state.logged:
            return
        state.logged = True
        obj = self.objects.get(state.object_id or "")
        record = Gen3Request(
            method=request.method, path=request.path, query=dict(request.query),
            status=status, bytes_sent=bytes_sent(state, response),
            series_uid=obj.series_uid or None if obj else None, fault=state.fault,
            started=state.started, duration=time.perf_counter() - state.t0,
            origin=origin or _origin_of(request.path),
            headers=tuple(sorted({name.lower() for name in request.headers})),
            authorization="Authorization" in request.headers,
            range=request.headers.get("Range"), object_id=state.object_id)
        with self._log_lock:
            self._log.append(record)

    def _count(self, name: str) -> None:
        with self._counts_lock:
            setattr(self, name, getattr(self, name) + 1)

    # -- Fence ------------------------------------------------------------------------
    async def _token(self, request: web.Request) -> web.StreamResponse:
        self._count("token_requests")
        if request.method != "POST":
            return _fence_error(405, "Method Not Allowed")
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeError):
            return _fence_error(400, "request body is not JSON")
        key = body.get("api_key") if isinstance(body, dict) else None
        if not isinstance(key, str) or not key:
            return _fence_error(400, "no api_key in the request body")
        claims = jwt_claims(key.strip(), self.secret)
        now = int(time.time())
        if claims is None or claims.get("purpose") != "api_key":
            return _fence_error(401, "Invalid API key: not issued by this Fence")
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= now:
            return _fence_error(401, "API key expired")
        with self._counts_lock:
            revoked = claims.get("jti") in self.revoked
        if revoked:
            state = _state(request)
            state.fault = "revoked"
            return _fence_error(401, "API key revoked")
        ttl = self._faults.plan.token_ttl
        wanted = request.query.get("expires_in", "")
        if wanted.isdigit():
            ttl = min(ttl, int(wanted))
        token = _jwt({"iss": claims.get("iss"), "sub": claims.get("sub"),
                      "jti": secrets.token_hex(16), "iat": now, "exp": now + ttl,
                      "purpose": "access", "azp": claims.get("jti"),
                      "scope": ["openid", "user", "data"]}, self.secret)
        return _json(200, {"access_token": token})

    def _bearer(self, request: web.Request, error: Callable[[int, str], web.Response]
                ) -> web.Response | None:
        """None when the request carries a live access token (counting this use), else
        the 401 to answer."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return error(401, "Authentication Error: no bearer token")
        claims = jwt_claims(token.strip(), self.secret)
        if claims is None or claims.get("purpose") != "access":
            return error(401, "Authentication Error: invalid token")
        state = _state(request)
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp <= time.time():
            state.fault = "token_expired"
            return error(401, "Authentication Error: token expired")
        with self._counts_lock:
            revoked = claims.get("azp") in self.revoked
        if revoked:
            state.fault = "revoked"
            return error(401, "Authentication Error: key revoked")
        faults = self._faults
        used = faults.use(faults.token_uses, str(claims.get("jti")))
        if faults.plan.token_uses is not None and used > faults.plan.token_uses:
            state.fault = "token_uses"
            return error(401, "Authentication Error: token expired")
        return None

    def _lookup(self, request: web.Request, object_id: str,
                error: Callable[[int, str], web.Response]) -> Gen3Object | web.Response:
        state = _state(request)
        plan = self._faults.plan
        obj = self.objects.get(object_id)
        if obj is not None:
            state.object_id = object_id
        if obj is None or object_id in plan.missing:
            if obj is not None:
                state.fault = "missing"
            return error(404, f"No such object: {object_id}")
        if object_id in plan.forbidden:
            state.fault = "forbidden"
            return error(403, f"You don't have access permission on this file: {object_id}")
        return obj

    def sign(self, object_id: str, expires_in: int | None = None) -> str:
        """A fresh signed URL for ``object_id`` on the files host (its own nonce, so
        ``url_uses`` counts each URL apart), valid ``url_ttl`` seconds or fewer."""
        ttl = self._faults.plan.url_ttl
        exp = int(time.time()) + (ttl if expires_in is None else min(ttl, expires_in))
        nonce = next(self._nonce)
        sig = self._signature(object_id, exp, nonce)
        return f"{self.files_url}{SIGNED_PREFIX}{quote(object_id)}?exp={exp}&n={nonce}&sig={sig}"

    def _signature(self, object_id: str, exp: int, nonce: int) -> str:
        return hmac.new(self.secret, f"{object_id}|{exp}|{nonce}".encode(),
                        hashlib.sha256).hexdigest()

    async def _download(self, request: web.Request) -> web.StreamResponse:
        self._count("url_requests")
        if request.method != "GET":
            return _fence_error(405, "Method Not Allowed")
        refused = self._bearer(request, _fence_error)
        if refused is not None:
            return refused
        found = self._lookup(request, _object_id(request, "id"), _fence_error)
        if isinstance(found, web.Response):
            return found
        wanted = request.query.get("expires_in", "")
        url = self.sign(found.object_id, int(wanted) if wanted.isdigit() else None)
        if request.query.get("redirect", "").lower() in ("true", "1", "yes"):
            # Fence's ?redirect: a 302 to the storage host (a client that follows it
            # with its Authorization header is refused there)
            return web.Response(status=302, headers={"Location": url})
        return _json(200, {"url": url})

    # -- GA4GH DRS --------------------------------------------------------------------
    async def _drs(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["rest"]
        if self._faults.plan.no_drs or not ("/" + path).startswith(
                DRS_OBJECTS.removeprefix("/ga4gh")) or request.method != "GET":
            return web.Response(status=404, text="404: Not Found")
        rest = unquote(path.removeprefix("drs/v1/objects/"))
        object_id, access, access_id = rest.partition("/access/")
        if access:
            self._count("url_requests")
        refused = self._bearer(request, _drs_error)
        if refused is not None:
            return refused
        found = self._lookup(request, object_id, _drs_error)
        if isinstance(found, web.Response):
            return found
        if access:
            if access_id != "s3":
                return _drs_error(404, f"No such access_id: {access_id}")
            return _json(200, {"url": self.sign(found.object_id)})
        host = self.url.partition("://")[2]
        return _json(200, {
            "id": found.object_id, "self_uri": f"drs://{host}/{found.object_id}",
            "name": found.name, "size": found.size, "created_time": CREATED,
            "updated_time": CREATED, "version": "1",
            "mime_type": "application/zip" if found.kind == "zip" else "application/pdf",
            "checksums": [{"type": "md5", "checksum": found.md5}],
            "access_methods": [{"type": "https", "access_id": "s3", "region": ""}],
        })

    # -- the files host ---------------------------------------------------------------
    async def _signed(self, request: web.Request) -> web.StreamResponse:
        if "Authorization" in request.headers:
            _state(request).fault = "authorization"
            return _s3_error(request, 400, "InvalidArgument",
                             "Only one auth mechanism allowed; only the X-Amz-Algorithm "
                             "query parameter, Signature query string parameter or the "
                             "Authorization header should be specified")
        if request.method not in ("GET", "HEAD"):
            return _s3_error(request, 403, "AccessDenied", "Access Denied")
        object_id = _object_id(request, "id")
        q = request.query
        try:
            exp, nonce = int(q.get("exp", "")), int(q.get("n", ""))
        except ValueError:
            return _s3_error(request, 403, "AccessDenied", "Query-string authentication "
                             "requires the Signature, Expires and n parameters")
        if not hmac.compare_digest(self._signature(object_id, exp, nonce), q.get("sig", "")):
            return _s3_error(request, 403, "SignatureDoesNotMatch", "The request signature "
                             "we calculated does not match the signature you provided.")
        state = _state(request)
        faults = self._faults
        if exp <= time.time():
            state.fault = "url_expired"
            return _s3_error(request, 403, "AccessDenied", "Request has expired")
        if (faults.plan.url_uses is not None and request.method == "GET"
                and faults.use(faults.url_uses, str(nonce)) > faults.plan.url_uses):
                state.fault = "url_uses"
                return _s3_error(request, 403, "AccessDenied", "Request has expired")
        obj = self.objects.get(object_id)
        if obj is None:
            return _s3_error(request, 404, "NoSuchKey", "The specified key does not exist.")
        state.object_id = object_id
        return await self._file(request, object_id, obj.path, obj.size, obj.md5,
                                f'"{obj.md5}"', "application/octet-stream")

    # -- PathDB -----------------------------------------------------------------------
    async def _slide(self, request: web.Request) -> web.StreamResponse:
        if "Authorization" in request.headers:
            _state(request).fault = "authorization"
            return web.Response(status=400, text="PathDB files need no Authorization "
                                                 "header; this one was refused")
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="405: Method Not Allowed")
        path = request.match_info["path"]
        slide = self.slides.get(path)
        if slide is None:
            return web.Response(status=404, text="404: Not Found")
        _state(request).object_id = slide.url_path
        etag = f'"{slide.md5}"' if self._faults.plan.etag else None
        kind = "image/tiff" if slide.name.endswith((".tif", ".tiff")) \
            else "application/octet-stream"
        return await self._file(request, slide.url_path, slide.path, slide.size, slide.md5,
                                etag, kind)

    async def _list_images(self, request: web.Request) -> web.StreamResponse:
        """``listofimages/<collectionId>?page=N``: Drupal's JSON (every field a list of
        ``{"value"}``), the fields tcia_utils' ``getImages`` reads; ``[]`` past the last
        page, which is how it knows to stop."""
        try:
            cid, page = int(request.match_info["cid"]), int(request.query.get("page", "0"))
        except ValueError:
            return _json(400, {"message": "collectionId and page must be numbers"})
        slides = [s for s in self.slides.values() if s.collection_id == cid]
        shown = slides[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] if page >= 0 else []
        return web.json_response([{
            "nid": [{"value": s.slide_id}],
            "studyid": [{"value": s.collection}],
            "field_collection": [{"target_id": s.collection_id}],
            "clinicaltrialsubjectid": [{"value": s.patient_id}],
            "imageid": [{"value": s.image_id}],
            "imagedvolumeheight": [{"value": 6165}],
            "imagedvolumewidth": [{"value": 7324}],
            "referencepixelphysicalvaluex": [{"value": 0}],
            "referencepixelphysicalvaluey": [{"value": 0}],
            "field_wsiimage": [{"url": pathdb_url(self.pathdb_url, s)}],
            "created": [{"value": _DRUPAL_TIME}],
            "changed": [{"value": _DRUPAL_TIME}],
        } for s in shown])

    async def _collections(self, request: web.Request) -> web.StreamResponse:
        """``collections?_format=json``: tcia_utils' ``getCollections`` (name, tid)."""
        seen = {s.collection_id: s.collection for s in self.slides.values()}
        return web.json_response([
            {"tid": [{"value": cid}], "name": [{"value": name}],
             "changed": [{"value": _DRUPAL_TIME}]} for cid, name in sorted(seen.items())])

    # -- sending a file ---------------------------------------------------------------
    async def _file(self, request: web.Request, target: str, path: Path, size: int,
                    md5: str, etag: str | None, content_type: str) -> web.StreamResponse:
        """``path`` as an S3-like object: Range/If-Range/416, and the file faults."""
        faults = self._faults
        plan = faults.plan
        state = _state(request)
        start, end, partial = 0, size - 1, False
        header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if header is not None and (if_range is None or if_range == etag):
            parsed = _parse_range(header, size)
            if parsed == "unsatisfiable":
                return web.Response(
                    status=416, headers={"Content-Range": f"bytes */{size}"},
                    text=None if request.method == "HEAD" else "Range Not Satisfiable")
            if isinstance(parsed, tuple):
                if plan.ignore_range:
                    state.fault = "ignore_range"
                else:
                    start, end = parsed
                    partial = True
        length = end - start + 1 if size else 0
        headers = {"Accept-Ranges": "bytes", "Content-Type": content_type}
        if etag is not None:
            headers["ETag"] = etag
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        response = web.StreamResponse(status=206 if partial else 200, headers=headers)
        response.content_length = length
        if plan.first_byte_delay:
            await asyncio.sleep(plan.first_byte_delay)
        if request.method == "HEAD":
            state.bytes_sent = 0
            await response.prepare(request)
            await response.write_eof()
            return response
        gets = faults.use(faults.gets, target)
        cut: int | None = None
        if plan.drop_after is not None and gets <= plan.drop_times and length:
            cut = start + min(plan.drop_after, length - 1) if length > 1 else start
            state.fault = "reset" if plan.drop_reset else "drop"
        flip: int | None = None
        at = size // 2
        if size and target in plan.wrong_byte and start <= at <= end:
            flips = faults.use(faults.flips, target)
            if plan.wrong_byte_times is None or flips <= plan.wrong_byte_times:
                flip = at
                state.fault = "wrong_byte"
        await response.prepare(request)
        state.bytes_sent = 0
        await send_range(request, response, path, start, end + 1, state=state,
                         log=lambda: self._log_request(request, response.status),
                         flip=flip, cut=cut, rate=plan.rate, reset_at_cut=plan.drop_reset)
        return response


def _object_id(request: web.Request, name: str) -> str:
    """The object id of the path, ``dg.4DFC/<uuid>`` or ``dg.4DFC%2F<uuid>`` alike."""
    return unquote(request.match_info[name])


def _origin_of(path: str) -> str:
    if path.startswith(SIGNED_PREFIX):
        return "files"
    if path.startswith(("/system/", "/index.php/", "/listofimages/")):
        return "pathdb"
    return "api"


# -- running -------------------------------------------------------------------------
class Gen3Server:
    """A Gen3 API (``url``), its signed-URL host (``files_url``) and a PathDB
    (``pathdb_url``), three ports on ``host``, serving ``objects`` and ``slides`` (whose
    files must lie under ``root``). Use as a context manager, or start()/stop()::

        objects, slides = gen3_view(archive, out)
        with Gen3Server(out, objects, slides, Gen3Faults(token_uses=2)) as gen3:
            gen3.write_credentials(tmp / "credentials.json")
            write_drs_manifest(tmp / "m.csv", objects, base_url=gen3.url)
    """

    _thread_name = "nbia-gen3-server"

    def __init__(self, root: str | Path, objects: Iterable[Gen3Object],
                 slides: Iterable[PathdbSlide] = (), faults: Gen3Faults | str | None = None,
                 *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root).resolve()
        self.objects = tuple(objects)
        self.slides = tuple(slides)
        paths = [o.path for o in self.objects] + [s.path for s in self.slides]
        for path in paths:
            if not path.resolve().is_relative_to(self.root):
                raise ArchiveError(f"{path}: not under the Gen3 server's root "
                                   f"{self.root}")
        plan = Gen3Faults.parse(faults) if isinstance(faults, str) else faults
        self.service = Gen3Service(self.objects, self.slides, plan)
        self.host = host
        self._requested_port = port
        self._serving: list[AppThread] = []
        self._api_key: str | None = None
        self._key_id = ""

    def __repr__(self) -> str:
        where = self.url if self._serving else "not started"
        return f"Gen3Server({len(self.objects)} objects, {len(self.slides)} slides, {where})"

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> Self:
        if self._serving:
            return self
        try:
            for make, port in ((self.service.api_app, self._requested_port),
                               (self.service.files_app, 0), (self.service.pathdb_app, 0)):
                self._serving.append(AppThread(make(), host=self.host, port=port,
                                               name=self._thread_name).start())
        except BaseException:
            self.stop()
            raise
        api, files, pathdb = self._serving
        self.service.url, self.service.files_url = api.url, files.url
        self.service.pathdb_url = pathdb.url
        self._key_id, self._api_key = self.service.mint_key()
        return self

    def stop(self) -> None:
        """Stop serving; in-flight streams are cut after a short grace period."""
        serving, self._serving = self._serving, []
        for thread in serving:
            thread.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _origin(self, which: int) -> str:
        if not self._serving:
            raise RuntimeError("the Gen3 server is not running; call start() or use `with`")
        return self._serving[which].url

    # -- addresses --------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The Gen3 API origin (``--gen3-endpoint``; the host of the manifests'
        ``drs_uri``)."""
        return self._origin(0)

    @property
    def files_url(self) -> str:
        """The signed URLs' origin: a second port, never owed a bearer token."""
        return self._origin(1)

    @property
    def pathdb_url(self) -> str:
        """The PathDB origin (``imageUrl``)."""
        return self._origin(2)

    @property
    def port(self) -> int | None:
        return self._serving[0].port if self._serving else None

    def drs_uri(self, obj: Gen3Object) -> str:
        return drs_uri(obj, self.url)

    def slide_url(self, slide: PathdbSlide, *, index_php: bool = False) -> str:
        return pathdb_url(self.pathdb_url, slide, index_php=index_php)

    def signed_url(self, obj: Gen3Object | str) -> str:
        """A signed URL, as ``/user/data/download/`` would give (for tests and benches
        that fetch the file directly, e.g. with curl)."""
        return self.service.sign(obj if isinstance(obj, str) else obj.object_id)

    # -- credentials ------------------------------------------------------------------
    @property
    def api_key(self) -> str:
        """A valid API key (a JWT: ``iss`` = ``<url>/user``, ``exp``, ``purpose``)."""
        if self._api_key is None:
            raise RuntimeError("the Gen3 server is not running; call start() or use `with`")
        return self._api_key

    @property
    def key_id(self) -> str:
        """The ``key_id`` beside :attr:`api_key` in the credentials file."""
        if self._api_key is None:
            raise RuntimeError("the Gen3 server is not running; call start() or use `with`")
        return self._key_id

    def write_credentials(self, path: str | Path, *, valid: bool = True) -> Path:
        """A Gen3 credentials file (``{"api_key", "key_id"}``, mode 0600) at ``path``;
        ``valid=False``: a key of the right shape that this Fence never issued."""
        if valid:
            key_id, key = self.key_id, self.api_key
        else:
            key_id, key = self.service.mint_key(valid=False)
        target = Path(path)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"api_key": key, "key_id": key_id}, handle)
        os.chmod(target, 0o600)  # an existing file keeps its mode under O_CREAT
        return target

    def revoke_keys(self) -> None:
        """Every key (and token made from one) is refused from now on: 401."""
        self.service.revoke_keys()

    # -- knobs and counts -------------------------------------------------------------
    def set_faults(self, plan: Gen3Faults | str | None) -> None:
        """Replace the fault plan (a spec string works too); counters start afresh."""
        self.service.set_faults(Gen3Faults.parse(plan) if isinstance(plan, str) else plan)

    @property
    def faults(self) -> Gen3Faults:
        return self.service.faults

    @property
    def token_requests(self) -> int:
        """Requests to the token endpoints so far (answered or refused)."""
        return self.service.token_requests

    @property
    def url_requests(self) -> int:
        """Requests for a signed URL so far (``/user/data/download/`` and DRS
        ``/access/``, answered or refused)."""
        return self.service.url_requests

    @property
    def requests(self) -> list[Gen3Request]:
        """A snapshot of the request log of all three origins (the newest last)."""
        return [r for r in self.service.requests if isinstance(r, Gen3Request)]

    def clear_requests(self) -> None:
        self.service.clear_requests()

    def with_faults(self, **changes: Any) -> Gen3Faults:
        """The current plan with ``changes`` (for ``set_faults``)."""
        return replace(self.faults, **changes)

