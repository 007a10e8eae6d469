"""A tiny hostile NBIA server for the reliability tests: it serves what we tell it to.

The reference server (``nbia_retriever.server``) is faithful and breaks only in the ways
the real NBIA server breaks. A client must also survive servers that are wrong or
malicious: zip entries named ``../x``, zip bombs, HTML pages with status 200, bodies
that never end, metadata full of path tricks and control characters. This module serves
exactly those, per series, from a mutable registry, on 127.0.0.1 in a background thread
(like the reference server's runner). It also runs any aiohttp app over TLS with a
throw-away self-signed certificate, for the certificate-verification tests.

Only the endpoints a download touches exist: v1 ``getSeriesMetaData`` and the two image
endpoints; v4 answers 404 so ``--api auto`` falls back to v1.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import ssl
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from aiohttp import web

from nbia_retriever.server.runner import AppThread
from nbia_retriever.server.zipwriter import ZipEntry, deflated_entry, stream_zip

API_PREFIX = "/nbia-api/services"
DOWNLOAD_PATH = "/nbia-download/servlet/DownloadServlet"
ZIP_TYPE = "application/x-zip-compressed"
#: No hostile body is ever longer than this: load tests must stop by themselves.
MAX_ENDLESS_BYTES = 2 * 1024**3

Body = bytes | Callable[[], Iterable[bytes]]


@dataclass
class Crafted:
    """What the server answers for one series: its metadata record and its image body."""

    metadata: dict[str, str]
    body: Body = b""
    status: int = 200
    content_type: str = ZIP_TYPE
    headers: dict[str, str] = field(default_factory=dict)


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

    def __init__(self, series: dict[str, Crafted] | None = None) -> None:
        self.series: dict[str, Crafted] = dict(series or {})
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        #: Body bytes written per series UID, over all its requests.
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()
        self._runner = AppThread(self.app(), shutdown_timeout=0.2, name="hostile-server")

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
        return app

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        query = {k: request.query.getone(k) for k in request.query}
        with self._lock:
            self.requests.append((request.method, request.path, query))
        version, endpoint = request.match_info["version"], request.match_info["endpoint"]
        if version != "v1":
            return web.Response(status=404, text="Not Found")
        crafted = self.series.get(query.get("SeriesInstanceUID", ""))
        if endpoint == "getSeriesMetaData":
            if crafted is None:
                return web.Response(status=204)
            return web.Response(text=json.dumps([crafted.metadata]),
                                content_type="application/json")
        if endpoint in ("getImage", "getImageWithMD5Hash"):
            if crafted is None:
                return web.Response(status=400, text="not in public domain")
            return await self._image(request, crafted, query["SeriesInstanceUID"])
        return web.Response(status=404, text="Not Found")

    async def _image(self, request: web.Request, crafted: Crafted, uid: str
                     ) -> web.StreamResponse:
        response = web.StreamResponse(status=crafted.status,
                                      headers={"Content-Type": crafted.content_type,
                                               **crafted.headers})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunks: Iterable[bytes] = (
            [crafted.body] if isinstance(crafted.body, bytes) else crafted.body()
        )
        sent = 0
        try:
            for chunk in chunks:
                await response.write(chunk)
                sent += len(chunk)
                if sent > MAX_ENDLESS_BYTES:
                    break
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client hung up: exactly what an endless body should provoke
        finally:
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
