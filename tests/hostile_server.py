"""A tiny hostile NBIA server for the reliability tests: it serves what we tell it to.

The reference server (``nbia_retriever.server``) is faithful and breaks only in the ways
the real NBIA server breaks. A client must also survive servers that are wrong or
malicious: zip entries named ``../x``, zip bombs, HTML pages with status 200, bodies
that never end, metadata full of path tricks and control characters. This module serves
exactly those, per series, from a mutable registry, on 127.0.0.1 in a background thread
(like the reference server's runner). It also runs any aiohttp app over TLS with a
throw-away self-signed certificate, for the certificate-verification tests.

Only the endpoints a download touches exist: v1/v2 ``getSeriesMetaData``, the two image
endpoints and the OAuth token endpoint; v4 answers 404 so ``--api auto`` falls back to
v1. Knobs for the trust tests: ``token_redirect`` / ``image_redirect`` answer with a
redirect to another origin; ``token_posts`` and ``auth_headers`` record what credentials
reached this server; :func:`trickle` bodies send a byte at a time.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import ssl
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from aiohttp import web

from nbia_retriever.server.runner import AppThread
from nbia_retriever.server.synth import SynthSeries
from nbia_retriever.server.zipwriter import ZipEntry, deflated_entry, stream_zip

API_PREFIX = "/nbia-api/services"
DOWNLOAD_PATH = "/nbia-download/servlet/DownloadServlet"
ZIP_TYPE = "application/x-zip-compressed"
#: No hostile body is ever longer than this: load tests must stop by themselves.
MAX_ENDLESS_BYTES = 2 * 1024**3

Body = bytes | Callable[[], Iterable[bytes]] | Callable[[], AsyncIterator[bytes]]


@dataclass
class Crafted:
    """What the server answers for one series: its metadata record and its image body.

    ``metadata_body`` replaces the JSON metadata answer (bytes or a body function), for
    hostile metadata (nested JSON, a trickle).
    """

    metadata: dict[str, str]
    body: Body = b""
    status: int = 200
    content_type: str = ZIP_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    metadata_body: Body | None = None


def v1_record(uid: str, *, collection: str = "Hostile", patient: str = "P-1",
              study_uid: str = "1.2.3.4", images: int | None = 1, size: int | None = 1000,
              **extra: str) -> dict[str, str]:
    """A v1 ``getSeriesMetaData`` record; ``None`` leaves a field out."""
    record = {
        "Series UID": uid, "Collection": collection, "Subject ID": patient,
        "Study UID": study_uid, "Study Date": "01-02-2003", "Study Description": "study",
        "Series Description": "series", "Series Number": "1.000000", "Modality": "CT",
        "Manufacturer": "ACME",
    }
    if images is not None:
        record["Number of Images"] = str(images)
    if size is not None:
        record["File Size"] = str(size)
    record.update(extra)
    return record


def files_of(series: SynthSeries) -> list[tuple[str, bytes]]:
    """A synthetic series' images as the server names its zip entries."""
    return [(f"{i:08d}.dcm", p.read_bytes()) for i, p in enumerate(series.files, start=1)]


def record(series: SynthSeries, **kw: object) -> dict[str, str]:
    """The v1 metadata record of a synthetic series (``kw`` as for :func:`v1_record`)."""
    kw.setdefault("images", series.images)
    kw.setdefault("size", series.nbytes)
    return v1_record(series.series_uid, **kw)  # type: ignore[arg-type]


def zip_bytes(entries: Sequence[ZipEntry]) -> bytes:
    """A whole zip, streamed like the NBIA server's (DEFLATED, data descriptors)."""
    return b"".join(stream_zip(list(entries)))


def series_zip(files: Sequence[tuple[str, bytes]], *, md5_names: Sequence[str] | None = None,
               license_text: bytes | None = b"license",
               unlisted: Sequence[tuple[str, bytes]] = ()) -> bytes:
    """A series zip: LICENSE, ``files`` and an ``md5hashes.csv`` that vouches for them.

    ``md5_names`` overrides the names written into ``md5hashes.csv`` (default: each file's
    basename, as the engine matches them), so a hostile name can be made to pass the MD5
    check and reach the publishing step. ``unlisted`` entries (annotations, in NBIA's
    terms) follow the files without an MD5 line.
    """
    entries: list[ZipEntry] = []
    if license_text is not None:
        entries.append(deflated_entry("LICENSE", license_text))
    entries += [deflated_entry(name, data) for name, data in files]
    entries += [deflated_entry(name, data) for name, data in unlisted]
    names = md5_names if md5_names is not None else [
        name.replace("\\", "/").rsplit("/", 1)[-1] for name, _ in files
    ]
    rows = "".join(f"{n},{hashlib.md5(d).hexdigest()}\n"
                   for n, (_, d) in zip(names, files, strict=True))
    entries.append(deflated_entry("md5hashes.csv", ("Filename,MD5Hash\n" + rows).encode()))
    return zip_bytes(entries)


def local_header(name: str, *, method: int = 8, flags: int = 0x0008) -> bytes:
    """A local file header with zero CRC and sizes (they would follow in a descriptor)."""
    import struct

    raw = name.encode()
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0, 0, 0, 0,
                       len(raw), 0) + raw


def endless_deflate(name: str = "00000001.dcm", limit: int = MAX_ENDLESS_BYTES
                    ) -> Callable[[], Iterator[bytes]]:
    """A body that starts a DEFLATED entry and never finishes it (zeros, ~1000:1)."""

    def body() -> Iterator[bytes]:
        yield local_header(name)
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        block = bytes(1 << 20)
        sent = 0
        while sent < limit:
            data = deflate.compress(block) + deflate.flush(zlib.Z_SYNC_FLUSH)
            sent += len(data)
            yield data

    return body


def trickle(data: bytes, *, every: float = 0.25, step: int = 1, head: int = 0
            ) -> Callable[[], AsyncIterator[bytes]]:
    """A body that sends ``head`` bytes at once, then ``step`` bytes every ``every``
    seconds: a server too slow to be useful, yet never silent long enough for a plain
    read timeout. It ends (the whole ``data``) only if the client waits for all of it."""

    async def body() -> AsyncIterator[bytes]:
        import asyncio

        if head:
            yield data[:head]
        for start in range(head, len(data), step):
            await asyncio.sleep(every)
            yield data[start:start + step]

    return body


def endless_garbage(limit: int = MAX_ENDLESS_BYTES) -> Callable[[], Iterator[bytes]]:
    """A body of zeros that never ends (well, ends at ``limit``)."""

    def body() -> Iterator[bytes]:
        block = bytes(64 * 1024)
        sent = 0
        while sent < limit:
            sent += len(block)
            yield block

    return body


class HostileServer:
    """Serves :class:`Crafted` series (``server.series[uid] = Crafted(...)``).

    ``requests`` logs (method, path, query) of every request, for tests that check what
    the client sent.
    """

    def __init__(self, series: dict[str, Crafted] | None = None, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.series: dict[str, Crafted] = dict(series or {})
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        #: Body bytes written per series UID, over all its requests.
        self.sent: dict[str, int] = {}
        #: Every form posted to the token endpoint (what a password leak would look like).
        self.token_posts: list[dict[str, str]] = []
        #: Every Authorization header received.
        self.auth_headers: list[str] = []
        #: Redirect the token request / image requests here (another origin).
        self.token_redirect: str | None = None
        self.image_redirect: str | None = None
        #: The access token handed out (tests check where it travels).
        self.issued_token = "hostile-access-token-" + hashlib.sha1(
            str(id(self)).encode()).hexdigest()
        self._lock = threading.Lock()
        self._runner = AppThread(self.app(), shutdown_timeout=0.2, name="hostile-server",
                                 ssl_context=ssl_context)

    # addresses
    @property
    def url(self) -> str:
        return self._runner.url

    @property
    def api_url(self) -> str:
        return self.url + API_PREFIX

    @property
    def download_url(self) -> str:
        return self.url + DOWNLOAD_PATH

    def __enter__(self) -> HostileServer:
        self._runner.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._runner.stop()

    def image_requests(self, uid: str) -> int:
        with self._lock:
            return sum(1 for _, path, q in self.requests
                       if "getImage" in path and q.get("SeriesInstanceUID") == uid)

    # the app
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", API_PREFIX + "/{version}/{endpoint}", self._dispatch)
        app.router.add_route("*", "/nbia-api/oauth/token", self._token)
        app.router.add_route("*", "/{tail:.*}", self._anything)
        return app

    def _log(self, request: web.Request) -> dict[str, str]:
        query = {k: request.query.getone(k) for k in request.query}
        with self._lock:
            self.requests.append((request.method, request.path, query))
            if "Authorization" in request.headers:
                self.auth_headers.append(request.headers["Authorization"])
        return query

    async def _anything(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        if request.can_read_body:
            form = await request.post()
            with self._lock:
                self.token_posts.append({k: str(v) for k, v in form.items()})
        return web.Response(status=404, text="Not Found")

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        form = await request.post()
        with self._lock:
            self.token_posts.append({k: str(v) for k, v in form.items()})
        if self.token_redirect:
            raise web.HTTPTemporaryRedirect(self.token_redirect)  # 307: re-POST the body
        return web.Response(text=json.dumps({
            "access_token": self.issued_token, "token_type": "bearer",
            "refresh_token": self.issued_token + "-refresh", "expires_in": 7199}),
            content_type="application/json")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        query = self._log(request)
        version, endpoint = request.match_info["version"], request.match_info["endpoint"]
        if version not in ("v1", "v2"):
            return web.Response(status=404, text="Not Found")
        crafted = self.series.get(query.get("SeriesInstanceUID", ""))
        if endpoint == "getCollectionValues":
            names = sorted({c.metadata.get("Collection", "") for c in self.series.values()})
            return web.Response(text=json.dumps([{"Collection": n} for n in names]),
                                content_type="application/json")
        if endpoint == "getSeries":
            rows = [{"SeriesInstanceUID": uid, "Collection": c.metadata.get("Collection", ""),
                     "PatientID": c.metadata.get("Subject ID", ""),
                     "Modality": c.metadata.get("Modality", ""),
                     "SeriesDescription": c.metadata.get("Series Description", ""),
                     "ImageCount": int(c.metadata.get("Number of Images", "0") or 0)}
                    for uid, c in self.series.items()
                    if query.get("Collection") in (None, c.metadata.get("Collection"))]
            return web.Response(text=json.dumps(rows), content_type="application/json")
        if endpoint == "getSeriesMetaData":
            if crafted is None:
                return web.Response(status=204)
            if crafted.metadata_body is not None:
                return await self._stream(request, crafted.metadata_body,
                                          "application/json", 200, {}, None)
            return web.Response(text=json.dumps([crafted.metadata]),
                                content_type="application/json")
        if endpoint in ("getImage", "getImageWithMD5Hash"):
            if crafted is None:
                return web.Response(status=400, text="not in public domain")
            if self.image_redirect:
                raise web.HTTPFound(self.image_redirect + request.path_qs)
            return await self._image(request, crafted, query["SeriesInstanceUID"])
        return web.Response(status=404, text="Not Found")

    async def _image(self, request: web.Request, crafted: Crafted, uid: str
                     ) -> web.StreamResponse:
        return await self._stream(request, crafted.body, crafted.content_type,
                                  crafted.status, crafted.headers, uid)

    async def _stream(self, request: web.Request, body: Body, content_type: str,
                      status: int, headers: dict[str, str], uid: str | None
                      ) -> web.StreamResponse:
        response = web.StreamResponse(status=status,
                                      headers={"Content-Type": content_type, **headers})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunks = [body] if isinstance(body, bytes) else body()
        sent = 0
        try:
            if hasattr(chunks, "__aiter__"):
                async for chunk in chunks:  # type: ignore[union-attr]
                    await response.write(chunk)
                    sent += len(chunk)
            else:
                for chunk in chunks:  # type: ignore[union-attr]
                    await response.write(chunk)
                    sent += len(chunk)
                    if sent > MAX_ENDLESS_BYTES:
                        break
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client hung up: exactly what an endless body should provoke
        finally:
            if uid is not None:
                with self._lock:
                    self.sent[uid] = self.sent.get(uid, 0) + sent
        return response


def self_signed_context(folder: Path) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context
