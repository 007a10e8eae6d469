"""HTTP for the NBIA client: one small transport over the standard library's ``http.client``.

Chosen by measurement (``benchmarks/transports.py``, BENCHMARKS.md): series zips are the
bytes that matter, and httpx parses chunked bodies in Python (h11), which on two cores
costs a third of a download's CPU and serialises many streams on the GIL. ``http.client``
hands out a quarter megabyte per ``read`` with one C-level ``readinto`` per server
chunk: 16 concurrent streams run about as fast as 2. API calls (metadata, queries,
login) use the same transport, so one set of rules covers every request:

* **Connections**: one keep-alive connection per thread and origin; TLS verified by
  default.
* **Proxies**: ``--proxy``/``NBIA_PROXY`` (or the config file's ``proxy``) first, else
  the environment's ``HTTPS_PROXY``/``HTTP_PROXY``; ``NO_PROXY`` applies to both.
  ``http://`` proxies speak HTTP to us (absolute-form requests for http origins, a
  ``CONNECT`` tunnel for https ones); ``https://`` (TLS to the proxy, then ``CONNECT``),
  ``socks5://`` (names resolved here) and ``socks5h://`` (names resolved by the proxy)
  open the socket through python-socks, and ``http.client`` speaks over it as over any
  socket: the floor, redirects and TLS rules stay the same. A proxy's password is a
  secret like the user's (redacted from every message and log), and the chosen proxy
  reaches child processes (worker processes, the web view's children) through the
  environment, never their command line.
* **Redirects** are followed only within one origin (scheme, host, port; an upgrade from
  http to https on the same host is allowed). A redirect elsewhere is an error and is
  never followed, so a password or token cannot be carried to another host.
* **Progress floor**: a transfer must move :data:`FLOOR_RATE` bytes a second (2 KiB/s)
  on average over every window of ``timeout`` seconds, counted on every ``recv``. A
  per-read timeout alone lets a server that trickles a byte a second hold a worker
  forever, and a fixed number of bytes per window lets it trickle slower the longer the
  timeout (1 KB per 600 s). A rate does not: 1,100 bytes a second is cut at any timeout,
  within one or two windows, while a slow honest link (256 kbit/s shared by three
  streams, about 10.7 kB/s each) still moves five times the floor. The first window
  starts at the first byte, not at the request: a server may think for up to
  ``timeout`` (the read timeout) before it answers, then stream, without that silence
  counting against its rate. Only the server's time counts: while we are not reading
  (inflating and writing a chunk, waiting for a core, or held by a pause of the run,
  in a thread or a worker process) the window's clock stands still.
* **Bounded answers**: an API answer larger than :data:`MAX_ANSWER_BYTES` is refused.
* **Errors** come out as our own (:class:`~nbia_retriever.errors.NetworkError`,
  :class:`~nbia_retriever.errors.TlsError`, :class:`~nbia_retriever.errors.ApiError`):
  nothing above this module handles a socket, ssl or http.client exception.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import io
import ipaddress
import json as json_module
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlencode, urljoin, urlsplit

from .._version import __version__
from ..errors import ApiError, NetworkError, TlsError, UsageError
from ..untrusted import SECRETS, ascii_host, quote

USER_AGENT = f"nbia-retriever/{__version__}"
#: Requests and their statuses at DEBUG (URLs only: secrets travel in headers and bodies).
log = logging.getLogger("nbia_retriever.http")
#: Largest metadata/query answer we accept (a v4 batch of 10,000 series is ~5 MB; the
#: biggest collection's getSeries is ~100 MB).
MAX_ANSWER_BYTES = 512 * 1024 * 1024
#: A transfer that moves less than this many bytes a second, averaged over a window of
#: ``timeout`` seconds, is abandoned (the module docstring says why a rate).
FLOOR_RATE = 2048
#: Bytes handed to the zip reader per read of a series stream.
READ_SIZE = 256 << 10
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
        host = (parts.hostname or "").lower()
        with contextlib.suppress(ValueError):  # one that cannot be is refused before
            host = ascii_host(host)  # the xn-- form: what is shown, compared, connected to
        return cls(scheme, host, port or (443 if scheme == "https" else 80))

    @property
    def label(self) -> str:
        """How messages name it: the host (IPv6 in brackets), ``:port`` when not the
        scheme's default."""
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.label}"


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
    """At least ``rate`` bytes a second over each ``window`` seconds, or :class:`NetworkError`.

    Fed from inside the read loop (every ``recv``), so a trickling server is caught
    while it trickles, not after its next full read. A window is checked at the first
    ``recv`` that ends it, against the time that really passed (a read may return late,
    up to one read timeout): a server cannot send its bytes just after each check and
    average half the floor. The first window opens with the first bytes received.

    ``since`` (when the ``recv`` began) leaves out of the window the time since the
    previous ``recv`` ended: that time was ours (processing, a pause), not the server's.
    """

    __slots__ = ("_clock", "_last", "_mark", "_rate", "_start", "_what", "_window", "total")

    def __init__(self, window: float, what: str, *, rate: int = FLOOR_RATE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._rate = rate
        self._clock = clock
        self._what = what
        self._start: float | None = None
        self._last = 0.0
        self._mark = 0
        self.total = 0

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def add(self, n: int, since: float | None = None) -> None:
        self.total += n
        now = self._clock()
        start = self._start
        last, self._last = self._last, now
        if start is None:
            if n:
                self._start = now
            return
        if since is not None and since > last:
            start = self._start = start + (since - last)
        elapsed = now - start
        if elapsed >= self._window:
            if self.total - self._mark < self._rate * elapsed:
                raise NetworkError(
                    f"{self._what}: timed out ({self.total - self._mark:,} bytes in "
                    f"{elapsed:.0f} s, under {self._rate // 1024} KiB/s: the server is "
                    "sending too slowly)", timeout=True)
            self._start, self._mark = now, self.total


# ----------------------------------------------------------------------------- errors


def map_error(exc: BaseException, what: str) -> ApiError | None:
    """An ``http.client``/socket/ssl exception as ours; None for anything else."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        return TlsError(f"{what}: the TLS certificate of the server cannot be verified "
                        f"({quote(reason, 120)}); use --insecure only if you trust this "
                        "server")
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


# ----------------------------------------------------------------------------- responses


class _CountingSocketIO(io.RawIOBase):
    """The socket seen as a raw stream, every ``recv`` counted against the floor."""

    def __init__(self, sock: socket.socket, floor: ProgressFloor | None) -> None:
        super().__init__()
        self._sock = sock
        self.floor = floor
        # A reader of the socket, as socket.makefile()'s is: the descriptor stays open
        # until this reader closes. http.client closes the connection as soon as an
        # answer says "Connection: close" (moto, HTTP/1.0 proxies), handing the socket
        # to the response; without the reference every read after the first buffer
        # failed with EBADF.
        # (TLS inside a proxy's TLS: python-socks' wrapper; the count is its socket's.)
        self._owner: Any = getattr(sock, "socket", sock)
        self._owner._io_refs += 1

    def close(self) -> None:
        if not self.closed:
            self._owner._decref_socketios()
        super().close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        floor = self.floor
        if floor is None:
            return self._sock.recv_into(buffer)
        since = floor.clock()
        n = self._sock.recv_into(buffer)
        floor.add(n, since)
        return n


class _Response(http.client.HTTPResponse):
    """``HTTPResponse`` reading through :class:`_CountingSocketIO` with a big buffer."""

    def __init__(self, sock: socket.socket, *args: Any, floor_ref: list[ProgressFloor | None],
                 **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the plain makefile() reader; ours replaces it
        self.raw_io = _CountingSocketIO(sock, floor_ref[0])
        self.fp = io.BufferedReader(self.raw_io, buffer_size=256 * 1024)


class Response:
    """An open answer: ``status``, :meth:`header`, and the body by :meth:`chunks`."""

    def __init__(self, response: http.client.HTTPResponse, what: str,
                 floor: ProgressFloor, url: str) -> None:
        self._response = response
        self._what = what
        self._floor = floor
        self.url = url
        self.status = response.status
        self.content_type = (response.getheader("Content-Type") or "").lower()
        raw = getattr(response, "raw_io", None)
        self._sock: socket.socket | None = getattr(raw, "_sock", None)

    def abort(self) -> None:
        """Make a read blocked in another thread return now (cancel during a stall):
        the connection is shut down, never reused."""
        if self._sock is not None:
            # TLS inside a proxy's TLS: the socket is python-socks' wrapper; shut its own.
            sock = getattr(self._sock, "socket", self._sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def header(self, name: str) -> str | None:
        return self._response.getheader(name)

    @property
    def headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self._response.getheaders()}

    @property
    def bytes_received(self) -> int:
        return self._floor.total

    def chunks(self, size: int = READ_SIZE, *, partial: bool = False) -> Iterator[bytes]:
        """The body, ``size`` bytes at a time; ``partial``: whatever has arrived, up to
        ``size`` (``read1``), so that a slow link's bytes are written, counted and
        resumable as they come (a whole-file transfer: a Ctrl-C keeps them) rather
        than after each full ``size``."""
        read = self._response.read1 if partial else self._response.read
        try:
            while True:
                data = read(size)
                if not data:
                    return
                yield data
        except GeneratorExit:
            raise
        except BaseException as exc:
            mapped = map_error(exc, self._what)
            if mapped is None:
                raise
            raise mapped from None

    def read_text(self, limit: int = 1 << 16) -> str:
        """At most ``limit`` bytes of the body as text (error pages)."""
        try:
            return self._response.read(limit).decode("utf-8", "replace")
        except Exception:
            return ""


#: A series zip being streamed (what the engine's Source hands out).
SeriesStream = Response


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


# ----------------------------------------------------------------------------- proxies


#: The proxy chosen for this process (``--proxy``, the config file's ``proxy``, the Python
#: API's ``proxy=``): an environment variable, because that is how it reaches the child
#: processes that download too (worker processes, the web view's children) without ever
#: being on a command line, where any user of the machine could read its password.
PROXY_ENV = "NBIA_PROXY"
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
_DEFAULT_PORTS = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}


@dataclass(frozen=True)
class _Proxy:
    scheme: str
    host: str
    port: int
    headers: dict[str, str]
    username: str | None = None
    password: str | None = None

    @property
    def label(self) -> str:
        """How messages name it: scheme, host and port, never its user or password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def tunnels(self) -> bool:
        """Whether python-socks opens the socket (every scheme but plain ``http``)."""
        return self.scheme != "http"


def without_userinfo(url: str) -> str:
    """``url`` without its ``user:password@`` part: how a proxy URL is ever shown. Up to
    the last ``@``, not the first ``/``: a password with an unencoded ``/`` in it
    (which makes the URL malformed) goes too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def parse_proxy(url: str) -> _Proxy:
    """A proxy URL (``http``, ``https``, ``socks5``, ``socks5h``; no scheme means
    ``http``, as curl reads it) as a :class:`_Proxy`, its password made a secret before
    anything can print it; :class:`UsageError` naming it (without its password) if it
    is not one."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    password = unquote(parts.password) if parts.password is not None else None
    # First, before any message: a proxy or server that echoes it never gets it shown
    # (and what a malformed URL holds where a password goes, as typed and decoded).
    typed = text.partition("://")[2].rpartition("@")[0].partition(":")[2]
    SECRETS.add_password(password or None, typed or None, unquote(typed) or None)
    shown = without_userinfo(text)
    scheme = parts.scheme.lower()
    if scheme not in PROXY_SCHEMES:
        raise UsageError(f"proxy {quote(shown, 120)}: use an http://, https://, socks5:// or "
                         "socks5h:// URL")
    try:
        port = parts.port
        host = ascii_host(parts.hostname or "")
    except ValueError:
        raise UsageError(f"proxy {quote(shown, 120)}: not a host and port") from None
    if not host or (parts.path not in ("", "/")) or parts.query:
        raise UsageError(f"proxy {quote(shown, 120)}: give scheme://[user:password@]host:port "
                         "only")
    headers: dict[str, str] = {}
    username = unquote(parts.username) if parts.username is not None else None
    if username is not None and scheme == "http":
        token = f"{username}:{password or ''}".encode()
        basic = base64.b64encode(token).decode()
        headers["Proxy-Authorization"] = "Basic " + basic
        SECRETS.add(basic)
    return _Proxy(scheme, host, port or _DEFAULT_PORTS[scheme], headers, username, password)


def use_proxy(url: str | None) -> None:
    """Send this process's requests, and its children's, through ``url`` (checked first:
    :class:`UsageError`); None or empty leaves things as they are. The setting is
    process-wide (:data:`PROXY_ENV`): every transport, the IDC S3 client's too, reads
    it when it opens a connection."""
    if not url or not url.strip():
        return
    parse_proxy(url)
    os.environ[PROXY_ENV] = url.strip()


def _proxy_for(origin: Origin) -> _Proxy | None:
    """The proxy for ``origin``: :data:`PROXY_ENV` (``--proxy``), else the environment's
    (HTTPS_PROXY, HTTP_PROXY); none for a host NO_PROXY names."""
    proxies = urllib.request.getproxies_environment()
    chosen = os.environ.get(PROXY_ENV, "").strip()
    url = chosen or proxies.get(origin.scheme)
    if not url or urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
            origin.host, proxies):
        return None
    try:
        return parse_proxy(url)
    except UsageError:
        if chosen:  # ours is checked where it is set; one set by hand is still an error
            raise
        return None  # the environment's, as before: an unusable one is not used


class _TunnelConnection(http.client.HTTPConnection):
    """A connection to ``origin`` whose socket python-socks opens through a SOCKS5 proxy or
    a ``CONNECT`` tunnel in TLS to an ``https://`` proxy; TLS to the origin (for https)
    over it. Everything above the socket is ``http.client``'s, as without a proxy."""

    def __init__(self, origin: Origin, proxy: _Proxy, *, timeout: float,
                 context: Callable[[], ssl.SSLContext]) -> None:
        super().__init__(origin.host, origin.port, timeout=timeout)
        self._origin = origin
        self._proxy = proxy
        self._make_context = context

    def connect(self) -> None:
        from python_socks import ProxyError, ProxyType  # only when a proxy is used
        from python_socks.sync.v2 import Proxy

        proxy = self._proxy
        kind = ProxyType.HTTP if proxy.scheme == "https" else ProxyType.SOCKS5
        tunnel = Proxy(kind, proxy.host, proxy.port, username=proxy.username,
                       password=proxy.password, rdns=proxy.scheme == "socks5h",
                       proxy_ssl=self._make_context() if proxy.scheme == "https" else None)
        dest_tls = self._make_context() if self._origin.scheme == "https" else None
        try:
            stream = tunnel.connect(self._origin.host, self._origin.port, dest_ssl=dest_tls,
                                    timeout=self.timeout)
        except ProxyError as exc:  # a refusal (auth, rules): ours, naming the proxy only
            raise ConnectionError(f"the proxy {proxy.label} refused the connection to "
                                  f"{self._origin.label}: {exc}") from None
        self.sock = stream.socket


def _named_proxy(exc: BaseException, conn: http.client.HTTPConnection) -> BaseException:
    """http.client's "Tunnel connection failed: 407 ..." as a line that names the proxy
    (not the server, which was never reached) and, for a 407, what to check."""
    proxy: _Proxy | None = getattr(conn, "_nbia_proxy", None)
    text = str(exc)
    if proxy is None or not isinstance(exc, OSError) or \
            not text.startswith("Tunnel connection failed"):
        return exc
    status = text.partition(":")[2].strip()
    hint = " (check the user and password in the proxy URL)" if status.startswith("407") else ""
    return ConnectionError(f"the proxy {proxy.label} refused the tunnel: {quote(status, 80)}"
                           + hint)


# ----------------------------------------------------------------------------- transport


#: Query parameters that hold a credential: a pre-signed URL's signature and session
#: token (S3 ``X-Amz-Signature``/``X-Amz-Security-Token``/``X-Amz-Credential``, GCS
#: ``X-Goog-Signature``, Azure ``sig``, CloudFront ``Signature``/``Key-Pair-Id``).
_SECRET_PARAM = re.compile(r"([?&](?:[^=&#]*(?:signature|token|credential|key)[^=&#]*|sig)=)"
                           r"[^&#]*", re.I)


def _loggable(url: str) -> str:
    """A URL for the log: no ``user:password@`` part, and no value of a parameter that
    is a credential (a signed URL lets anyone holding it fetch the object, for up to
    an hour); its host, path and other parameters stay for debugging."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        url = url.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)
    return _SECRET_PARAM.sub(r"\1***", url) if "?" in url else url



class Transport:
    """Requests over ``http.client`` with the rules of the module docstring.

    Thread-safe: each thread keeps its own keep-alive connection per origin.
    """

    def __init__(self, *, timeout: float, connect_timeout: float = 30.0,
                 verify: bool = True) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.verify = verify
        self._context_made: ssl.SSLContext | None = None
        self._local = threading.local()
        self._all: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()

    @property
    def _context(self) -> ssl.SSLContext:
        """Made at the first https connection: loading the CA store costs ~20 ms, which
        a loopback or plain-http run (and every worker process) need not pay."""
        with self._lock:
            if self._context_made is None:
                context = ssl.create_default_context()
                if not self.verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                self._context_made = context
            return self._context_made

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
            proxy = _proxy_for(origin)
            host, port = (proxy.host, proxy.port) if proxy else (origin.host, origin.port)
            conn: http.client.HTTPConnection
            if proxy is not None and proxy.tunnels:
                conn = _TunnelConnection(origin, proxy, timeout=self.connect_timeout,
                                         context=lambda: self._context)
            elif origin.scheme == "https":
                conn = http.client.HTTPSConnection(host, port, timeout=self.connect_timeout,
                                                   context=self._context)
                if proxy is not None:
                    conn.set_tunnel(origin.host, origin.port, headers=proxy.headers)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
            conn.response_class = functools.partial(_Response, floor_ref=floor_ref)  # type: ignore[assignment]
            conn._nbia_proxy = proxy  # type: ignore[attr-defined]
            # An http origin through an http proxy: requests name the whole URL.
            conn._nbia_absolute = (  # type: ignore[attr-defined]
                proxy is not None and not proxy.tunnels and origin.scheme == "http")
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

    def _send(self, origin: Origin, method: str, target: str, body: bytes | None,
              headers: Mapping[str, str], floor: ProgressFloor) -> http.client.HTTPResponse:
        """One request on this thread's connection; a kept-alive connection the server
        closed meanwhile is replaced once, at once."""
        for fresh in (False, True):
            conn, floor_ref = self._conn(origin)
            floor_ref[0] = floor
            reused = getattr(conn, "_nbia_used", False)
            try:
                if conn.sock is None:
                    conn.connect()
                    assert conn.sock is not None
                    conn.sock.settimeout(self.timeout)
                conn.request(method, target, body=body, headers=dict(headers))
                response = conn.getresponse()
                conn._nbia_used = True  # type: ignore[attr-defined]
                return response
            except BaseException as exc:
                self._drop(origin)
                stale = isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError |
                                   BrokenPipeError)
                if fresh or not (stale and reused):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.contextmanager
    def open(self, method: str, url: str, *, what: str,
             params: Mapping[str, str] | None = None, data: Mapping[str, str] | None = None,
             headers: Mapping[str, str] | None = None,
             redirects: bool = True, json: object = None) -> Iterator[Response]:
        """Send a request and yield the answer once its status line and headers are in.

        ``data`` is sent as a form, ``json`` (any JSON value but None) as a JSON body
        (Gen3's token request takes only JSON).

        Same-origin redirects are followed when ``redirects`` (a POST body is re-sent
        only for 307/308, as the standard says); a redirect to another origin raises.
        The connection goes back to this thread's pool only when the body was read to
        its end; anything else (an error, a caller that stopped early) closes it.
        """
        current = url + ("?" + urlencode(params) if params else "")
        body = urlencode(data).encode() if data is not None else None
        content_type = "application/x-www-form-urlencoded"
        if json is not None:
            body, content_type = json_module.dumps(json).encode(), "application/json"
        for _ in range(MAX_REDIRECTS + 1):
            origin = Origin.of(current)
            floor = ProgressFloor(self.timeout, what)
            parts = urlsplit(current)
            target = parts.path + ("?" + parts.query if parts.query else "")
            conn, _ = self._conn(origin)
            if getattr(conn, "_nbia_absolute", False):
                target = current
            request_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                               **(headers or {})}
            if body is not None:
                request_headers["Content-Type"] = content_type
            try:
                raw = self._send(origin, method, target, body, request_headers, floor)
            except BaseException as exc:
                mapped = map_error(_named_proxy(exc, conn), what)
                log.debug("%s %s failed: %s", method, _loggable(current), mapped or exc)
                if mapped is None:
                    raise
                raise mapped from None
            log.debug("%s %s -> %s", method, _loggable(current), raw.status)
            if raw.status in _REDIRECTS:
                location = raw.getheader("Location") or ""
                nxt = urljoin(current, location)
                self._drop(origin)
                if not redirects or not location:
                    raise ApiError(f"{what}: the server answered a redirect (HTTP "
                                   f"{raw.status}); not followed", status=raw.status)
                if not same_origin_or_upgrade(current, nxt):
                    raise ApiError(f"{what}: the server redirected to another host "
                                   f"({quote(str(Origin.of(nxt)), 80)}); not followed",
                                   status=raw.status)
                current = nxt
                if raw.status == 303 or (raw.status in (301, 302) and method == "POST"):
                    method, body = "GET", None
                continue
            response = Response(raw, what, floor, current)
            complete = False
            try:
                yield response
                complete = raw.isclosed()  # read to the end: reusable
            finally:
                self._conn(origin)[1][0] = None
                if not complete or raw.will_close:
                    self._drop(origin)
            return
        raise ApiError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def call(self, method: str, url: str, *, what: str, params: Mapping[str, str] | None = None,
             data: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None,
             redirects: bool = True, limit: int = MAX_ANSWER_BYTES,
             json: object = None) -> Answer:
        """One request, the whole answer read within the floor and ``limit``."""
        with self.open(method, url, what=what, params=params, data=data, headers=headers,
                       redirects=redirects, json=json) as response:
            body = bytearray()
            for chunk in response.chunks():
                body += chunk
                if len(body) > limit:
                    raise ApiError(f"{what}: the answer exceeds {limit >> 20} MiB")
            return Answer(response.status, response.headers, bytes(body), response.url)
