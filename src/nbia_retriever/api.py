"""The NBIA REST client: metadata, queries, series streams and the OAuth token.

One pooled :class:`httpx.Client` (HTTP/1.1 keep-alive) is shared by every worker thread;
httpx's sync client is thread-safe for concurrent requests. The :class:`TokenManager`
is shared too, so a long download fetches one token, refreshes it shortly before it
expires (NBIA tokens live two hours, large downloads live for days) and again on a 401,
without every worker logging in on its own.

Secrets policy: the password and tokens live only in memory, in objects whose ``repr``
hides them; they are sent in request bodies and the ``Authorization`` header, never in
URLs, and no error message ever quotes them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from . import __version__
from .errors import ApiError, AuthError, NotPublicError
from .models import SeriesInfo, normalise_series_metadata

#: The public TCIA API (no version suffix).
DEFAULT_API_URL = "https://services.cancerimagingarchive.net/nbia-api/services"
API_VERSIONS = ("auto", "v1", "v2", "v4")
#: Series per v4 batch metadata POST (what the Java retriever and tcia_utils send at most).
V4_BATCH = 10_000
USER_AGENT = f"nbia-retriever/{__version__}"
#: Largest metadata/query answer we accept (a v4 batch of 10,000 series is ~5 MB; the
#: biggest collection's getSeries is ~100 MB).
MAX_ANSWER_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Credentials:
    """A username and password; ``repr`` never shows the password."""

    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=***)"


def token_url_for(api_url: str) -> str:
    """``https://h/nbia-api/services[/v1]`` -> ``https://h/nbia-api/oauth/token``."""
    base = api_url.rstrip("/")
    marker = "/nbia-api/services"
    if marker in base:
        return base[: base.index(marker)] + "/nbia-api/oauth/token"
    return base + "/nbia-api/oauth/token"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form; dates are rare here)."""
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def _error_text(response: httpx.Response, limit: int = 200) -> str:
    """A short, single-line excerpt of an error body (HTML pages are reduced to a hint).

    Reads at most 64 KiB (an error body may never end) and drops control characters:
    the text is the server's, and it ends up on the user's terminal.
    """
    data = bytearray()
    try:
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= 1 << 16:
                break
    except httpx.HTTPError:
        return ""
    text = data.decode("utf-8", "replace")
    if "<html" in text[:500].lower():
        return "(an HTML page)"
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text[:limit]


def raise_for_status(response: httpx.Response, what: str) -> None:
    """Turn a non-2xx answer into the right :class:`ApiError` subclass.

    NBIA answers 400 with a text such as "... is not in public domain" for series that are
    unknown or not accessible: that is final, so it becomes :class:`NotPublicError` (the
    engine never retries it). 429 and 5xx carry ``retry_after`` so callers can back off.
    """
    status = response.status_code
    if status < 400:
        return
    detail = _error_text(response)
    message = f"{what}: HTTP {status}" + (f" {detail}" if detail else "")
    if status == 400:
        raise NotPublicError(message, status=status)
    if status in (401, 403):
        raise AuthError(f"{what}: HTTP {status} (not authorised; check the login)")
    raise ApiError(
        message,
        status=status,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )


class TlsError(ApiError):
    """The server's TLS certificate cannot be verified.

    The same for every request, so never retried, and it stops the run rather than
    failing series one by one: ``--insecure`` is the user's explicit way out.
    """


def tls_error(exc: httpx.HTTPError) -> TlsError | None:
    """A :class:`TlsError` if ``exc`` is a failed certificate check, else None."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" not in text:
        return None
    reason = text.partition("certificate verify failed:")[2].partition("(_ssl")[0].strip()
    try:
        host = exc.request.url.host
    except RuntimeError:  # no request attached
        host = "the server"
    return TlsError(f"the TLS certificate of {host} cannot be verified ({reason or 'untrusted'});"
                    " use --insecure only if you trust this server")


class TokenManager:
    """Fetches, shares and refreshes one OAuth token for all threads.

    Refreshes ``refresh_margin`` seconds (or a tenth of the lifetime, whichever is
    smaller) before expiry, and on demand after a 401 via :meth:`invalidate`.
    """

    def __init__(
        self,
        http: httpx.Client,
        token_url: str,
        credentials: Credentials,
        *,
        refresh_margin: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._url = token_url
        self._credentials = credentials
        self._margin = refresh_margin
        self._clock = clock
        self._lock = threading.Lock()
        self._access: str | None = None
        self._refresh: str | None = None
        self._expires_at = 0.0
        self._lifetime = 0.0
        self.fetches = 0  # how many token requests were made (tests and diagnostics)

    def __repr__(self) -> str:
        return f"TokenManager(user={self._credentials.username!r})"

    @property
    def username(self) -> str:
        return self._credentials.username

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
        if not self._request(form, now, quiet=False):  # pragma: no cover - raises instead
            raise AuthError("login failed")

    def _request(self, form: Mapping[str, str], now: float, *, quiet: bool) -> bool:
        self.fetches += 1
        try:
            response = self._http.post(self._url, data=dict(form))
        except httpx.HTTPError as exc:
            if (tls := tls_error(exc)) is not None:
                raise tls from None
            if quiet:
                return False
            raise AuthError(f"login to {self._url} failed: {type(exc).__name__}") from None
        if response.status_code != 200:
            if quiet:
                return False
            who = self._credentials.username
            raise AuthError(
                f"login as {who!r} at {self._url} failed: HTTP {response.status_code}"
            )
        try:
            body = response.json()
            access = str(body["access_token"])
        except (ValueError, KeyError, TypeError):
            if quiet:
                return False
            raise AuthError(f"login at {self._url} failed: no access_token in the answer") from None
        lifetime = float(body.get("expires_in") or 7200)
        self._access = access
        self._refresh = body.get("refresh_token") or self._refresh
        self._lifetime = lifetime
        self._expires_at = now + lifetime
        return True


class NbiaClient:
    """Talks to one NBIA server. Thread-safe; share one instance between workers.

    ``api_url`` is the services root without a version, e.g.
    ``https://services.cancerimagingarchive.net/nbia-api/services``. ``version`` is
    ``auto`` (v2 when logged in, else v4 falling back to v1 when the server has no v4),
    or one of ``v1``, ``v2``, ``v4``.
    """

    def __init__(
        self,
        api_url: str = DEFAULT_API_URL,
        *,
        version: str = "auto",
        credentials: Credentials | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 30.0,
        verify: bool = True,
        max_connections: int = 16,
        metadata_retries: int = 4,
        backoff_base: float = 1.0,
    ) -> None:
        if version not in API_VERSIONS:
            raise ValueError(f"unknown API version {version!r}; use one of {API_VERSIONS}")
        if version == "v2" and credentials is None:
            credentials = Credentials("nbia_guest", "")
        self.api_url = api_url.rstrip("/")
        self._requested = version
        self._version: str | None = None if version == "auto" else version
        if version == "auto" and credentials is not None:
            self._version = "v2"
        self._version_lock = threading.Lock()
        self.http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout, pool=None),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
            ),
            verify=verify,
            headers={"User-Agent": USER_AGENT},
            follow_redirects=True,
        )
        self.tokens = (
            TokenManager(self.http, token_url_for(self.api_url), credentials)
            if credentials is not None
            else None
        )
        self.metadata_retries = metadata_retries
        self.backoff_base = backoff_base

    def __enter__(self) -> NbiaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- plumbing ---------------------------------------------------------------------
    @property
    def logged_in(self) -> bool:
        return self.tokens is not None

    def login(self) -> None:
        """Fetch the token now, so a bad password fails before any download starts."""
        if self.tokens is not None:
            self.tokens.authorization()

    def version(self) -> str:
        """The API version in use, probing the server once in ``auto`` mode."""
        with self._version_lock:
            if self._version is None:
                self._version = self._probe_version()
            return self._version

    def _probe_version(self) -> str:
        """v4 if the server has it; v1 on a definite "no such endpoint". A busy or
        unreachable server is retried like any call, never mistaken for an answer."""
        attempt = 0
        while True:
            attempt += 1
            retry_after = None
            try:
                response = self.http.post(f"{self.api_url}/v4/getSeriesMetadata",
                                          data={"list": ""})
                status = response.status_code
                if status in (404, 405, 501):
                    return "v1"
                if status < 500 and status != 429:
                    return "v4"
                problem = f"HTTP {status}"
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            except httpx.HTTPError as exc:
                if (tls := tls_error(exc)) is not None:
                    raise tls from None
                problem = f"{type(exc).__name__}: {exc}"
            if attempt > self.metadata_retries:
                raise ApiError(f"cannot reach {self.api_url}: {problem}")
            time.sleep(backoff_delay(attempt, self.backoff_base, retry_after))

    def _url(self, endpoint: str, version: str | None = None) -> str:
        return f"{self.api_url}/{version or self.version()}/{endpoint}"

    def _headers(self) -> dict[str, str]:
        if self.tokens is None:
            return {}
        return {"Authorization": self.tokens.authorization()}

    def request(
        self,
        method: str,
        endpoint: str,
        *,
        what: str,
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        version: str | None = None,
    ) -> httpx.Response:
        """One API call with retries on transport errors, 429 and 5xx, and 401 refresh."""
        url = self._url(endpoint, version)
        attempt = 0
        while True:
            attempt += 1
            headers = self._headers()
            try:
                response = self._bounded(method, url, params=params, data=data,
                                         headers=headers, what=what)
                if response.status_code == 401 and self.tokens is not None and attempt <= 2:
                    self.tokens.invalidate(headers.get("Authorization"))
                    continue
                raise_for_status(response, what)
                return response
            except NotPublicError:
                raise
            except ApiError as exc:
                retryable = exc.status is not None and (exc.status == 429 or exc.status >= 500)
                if not retryable or attempt > self.metadata_retries:
                    raise
                delay = backoff_delay(attempt, self.backoff_base, exc.retry_after)
            except httpx.HTTPError as exc:
                if (tls := tls_error(exc)) is not None:
                    raise tls from None
                if attempt > self.metadata_retries:
                    raise ApiError(f"{what}: {type(exc).__name__}: {exc}") from None
                delay = backoff_delay(attempt, self.backoff_base)
            time.sleep(delay)

    def _bounded(self, method: str, url: str, *, what: str, **kwargs: Any) -> httpx.Response:
        """A whole (small) API answer, refusing one larger than :data:`MAX_ANSWER_BYTES`:
        a broken or hostile server's endless body must not exhaust memory."""
        with self.http.stream(method, url, **kwargs) as response:
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise ApiError(f"{what}: the answer exceeds {MAX_ANSWER_BYTES >> 20} MiB")
            return httpx.Response(response.status_code, headers=response.headers,
                                  content=bytes(body), request=response.request)

    # -- metadata ---------------------------------------------------------------------
    def series_metadata(
        self,
        uids: Sequence[str],
        *,
        workers: int = 8,
        on_progress: Callable[[int], None] | None = None,
        errors: dict[str, str] | None = None,
    ) -> dict[str, SeriesInfo]:
        """Metadata for every series the server will give us; absent UIDs are left out.

        With v1/v2, a series whose metadata request keeps failing (after retries) is
        recorded in ``errors`` (uid -> message) instead of failing the whole call: one
        broken series must not stop a 19,000-series download.

        v4 asks in batches by POST (one request per 10,000 series); v1/v2 have only the
        per-series endpoint, so those calls run concurrently on the shared pool.
        """
        if not uids:
            return {}
        if self.version() == "v4":
            found: dict[str, SeriesInfo] = {}
            for start in range(0, len(uids), V4_BATCH):
                batch = uids[start : start + V4_BATCH]
                found.update(self._v4_metadata(batch))
                if on_progress:
                    on_progress(len(batch))
            return found
        result: dict[str, SeriesInfo] = {}

        def one(uid: str) -> tuple[str, SeriesInfo | None]:
            try:
                return uid, self._v1_metadata(uid)
            except (AuthError, TlsError):
                raise
            except ApiError as exc:
                if errors is None:
                    raise
                errors[uid] = str(exc)
                return uid, None

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(uids)))) as pool:
            for uid, info in pool.map(one, uids):
                if info is not None:
                    result[uid] = info
                if on_progress:
                    on_progress(1)
        return result

    def _v4_metadata(self, uids: Sequence[str]) -> dict[str, SeriesInfo]:
        response = self.request(
            "POST", "getSeriesMetadata", what="series metadata (v4)",
            data={"list": ",".join(uids)},
        )
        wanted = set(uids)
        found: dict[str, SeriesInfo] = {}
        for record in _records(response):
            info = normalise_series_metadata(record)
            if info.series_uid in wanted:
                found[info.series_uid] = info
        return found

    def _v1_metadata(self, uid: str) -> SeriesInfo | None:
        try:
            response = self.request(
                "GET", "getSeriesMetaData", what=f"metadata of series {uid}",
                params={"SeriesInstanceUID": uid},
            )
        except NotPublicError:
            return None
        for record in _records(response):
            info = normalise_series_metadata(record, series_uid=uid)
            if info.series_uid == uid:
                return info
        return None

    # -- queries ----------------------------------------------------------------------
    def query(self, endpoint: str, **params: str) -> list[dict[str, Any]]:
        """A query endpoint (getCollectionValues, getSeries...) as a list of records.

        NBIA answers "no results" with 200 and an empty body, not ``[]``.
        """
        clean = {k: v for k, v in params.items() if v}
        response = self.request("GET", endpoint, what=endpoint, params=clean)
        return list(_records(response))

    def collections(self) -> list[str]:
        return [str(r.get("Collection", "")) for r in self.query("getCollectionValues")
                if r.get("Collection")]

    def series(self, **filters: str) -> list[dict[str, Any]]:
        return self.query("getSeries", **filters)

    # -- images -----------------------------------------------------------------------
    @contextlib.contextmanager
    def open_series(self, uid: str, *, md5: bool = True) -> Iterator[httpx.Response]:
        """Open the zip stream of one series; the caller iterates ``response.iter_raw()``.

        Raises :class:`NotPublicError` (final), :class:`ApiError` with ``status`` and
        ``retry_after`` (retryable for 429/5xx), or an :class:`httpx.HTTPError`. A 401
        (token expired or revoked: not the series' fault, so it must not cost one of the
        series' retries) invalidates the shared token and is retried once at once with
        a fresh one; a second 401 raises :class:`AuthError`.
        """
        version = self.version()
        if version == "v4":
            url = self._url("getImage", version)
            params = {"SeriesInstanceUID": uid}
            if md5:
                params["IncludeMD5"] = "yes"
        else:
            url = self._url("getImageWithMD5Hash" if md5 else "getImage", version)
            params = {"SeriesInstanceUID": uid}
        for attempt in (1, 2):
            headers = self._headers()
            with self.http.stream("GET", url, params=params, headers=headers) as response:
                if response.status_code == 401 and self.tokens is not None:
                    self.tokens.invalidate(headers.get("Authorization"))
                    if attempt == 1:
                        continue  # once more with a fresh token
                raise_for_status(response, f"series {uid}")
                yield self._zip_response(response, uid)
                return

    @staticmethod
    def _zip_response(response: httpx.Response, uid: str) -> httpx.Response:
        """Refuse a 2xx answer that is plainly not a zip (an HTML or JSON error page)."""
        ctype = response.headers.get("Content-Type", "").lower()
        if ctype.startswith(("text/html", "application/json")):
            raise ApiError(
                f"series {uid}: the server sent {ctype.split(';')[0]} instead of a zip",
                status=response.status_code,
            )
        return response


def _records(response: httpx.Response) -> Iterable[dict[str, Any]]:
    """Records from a JSON array/object or CSV body; empty body and 204 give none."""
    if response.status_code == 204:
        return []
    text = response.text
    if not text.strip():
        return []
    stripped = text.lstrip()
    if stripped[:1] in "[{":
        try:
            data = json.loads(text)
        except ValueError:
            raise ApiError(f"{response.request.url.path}: malformed JSON") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            return []
        return [d for d in data if isinstance(d, dict)]
    if "<html" in stripped[:500].lower():
        raise ApiError(f"{response.request.url.path}: the server sent an HTML page, not data")
    return list(csv.DictReader(io.StringIO(text.lstrip("\ufeff"))))


def backoff_delay(attempt: int, base: float, retry_after: float | None = None,
                  cap: float = 300.0) -> float:
    """Exponential backoff with full jitter, never shorter than the server's Retry-After.

    Jitter spreads the retries of many workers (and many users) so that a struggling
    server is not hit by a synchronised wave.
    """
    exp = min(cap, base * (2 ** (attempt - 1)))
    delay = exp / 2 + random.uniform(0, exp / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay
