"""HTTP for the NBIA client: API calls over httpx, series zips over ``http.client``.

Two stacks, each where the numbers put it (``benchmarks/transports.py``, BENCHMARKS.md):

* **API calls** (metadata, queries, login) are small; :class:`ApiSession` uses one pooled
  ``httpx.Client`` for them: form encoding, proxies from the environment, keep-alive.
* **Series zips** are the bytes that matter. httpx parses chunked bodies in Python
  (h11), which on two cores costs a third of the download's CPU and serialises many
  streams on the GIL. ``http.client`` hands out a megabyte per ``read`` with one C-level
  ``readinto`` per server chunk: 16 concurrent streams run as fast as 2.
  :class:`StreamOpener` keeps one keep-alive connection per thread and origin.

Both share the rules that make a server's misbehaviour harmless:

* **Redirects** are followed only within one origin (scheme, host, port; an upgrade from
  http to https on the same host is allowed). A redirect elsewhere is an error and is
  never followed, so a password or token cannot be carried to another host.
* **Progress floor**: a transfer must move :data:`FLOOR_BYTES` per ``timeout`` seconds.
  A per-read timeout alone lets a server that trickles a byte a second hold a worker
  forever; here it is cut within one or two windows.
* **Bounded answers**: an API answer larger than :data:`MAX_ANSWER_BYTES` is refused.
* **Errors** come out as our own (:class:`~nbia_retriever.errors.NetworkError`,
  :class:`~nbia_retriever.errors.TlsError`, :class:`~nbia_retriever.errors.ApiError`):
  nothing above this module imports an HTTP library.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

from .. import __version__
from ..errors import ApiError, NetworkError, TlsError
from ..untrusted import quote

USER_AGENT = f"nbia-retriever/{__version__}"
#: Largest metadata/query answer we accept (a v4 batch of 10,000 series is ~5 MB; the
#: biggest collection's getSeries is ~100 MB).
MAX_ANSWER_BYTES = 512 * 1024 * 1024
#: A transfer that moves less than this per ``timeout`` seconds is abandoned.
FLOOR_BYTES = 1024
#: Bytes handed to the zip reader per read of a series stream.
READ_SIZE = 1 << 20
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


# ----------------------------------------------------------------------------- origins


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            port = parts.port
        except ValueError:
            port = None
        return cls(scheme, (parts.hostname or "").lower(),
                   port or (443 if scheme == "https" else 80))

    def __str__(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")


def same_origin_or_upgrade(src: str, dst: str) -> bool:
    a, b = Origin.of(src), Origin.of(dst)
    if a == b:
        return True
    return a.host == b.host and a.scheme == "http" and b.scheme == "https" and b.port == 443


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------- the floor


class ProgressFloor:
    """At least ``floor`` bytes per ``window`` seconds, or :class:`NetworkError`.

    Fed from inside the read loop (every ``recv``), so a trickling server is caught
    while it trickles, not after its next full read.
    """

    __slots__ = ("_clock", "_floor", "_mark", "_start", "_what", "_window", "total")

    def __init__(self, window: float, what: str, *, floor: int = FLOOR_BYTES,
                 clock: Any = time.monotonic) -> None:
        self._window = window
        self._floor = floor
        self._clock = clock
        self._what = what
        self._start = clock()
        self._mark = 0
        self.total = 0

    def add(self, n: int) -> None:
        self.total += n
        now = self._clock()
        if now - self._start >= self._window:
            if self.total - self._mark < self._floor:
                raise NetworkError(
                    f"{self._what}: timed out (under {self._floor} bytes in "
                    f"{self._window:g} s: the server is sending too slowly)", timeout=True)
            self._start, self._mark = now, self.total


# ----------------------------------------------------------------------------- API calls


@dataclass(frozen=True)
class Answer:
    """A whole (small) API answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def map_httpx_error(exc: httpx.HTTPError, what: str) -> ApiError:
    """httpx's exceptions as ours (called at this boundary only)."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        reason = text.partition("certificate verify failed:")[2].partition("(_ssl")[0].strip()
        try:
            host = exc.request.url.host
        except RuntimeError:  # no request attached
            host = "the server"
        return TlsError(f"the TLS certificate of {host} cannot be verified "
                        f"({reason or 'untrusted'}); use --insecure only if you trust this "
                        "server")
    if isinstance(exc, httpx.TimeoutException):
        return NetworkError(f"{what}: timed out ({type(exc).__name__})", timeout=True)
    return NetworkError(f"{what}: {type(exc).__name__}: {quote(text, 160)}")


class ApiSession:
    """One pooled httpx client for API calls, with our redirect and floor rules."""

    def __init__(self, *, timeout: float, connect_timeout: float = 30.0, verify: bool = True,
                 max_connections: int = 16) -> None:
        self.timeout = timeout
        self.http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout, pool=None),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            verify=verify,
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
        )

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, url: str, *, what: str, params: Mapping[str, str] | None = None,
             data: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None,
             redirects: bool = True, limit: int = MAX_ANSWER_BYTES) -> Answer:
        """One request, the whole answer read within the floor and ``limit``.

        Same-origin redirects are followed when ``redirects`` (POST bodies are re-sent
        only for 307/308, as the standard says); a redirect to another origin raises.
        """
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with self.http.stream(method, current, params=params, data=data,
                                      headers=dict(headers or {})) as response:
                    status = response.status_code
                    if status in _REDIRECTS:
                        location = response.headers.get("Location", "")
                        target = urljoin(str(response.url), location)
                        if not redirects or not location:
                            raise ApiError(f"{what}: the server answered a redirect "
                                           f"(HTTP {status}); not followed", status=status)
                        if not same_origin_or_upgrade(str(response.url), target):
                            raise ApiError(
                                f"{what}: the server redirected to another host "
                                f"({quote(str(Origin.of(target)), 80)}); not followed",
                                status=status)
                        current, params = target, None
                        if status == 303 or (status in (301, 302) and method == "POST"):
                            method, data = "GET", None
                        continue
                    floor = ProgressFloor(self.timeout, what)
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        floor.add(len(chunk))
                        if len(body) > limit:
                            raise ApiError(f"{what}: the answer exceeds {limit >> 20} MiB")
                    return Answer(status, {k.lower(): v for k, v in response.headers.items()},
                                  bytes(body), str(response.url))
            except httpx.HTTPError as exc:
                raise map_httpx_error(exc, what) from None
        raise ApiError(f"{what}: more than {MAX_REDIRECTS} redirects")


# ----------------------------------------------------------------------------- streams


class _CountingSocketIO(io.RawIOBase):
    """The socket seen as a raw stream, every ``recv`` counted against the floor."""

    def __init__(self, sock: socket.socket, floor: ProgressFloor | None) -> None:
        super().__init__()
        self._sock = sock
        self.floor = floor

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._sock.recv_into(buffer)
        if self.floor is not None:
            self.floor.add(n)
        return n


class _Response(http.client.HTTPResponse):
    """``HTTPResponse`` reading through :class:`_CountingSocketIO` with a big buffer."""

    def __init__(self, sock: socket.socket, *args: Any, floor_ref: list[ProgressFloor | None],
                 **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the plain makefile() reader; ours replaces it
        self.raw_io = _CountingSocketIO(sock, floor_ref[0])
        self.fp = io.BufferedReader(self.raw_io, buffer_size=256 * 1024)  # type: ignore[assignment]


def _connection(origin: Origin, *, timeout: float, context: ssl.SSLContext | None,
                floor_ref: list[ProgressFloor | None]) -> http.client.HTTPConnection:
    proxy = _proxy_for(origin)
    host, port = (proxy.host, proxy.port) if proxy else (origin.host, origin.port)
    conn: http.client.HTTPConnection
    if origin.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        if proxy is not None:
            conn.set_tunnel(origin.host, origin.port, headers=proxy.headers)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.response_class = functools.partial(_Response, floor_ref=floor_ref)  # type: ignore[assignment]
    conn._nbia_proxy = proxy  # type: ignore[attr-defined]
    return conn


@dataclass(frozen=True)
class _Proxy:
    host: str
    port: int
    headers: dict[str, str]


def _proxy_for(origin: Origin) -> _Proxy | None:
    """The environment's proxy for ``origin`` (HTTPS_PROXY, HTTP_PROXY, NO_PROXY)."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(origin.scheme)
    if not url or urllib.request.proxy_bypass_environment(origin.host, proxies):
        return None
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    headers: dict[str, str] = {}
    if parts.username:
        import base64

        token = f"{parts.username}:{parts.password or ''}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(token).decode()
    return _Proxy(parts.hostname, parts.port or 80, headers)


class SeriesStream:
    """An open series zip: iterate :meth:`chunks`; ``bytes_received`` counts the wire."""

    def __init__(self, response: http.client.HTTPResponse, what: str,
                 floor: ProgressFloor) -> None:
        self._response = response
        self._what = what
        self._floor = floor
        self.status = response.status
        self.content_type = (response.getheader("Content-Type") or "").lower()

    def header(self, name: str) -> str | None:
        return self._response.getheader(name)

    @property
    def bytes_received(self) -> int:
        return self._floor.total

    def chunks(self, size: int = READ_SIZE) -> Iterator[bytes]:
        read = self._response.read
        try:
            while True:
                data = read(size)
                if not data:
                    return
                yield data
        except (ApiError, GeneratorExit):
            raise
        except BaseException as exc:
            mapped = map_stream_error(exc, self._what)
            if mapped is None:
                raise
            raise mapped from None

    def read_text(self, limit: int = 1 << 16) -> str:
        """At most ``limit`` bytes of the body as text (error pages)."""
        try:
            return self._response.read(limit).decode("utf-8", "replace")
        except Exception:
            return ""


def map_stream_error(exc: BaseException, what: str) -> ApiError | None:
    """An ``http.client``/socket/ssl exception as ours; None for anything else."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TlsError(f"the TLS certificate of the server cannot be verified "
                        f"({quote(exc.verify_message or str(exc), 120)}); use --insecure only "
                        "if you trust this server")
    if isinstance(exc, TimeoutError | socket.timeout):
        return NetworkError(f"{what}: timed out (no data)", timeout=True)
    if isinstance(exc, http.client.IncompleteRead):
        return NetworkError(f"{what}: the connection closed mid-body")
    if isinstance(exc, http.client.HTTPException):
        return NetworkError(f"{what}: {type(exc).__name__}: {quote(str(exc), 120)}")
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return NetworkError(f"{what}: {type(exc).__name__}: {quote(reason, 120)}")
    return None


class StreamOpener:
    """Opens series zips over ``http.client``: one keep-alive connection per thread and
    origin, the progress floor on every read, same-origin redirects only."""

    def __init__(self, *, timeout: float, connect_timeout: float = 30.0,
                 verify: bool = True) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        if verify:
            self._context = ssl.create_default_context()
        else:
            self._context = ssl.create_default_context()
            self._context.check_hostname = False
            self._context.verify_mode = ssl.CERT_NONE
        self._local = threading.local()
        self._all: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, set()
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()

    def _conn(self, origin: Origin) -> tuple[http.client.HTTPConnection, list[Any]]:
        pool: dict[Origin, tuple[http.client.HTTPConnection, list[Any]]] = \
            self._local.__dict__.setdefault("pool", {})
        found = pool.get(origin)
        if found is None:
            floor_ref: list[ProgressFloor | None] = [None]
            conn = _connection(origin, timeout=self.timeout, context=self._context,
                               floor_ref=floor_ref)
            found = pool[origin] = (conn, floor_ref)
            with self._lock:
                self._all.add(conn)
        return found

    def _drop(self, origin: Origin) -> None:
        pool = self._local.__dict__.get("pool", {})
        found = pool.pop(origin, None)
        if found is not None:
            with contextlib.suppress(Exception):
                found[0].close()
            with self._lock:
                self._all.discard(found[0])

    @contextlib.contextmanager
    def open(self, url: str, *, params: Mapping[str, str], headers: Mapping[str, str],
             what: str) -> Iterator[SeriesStream]:
        """GET ``url`` and yield the stream once its status line and headers are in.

        The connection goes back to this thread's pool only when the body was read to
        its end; anything else (an error, a caller that stopped early) closes it.
        """
        current = url + ("?" + urlencode(params) if params else "")
        for _ in range(MAX_REDIRECTS + 1):
            origin = Origin.of(current)
            conn, floor_ref = self._conn(origin)
            floor = ProgressFloor(self.timeout, what)
            floor_ref[0] = floor
            parts = urlsplit(current)
            target = parts.path + ("?" + parts.query if parts.query else "")
            proxy = getattr(conn, "_nbia_proxy", None)
            if proxy is not None and origin.scheme == "http":
                target = current
            request_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                               **headers}
            try:
                response = self._send(conn, target, request_headers)
            except BaseException as exc:
                self._drop(origin)
                mapped = map_stream_error(exc, what)
                if mapped is None:
                    raise
                # A kept-alive connection the server closed meanwhile: once more, fresh.
                if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError |
                              BrokenPipeError) and getattr(conn, "_nbia_used", False):
                    conn, floor_ref = self._conn(origin)
                    floor_ref[0] = floor
                    try:
                        response = self._send(conn, target, request_headers)
                    except BaseException as again:
                        self._drop(origin)
                        mapped = map_stream_error(again, what)
                        if mapped is None:
                            raise
                        raise mapped from None
                else:
                    raise mapped from None
            conn._nbia_used = True  # type: ignore[attr-defined]
            if response.status in _REDIRECTS:
                location = response.getheader("Location") or ""
                nxt = urljoin(current, location)
                self._drop(origin)
                if not location or not same_origin_or_upgrade(current, nxt):
                    raise ApiError(f"{what}: the server redirected to another host "
                                   f"({quote(str(Origin.of(nxt)), 80)}); not followed",
                                   status=response.status)
                current = nxt
                continue
            stream = SeriesStream(response, what, floor)
            complete = False
            try:
                yield stream
                complete = response.isclosed()  # read to the end: reusable
            finally:
                floor_ref[0] = None
                if not complete or response.will_close:
                    self._drop(origin)
            return
        raise ApiError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _send(self, conn: http.client.HTTPConnection, target: str,
              headers: Mapping[str, str]) -> http.client.HTTPResponse:
        if conn.sock is None:
            conn.timeout = self.connect_timeout
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self.timeout)
        conn.request("GET", target, headers=dict(headers))
        return conn.getresponse()
