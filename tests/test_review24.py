"""Issue 24 reviewed by a hostile user: DRS/PathDB attacks over real HTTP on loopback.

Every fault comes from a server: :class:`Hostile`, a small threaded ``http.server`` of
this module whose routes write exactly the bytes an attacker (or a broken storage host)
would, or the Gen3/PathDB emulator (``tests/gen3_fixtures.py``). What is checked is what
the user is promised (issue 24, Deliver 1-5): secrets only where the user chose, nothing
written outside the root or through a planted link, no hang on a planted FIFO, nothing
published that is not the file, one clear line per refusal.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nbia_retriever.api import Transport
from nbia_retriever.errors import ApiError, NbiaError, NetworkError
from nbia_retriever.files.gen3 import Gen3Credentials
from nbia_retriever.files.source import FileSource
from nbia_retriever.files.transfer import FetchedFile, fetch_to_spool, part_paths
from nbia_retriever.models import FileItem
from reliability_helpers import run_cli

if TYPE_CHECKING:
    from gen3_fixtures import Gen3Archive
    from nbia_retriever.server.gen3 import Gen3Server

Route = Callable[["_Handler"], None]
BODY = bytes(range(256)) * 4096 * 4  # 4 MiB: several reads
BODY_MD5 = hashlib.md5(BODY).hexdigest()
API_KEY = "review24-api-key-" + "k" * 40
TOKEN = "review24-token-" + "t" * 40


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.partition("?")[0]
        self.server.owner.log.append((self.command, self.path, dict(self.headers), body))
        route = self.server.owner.routes.get(path)
        if route is None:
            self.send(404, b"no")
            return
        route(self)

    do_GET = do_POST = _any

    def send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
             *, length: bool = True) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def json(self, value: object) -> None:
        self.send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: Hostile

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up mid-body is what several tests do


class Hostile:
    """A loopback server whose ``routes`` (path -> writer) say what it answers; ``log``
    holds every request (method, path, headers, body)."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.log: list[tuple[str, str, dict[str, str], bytes]] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Hostile:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def paths(self) -> list[str]:
        return [p for _, p, _, _ in self.log]


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    with Hostile() as server:
        yield server


@pytest.fixture
def transport() -> Iterator[Transport]:
    t = Transport(timeout=30)
    yield t
    t.close()


def _fetch(url: str, spool: Path, transport: Transport, *, size: int | None = None,
           md5: str | None = None, checkpoint: Callable[[], None] = lambda: None
           ) -> FetchedFile:
    return fetch_to_spool(lambda: url, spool, url, expected_size=size, expected_md5=md5,
                          transport=transport, checkpoint=checkpoint,
                          on_progress=lambda _: None, name="slide.svs")


def _in_thread(call: Callable[[], object]) -> object:
    """``call()`` in a thread; a call that never returns (blocked on a FIFO) fails the
    test instead of hanging the suite (the bound is only a backstop: the success path
    returns at once)."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "blocked (a planted FIFO opened for reading?)"
    return out[0]


def _whole(h: _Handler) -> None:
    """A file server that honours Range (bytes=N-)."""
    wanted = h.headers.get("Range")
    if wanted:
        start = int(wanted.removeprefix("bytes=").rstrip("-"))
        h.send(206, BODY[start:], {"Content-Range": f"bytes {start}-{len(BODY) - 1}/"
                                                    f"{len(BODY)}"})
    else:
        h.send(200, BODY)


# -- the spool: a planted part, sidecar or temp file --------------------------------------

def _leave_a_part(url: str, spool: Path, transport: Transport) -> None:
    """An attempt that stops after its first MiB-read (a pause): the part and its
    sidecar stay."""

    calls = [0]

    def stop() -> None:
        calls[0] += 1
        if calls[0] >= 2:
            raise NetworkError("paused (test)")

    with pytest.raises(NetworkError):
        _fetch(url, spool, transport, size=len(BODY), checkpoint=stop)


def test_a_planted_sidecar_temp_link_is_not_written_through(
        hostile: Hostile, transport: Transport, tmp_path: Path) -> None:
    """The sidecar is written to ``<hash>.tmp`` and renamed: a link planted at that name
    (a shared download root) must not make us write outside the root."""
    hostile.routes["/f"] = _whole
    url = hostile.url + "/f"
    spool = tmp_path / "root" / ".nbia" / "files"
    spool.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    _, sidecar, _ = part_paths(spool, url)
    sidecar.with_suffix(".tmp").symlink_to(victim)
    _leave_a_part(url, spool, transport)
    assert victim.read_text() == "precious\n"
    got = _fetch(url, spool, transport, size=len(BODY), md5=BODY_MD5)
    assert got.md5 == BODY_MD5


def test_a_planted_fifo_sidecar_does_not_hang_the_run(
        hostile: Hostile, transport: Transport, tmp_path: Path) -> None:
    """A FIFO (or a link to /dev/zero) where the sidecar goes is not read: the transfer
    starts from zero and completes."""
    hostile.routes["/f"] = _whole
    url = hostile.url + "/f"
    spool = tmp_path / "spool"
    spool.mkdir()
    _leave_a_part(url, spool, transport)  # also makes this user's row key exist
    _, sidecar, _ = part_paths(spool, url)
    sidecar.unlink()
    os.mkfifo(sidecar)
    got = _in_thread(lambda: _fetch(url, spool, transport, size=len(BODY), md5=BODY_MD5))
    assert isinstance(got, FetchedFile), got
    assert got.path.read_bytes() == BODY


def test_a_sidecar_linked_to_dev_zero_is_not_read_whole(
        hostile: Hostile, transport: Transport, tmp_path: Path) -> None:
    hostile.routes["/f"] = _whole
    url = hostile.url + "/f"
    spool = tmp_path / "spool"
    spool.mkdir()
    _leave_a_part(url, spool, transport)
    _, sidecar, _ = part_paths(spool, url)
    sidecar.unlink()
    sidecar.symlink_to("/dev/zero")
    got = _in_thread(lambda: _fetch(url, spool, transport, size=len(BODY), md5=BODY_MD5))
    assert isinstance(got, FetchedFile), got


@pytest.mark.parametrize("planted", ["link", "fifo", "dir"])
def test_a_planted_part_is_replaced_or_named(hostile: Hostile, transport: Transport,
                                             tmp_path: Path, planted: str) -> None:
    """Something not ours where the part goes (a link to a file outside the root, a
    FIFO): never written through, replaced by a fresh part and the file fetched; a
    folder there: one line naming it."""
    hostile.routes["/f"] = _whole
    url = hostile.url + "/f"
    spool = tmp_path / "spool"
    spool.mkdir()
    part, _, _ = part_paths(spool, url)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    if planted == "link":
        part.symlink_to(victim)
    elif planted == "fifo":
        os.mkfifo(part)
    else:
        part.mkdir()
    got = _in_thread(lambda: _fetch(url, spool, transport, size=len(BODY), md5=BODY_MD5))
    assert victim.read_text() == "precious\n"
    if planted == "dir":
        assert isinstance(got, NbiaError) and str(part) in str(got), got
    else:
        assert isinstance(got, FetchedFile), got
        assert got.path.read_bytes() == BODY


# -- the storage host's answers -----------------------------------------------------------

def test_a_206_with_the_wrong_start_is_refused_and_the_part_kept(
        hostile: Hostile, transport: Transport, tmp_path: Path) -> None:
    hostile.routes["/f"] = _whole
    url = hostile.url + "/f"
    _leave_a_part(url, tmp_path, transport)
    part, _, _ = part_paths(tmp_path, url)
    kept = part.stat().st_size
    assert kept > 0

    def shifted(h: _Handler) -> None:
        h.send(206, BODY[:1000], {"Content-Range": f"bytes 0-999/{len(BODY)}"})

    hostile.routes["/f"] = shifted
    with pytest.raises(ApiError, match="range that was not asked for"):
        _fetch(url, tmp_path, transport, size=len(BODY))
    assert part.read_bytes() == BODY[:kept]


def test_a_206_to_a_request_for_the_whole_file_is_refused(
        hostile: Hostile, transport: Transport, tmp_path: Path) -> None:
    def partial(h: _Handler) -> None:
        h.send(206, BODY[10:], {"Content-Range": f"bytes 10-{len(BODY) - 1}/{len(BODY)}"})

    hostile.routes["/f"] = partial
    with pytest.raises(ApiError, match="206 to a request for the whole file"):
        _fetch(hostile.url + "/f", tmp_path, transport)
    assert list(tmp_path.iterdir()) == []


def test_a_gzip_encoded_answer_is_not_published_as_the_file(
        hostile: Hostile, transport: Transport, tmp_path: Path) -> None:
    """We ask for ``identity``; a PathDB server that gzips anyway (no checksum to catch
    it) must not leave a gzip stream named ``slide.svs``."""
    packed = gzip.compress(BODY)

    def gzipped(h: _Handler) -> None:
        h.send(200, packed, {"Content-Encoding": "gzip"})

    hostile.routes["/f"] = gzipped
    with pytest.raises(ApiError, match="gzip"):
        _fetch(hostile.url + "/f", tmp_path, transport)
    assert list(tmp_path.iterdir()) == []


def test_a_gzip_encoded_object_whose_md5_is_of_its_stored_bytes_is_kept_as_stored(
        hostile: Hostile, transport: Transport, tmp_path: Path) -> None:
    """An S3 object stored with Content-Encoding gzip, its DRS MD5 that of the stored
    bytes: those bytes are the object (as curl saves them)."""
    packed = gzip.compress(BODY)

    def gzipped(h: _Handler) -> None:
        h.send(200, packed, {"Content-Encoding": "gzip"})

    hostile.routes["/f"] = gzipped
    got = _fetch(hostile.url + "/f", tmp_path, transport,
                 md5=hashlib.md5(packed).hexdigest())
    assert got.path.read_bytes() == packed


def test_an_endless_body_stops_at_the_size_expected(
        hostile: Hostile, transport: Transport, tmp_path: Path) -> None:
    """No Content-Length, the connection never ends: the manifest's size bounds it."""

    def endless(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        with contextlib.suppress(OSError):
            while True:
                h.wfile.write(b"\0" * 65536)

    hostile.routes["/f"] = endless
    with pytest.raises(NbiaError, match="more than the 1,000,000 bytes"):
        _fetch(hostile.url + "/f", tmp_path, transport, size=1_000_000)
    assert list(tmp_path.iterdir()) == []


# -- the Gen3 API: where the key and token go, what its answers may say -------------------

def _creds(tmp_path: Path) -> Gen3Credentials:
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"api_key": API_KEY, "key_id": "k1"}))
    path.chmod(0o600)
    return Gen3Credentials.load(path)


def _token(h: _Handler) -> None:
    h.json({"access_token": TOKEN})


def _source(hostile: Hostile, tmp_path: Path, transport: Transport, *,
            md5: str | None = BODY_MD5, size: int | None = len(BODY),
            endpoint: str | None = None) -> tuple[FileSource, FileItem]:
    item = FileItem(kind="drs", uri="drs://evil.example/dg.4DFC/0000-1111",
                    key="drs://evil.example/dg.4DFC/0000-1111", name="report.pdf",
                    collection="C", patient_id="P", size=size, md5=md5, line=2)
    source = FileSource([item], creds=_creds(tmp_path), endpoint=endpoint or hostile.url,
                        policy=None, timeout=30, transport=transport)
    source.bind_run(tmp_path / "spool")
    return source, item


def _fetch_item(source: FileSource, item: FileItem) -> FetchedFile:
    info = source.info(item)
    with source.open(info) as stream:
        return stream.fetch(checkpoint=lambda: None,  # type: ignore[no-any-return]
                            on_progress=lambda _: None)


def test_an_attackers_drs_host_gets_nothing(tmp_path: Path, transport: Transport,
                                            hostile: Hostile) -> None:
    """A sheet naming another host, no --gen3-endpoint, not trusted: refused before any
    request; the key is sent nowhere."""
    host = hostile.url.split("://", 1)[1]
    item = FileItem(kind="drs", uri=f"drs://{host}/dg.4DFC/x", key=f"drs://{host}/dg.4DFC/x",
                    name="x.pdf", line=3)
    source = FileSource([item], creds=_creds(tmp_path), endpoint=None, policy=None,
                        timeout=30, transport=transport)
    with pytest.raises(NbiaError, match="not sending the Gen3 API key") as caught:
        source.prepare()
    assert API_KEY not in str(caught.value)
    assert hostile.log == []


def test_a_signed_url_back_on_the_api_host_gets_no_bearer(
        hostile: Hostile, transport: Transport, tmp_path: Path) -> None:
    hostile.routes["/user/credentials/api/access_token"] = _token
    hostile.routes["/user/data/download/dg.4DFC/0000-1111"] = \
        lambda h: h.json({"url": hostile.url + "/steal?X-Amz-Signature=s3cr3t"})
    hostile.routes["/steal"] = _whole
    source, item = _source(hostile, tmp_path, transport)
    got = _fetch_item(source, item)
    assert got.md5 == BODY_MD5
    sent = [(p, h) for _, p, h, _ in hostile.log if p.startswith("/steal")]
    assert sent and all("Authorization" not in h for _, h in sent)
    # The key went in the token request's body only, the token only to the API paths.
    for _, path, headers, body in hostile.log:
        assert (API_KEY.encode() in body) == path.startswith("/user/credentials")
        assert all(API_KEY not in v for v in headers.values())


def test_the_token_request_follows_no_redirect(hostile: Hostile, transport: Transport,
                                               tmp_path: Path) -> None:
    """A 307 from the token endpoint (which would re-send the key in its body) is not
    followed, even to the same host."""
    hostile.routes["/user/credentials/api/access_token"] = lambda h: h.send(
        307, b"", {"Location": hostile.url + "/catch"})
    hostile.routes["/catch"] = _token
    source, item = _source(hostile, tmp_path, transport)
    with pytest.raises(NbiaError, match="redirect"):
        _fetch_item(source, item)
    assert "/catch" not in hostile.paths()


@pytest.mark.parametrize("status", [422, 500])
def test_an_api_error_page_echoing_the_key_and_token_shows_neither(
        hostile: Hostile, transport: Transport, tmp_path: Path, status: int) -> None:
    hostile.routes["/user/credentials/api/access_token"] = _token
    echo = f"bad request for \x1b]0;{API_KEY}\x07 with Bearer {TOKEN}".encode()
    hostile.routes["/user/data/download/dg.4DFC/0000-1111"] = \
        lambda h: h.send(status, echo, {"Content-Type": "text/plain"})
    source, item = _source(hostile, tmp_path, transport)
    with pytest.raises(NbiaError) as caught:
        _fetch_item(source, item)
    message = str(caught.value)
    assert API_KEY[10:30] not in message and TOKEN[10:30] not in message, message
    assert "\x1b" not in message and "\x07" not in message


def test_a_signed_url_with_userinfo_shows_it_nowhere(
        hostile: Hostile, transport: Transport, tmp_path: Path) -> None:
    hostile.routes["/user/credentials/api/access_token"] = _token
    port = hostile.url.rsplit(":", 1)[1]
    hostile.routes["/user/data/download/dg.4DFC/0000-1111"] = lambda h: h.json(
        {"url": f"http://someone:hunter2hunter2@127.0.0.1:{port}/f?sig=abc"})
    hostile.routes["/f"] = lambda h: h.send(503, b"busy hunter2hunter2")
    source, item = _source(hostile, tmp_path, transport)
    with pytest.raises(NbiaError) as caught:
        _fetch_item(source, item)
    assert "hunter2" not in str(caught.value) and "sig=" not in str(caught.value)
    sent = [h for _, p, h, _ in hostile.log if p.startswith("/f")]
    assert sent and all("Authorization" not in h for h in sent)


def test_a_trickling_storage_host_is_cut_and_its_bytes_kept(
        hostile: Hostile, tmp_path: Path) -> None:
    """Slowloris: a byte every 50 ms (20 B/s, a hundredth of the floor) is cut within a
    window or two of the timeout, and what arrived stays for the next attempt."""
    import time

    def trickle(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(BODY)))
        h.end_headers()
        h.wfile.write(BODY[:5000])
        with contextlib.suppress(OSError):
            for i in range(5000, len(BODY)):
                h.wfile.write(BODY[i:i + 1])
                h.wfile.flush()
                time.sleep(0.05)  # the fault itself: the server's pace

    hostile.routes["/f"] = trickle
    url = hostile.url + "/f"
    slow = Transport(timeout=1)
    try:
        with pytest.raises(NetworkError, match=r"slowly|timed out"):
            _fetch(url, tmp_path, slow, size=len(BODY))
    finally:
        slow.close()
    part, sidecar, _ = part_paths(tmp_path, url)
    assert part.stat().st_size >= 5000 and sidecar.exists()


def test_no_signature_of_a_signed_url_in_the_debug_log(
        hostile: Hostile, transport: Transport, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A signed URL is a bearer credential for its object (an hour, at Fence's
    default): its signature and session token appear in no log record, at DEBUG too;
    the rest of the URL (host, path, other parameters) stays for debugging."""
    import logging

    hostile.routes["/user/credentials/api/access_token"] = _token
    query = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Security-Token=FwoGZXIvYXdzEJr"
             "SESSIONTOKEN0123456789&X-Amz-Signature=5ca1ab1e0ddba11d00dfeed5eedf00d"
             "&sig=abcdefabcdef0123456789&Expires=1700000000")
    hostile.routes["/user/data/download/dg.4DFC/0000-1111"] = \
        lambda h: h.json({"url": f"{hostile.url}/f?{query}"})
    hostile.routes["/f"] = _whole
    source, item = _source(hostile, tmp_path, transport)
    with caplog.at_level(logging.DEBUG):
        got = _fetch_item(source, item)
    assert got.md5 == BODY_MD5
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records)
    assert "/f?" in logged, "nothing logged of the file's request: the scan proves nothing"
    for secret in ("SESSIONTOKEN0123456789", "5ca1ab1e0ddba11d00dfeed5eedf00d",
                   "abcdefabcdef0123456789", TOKEN, API_KEY):
        assert secret not in logged, secret
    assert "Expires=1700000000" in logged


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x",
                                 "javascript:alert(1)", "http:///nohost", "/relative"])
def test_a_signed_url_that_is_not_http_is_refused(
        hostile: Hostile, transport: Transport, tmp_path: Path, url: str) -> None:
    hostile.routes["/user/credentials/api/access_token"] = _token
    hostile.routes["/user/data/download/dg.4DFC/0000-1111"] = lambda h: h.json({"url": url})
    source, item = _source(hostile, tmp_path, transport)
    with pytest.raises(ApiError, match="no usable 'url'") as caught:
        _fetch_item(source, item)
    assert "\n" not in str(caught.value) and "passwd" not in str(caught.value)


@pytest.mark.parametrize("route", ["/user/credentials/api/access_token",
                                   "/user/data/download/dg.4DFC/0000-1111",
                                   "/ga4gh/drs/v1/objects/dg.4DFC/0000-1111"])
@pytest.mark.parametrize("bomb", ["deep", "huge"])
def test_json_bombs_from_the_gen3_api_are_one_line_errors(
        hostile: Hostile, transport: Transport, tmp_path: Path, route: str,
        bomb: str) -> None:
    hostile.routes["/user/credentials/api/access_token"] = _token
    hostile.routes["/user/data/download/dg.4DFC/0000-1111"] = \
        lambda h: h.json({"url": hostile.url + "/f"})
    hostile.routes["/ga4gh/drs/v1/objects/dg.4DFC/0000-1111"] = lambda h: h.send(404, b"")
    hostile.routes["/f"] = _whole
    if bomb == "deep":
        body = b'{"url": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    else:
        body = b'{"url": "' + b"a" * (100 << 20) + b'"}'
    hostile.routes[route] = lambda h: h.send(200, body, {"Content-Type": "application/json"})
    source, item = _source(hostile, tmp_path, transport, md5=None)
    with pytest.raises(NbiaError) as caught:
        _fetch_item(source, item)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message


@pytest.mark.parametrize("size", [-5, 10**30, "12", True])
def test_a_drs_record_with_a_bogus_size_or_md5(hostile: Hostile, transport: Transport,
                                               tmp_path: Path, size: object) -> None:
    """Sizes that are not a sane count of bytes and an MD5 that is not 32 hex digits
    are ignored, or refuse the item in one line: never a crash or a wrong file."""
    hostile.routes["/user/credentials/api/access_token"] = _token
    hostile.routes["/user/data/download/dg.4DFC/0000-1111"] = \
        lambda h: h.json({"url": hostile.url + "/f"})
    hostile.routes["/ga4gh/drs/v1/objects/dg.4DFC/0000-1111"] = lambda h: h.json(
        {"size": size, "checksums": [{"type": "md5", "checksum": "\x1b[31mzz"}],
         "name": "../../etc/x"})
    hostile.routes["/f"] = _whole
    source, item = _source(hostile, tmp_path, transport, md5=None, size=None)
    try:
        got = _fetch_item(source, item)
    except NbiaError as exc:
        assert size == 10**30 and "\n" not in str(exc) and "\x1b" not in str(exc)
    else:
        assert got.path.read_bytes() == BODY and got.md5 == BODY_MD5


# -- end to end: planted things in the download root; secrets in the output --------------

def _pathdb_sheet(path: Path, archive: Gen3Archive, gen3: Gen3Server) -> Path:
    lines = ["imageUrl,name,collection,patient_id"]
    for slide in archive.slides:
        lines.append(f"{gen3.pathdb_url}/system/files/{slide.url_path},{slide.name},"
                     f"{slide.collection},{slide.patient_id}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_planted_fifos_and_links_in_the_root_neither_hang_nor_are_written_through(
        tmp_path: Path, gen3_archive: Gen3Archive, gen3_server: Gen3Server) -> None:
    """A FIFO where a slide goes, a link to a file outside the root where another goes,
    files.csv a link outside: the run completes, each slide under a free name, nothing
    outside the root touched."""
    sheet = _pathdb_sheet(tmp_path / "slides.csv", gen3_archive, gen3_server)
    root = tmp_path / "out" / "slides"
    first, second = gen3_archive.slides[0], gen3_archive.slides[1]
    for slide in (first, second):
        (root / slide.collection / slide.patient_id).mkdir(parents=True, exist_ok=True)
    os.mkfifo(root / first.collection / first.patient_id / first.name)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (root / second.collection / second.patient_id / second.name).symlink_to(victim)
    (root / "files.csv").symlink_to(victim)
    third = gen3_archive.slides[2]  # a folder (a series' folder, say) of the slide's name
    (root / third.collection / third.patient_id / third.name / "1-01.dcm").parent.mkdir(
        parents=True)
    done = run_cli(["download", str(sheet), "-d", str(tmp_path / "out")], timeout=90)
    assert victim.read_text() == "precious\n"
    for slide in gen3_archive.slides:
        folder = root / slide.collection / slide.patient_id
        stem, _, ext = slide.name.rpartition(".")
        names = [slide.name, f"{stem}_2.{ext}"]
        assert any((folder / n).is_file() and not (folder / n).is_symlink()
                   and (folder / n).read_bytes() == slide.path.read_bytes()
                   for n in names), (slide.name, done.stdout + done.stderr)


def test_no_key_token_or_signature_in_any_output_or_file(
        tmp_path: Path, gen3_archive: Gen3Archive, gen3_serve: Callable[..., Gen3Server]
        ) -> None:
    """A run whose storage host refuses and drops (errors quoted, retried, failed) with
    --json: the key, the tokens and the signed URLs' signatures appear in no output,
    journal, files.csv or error report."""
    from test_mixed_sheet import mixed_sheet

    gen3 = gen3_serve(faults="drop_after=5000,url_uses=1")
    creds = gen3.write_credentials(tmp_path / "credentials.json")
    key = json.loads(creds.read_text())["api_key"]
    sheet = mixed_sheet(tmp_path / "drs.csv", gen3_archive, gen3, [])
    done = run_cli(["download", str(sheet), "-d", str(tmp_path / "out"), "--auth",
                    str(creds), "--gen3-endpoint", gen3.url, "--accept-data-policy",
                    "--json", "--retries", "1"])
    texts = [done.stdout, done.stderr]
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file() and not path.is_symlink() and path.suffix in (
                ".csv", ".json", ".txt", ".log", ".sqlite", ".db", ""):
            texts.append(path.read_bytes().decode("latin-1"))
    signatures = [r.query["sig"] for r in gen3.requests if r.query.get("sig")]
    assert signatures, "no signed URL was used"
    for text in texts:
        assert key not in text
        assert key[10:40] not in text
        for sig in signatures:
            assert sig not in text


def test_hostile_names_land_in_collection_patient_each_under_its_own_name(
        tmp_path: Path, gen3_archive: Gen3Archive, gen3_server: Gen3Server) -> None:
    """Names and folders from the sheet: ``../``, absolute, ``CON``, escapes and bidi,
    300 bytes, a name twice for one patient (``_2``, no overwrite), a collection or
    patient of ``.nbia``/``..``: every file lands once, byte-equal, at depth 3 of the root
    and outside ``.nbia``; no escape reaches the terminal."""
    import csv

    slide = gen3_archive.slides[0]
    url = f"{gen3_server.pathdb_url}/system/files/{slide.url_path}"
    rows = [("../../escape.svs", "C", "P"), ("/abs.svs", "C", "P"), ("CON", "C", "P"),
            ("a\x1b[31mb\u202ec.svs", "C", "P"), ("n" * 300 + ".svs", "C", "P"),
            ("dup.svs", "C", "P"),
            ("slide.svs", ".nbia", ".."), ("slide.svs", "..", ".nbia"),
            ("x.svs", "C/../../..", "P\0"), ("=HYPERLINK(\"http://e\")x.svs", "+C", "@P")]
    sheet = tmp_path / "names.csv"
    with sheet.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["imageUrl", "name", "collection", "patient_id"])
        for n, (name, collection, patient) in enumerate(rows):
            writer.writerow([f"{url}?n={n}", name, collection, patient.replace("\0", "")])
        # The same name for one patient, other bytes: a second file, never an overwrite.
        other = gen3_archive.slides[1]
        writer.writerow([f"{gen3_server.pathdb_url}/system/files/{other.url_path}",
                         "dup.svs", "C", "P"])
    done = run_cli(["download", str(sheet), "-d", str(tmp_path / "out")], timeout=90)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    assert "\x1b" not in text and "\u202e" not in text
    root = tmp_path / "out" / "names"
    data = slide.path.read_bytes()
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] != ".nbia" and rel.name not in (
                "metadata.csv", "files.csv"):
            assert len(rel.parts) == 3, rel
            if rel.name != "dup_2.svs":  # the other slide's
                assert path.read_bytes() == data, rel
            assert all(c.isprintable() and c != "\u202e" for c in rel.as_posix()), rel
            assert len(rel.name.encode()) <= 255
            found.append(rel)
    assert len(found) == len(rows) + 1, sorted(map(str, found))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["names"]
    assert not any(p.is_file() and p.stat().st_size == len(data)
                   for p in (root / ".nbia").rglob("*"))
    listed = (root / "files.csv").read_text(encoding="utf-8")
    assert "\x1b" not in listed and "\u202e" not in listed and "\0" not in listed
    cells = [c for row in csv.reader(listed.splitlines()) for c in row]
    assert not any(c[:1] in ("=", "+", "@", "-") for c in cells), listed  # no formulas
    dups = sorted(p.name for p in found if p.name.startswith("dup"))
    assert dups == ["dup.svs", "dup_2.svs"]


def test_a_planted_spool_link_and_a_fifo_files_csv(
        tmp_path: Path, gen3_archive: Gen3Archive, gen3_server: Gen3Server) -> None:
    """``.nbia/files`` a link to a folder outside the root: nothing is written there, the
    run says why in a line; ``files.csv`` a FIFO: no hang."""
    sheet = _pathdb_sheet(tmp_path / "slides.csv", gen3_archive, gen3_server)
    root = tmp_path / "out" / "slides"
    (root / ".nbia").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / ".nbia" / "files").symlink_to(outside)
    os.mkfifo(root / "files.csv")
    done = run_cli(["download", str(sheet), "-d", str(tmp_path / "out")], timeout=90)
    text = done.stdout + done.stderr
    assert list(outside.iterdir()) == [], text
    assert "Traceback" not in text
    assert done.returncode != 0 and ".nbia/files" in text and "link" in text, text


def test_rows_the_sheet_could_not_use_are_said_not_dropped_silently(tmp_path: Path) -> None:
    """A DRS cell that is not a DRS URI, an ftp:// image URL: ``list`` and ``download``
    name each skipped line on stderr (a researcher must not believe a sheet fully
    fetched that was not fully read); the escape in one never reaches the terminal."""
    sheet = tmp_path / "sheet.csv"
    rows = ["drs_uri,name", "drs://nci-crdc.datacommons.io/dg.4DFC/ok,a.pdf",
            "ftp://evil.example/x,b.pdf", "drs://user@evil.example/dg.4DFC/y,c.pdf",
            "drs://evil.example/dg.4DFC/\x1b[2J,d.pdf"]
    rows += [f"http://h{i}.example/x?,e{i}.pdf" for i in range(8)]
    sheet.write_text("\n".join(rows) + "\n", encoding="utf-8")
    listed = run_cli(["list", str(sheet)])
    assert listed.returncode == 0, listed.stderr
    for line in (3, 4, 5):
        assert f"line {line}:" in listed.stderr, listed.stderr
    assert "more line(s) skipped" in listed.stderr
    assert "\x1b" not in listed.stderr + listed.stdout
    assert "user@" not in listed.stderr
    done = run_cli(["download", str(sheet), "-d", str(tmp_path / "out"), "--timeout", "2"],
                   env={"NBIA_GEN3_AUTH": "", "GEN3_API_KEY": ""})
    assert "line 3:" in done.stderr, done.stderr


@pytest.mark.parametrize("as_json", [False, True])
def test_a_failing_file_with_a_hostile_name_prints_no_escape(
        tmp_path: Path, hostile: Hostile, as_json: bool) -> None:
    """The failure and retry lines name a file as people know it (collection, patient,
    name): from the sheet, so no escape, bidi override or NUL of it reaches the
    terminal or the JSON events; nor does the storage host's error page."""
    hostile.routes["/slide.svs"] = lambda h: h.send(
        503, b"\x1b]0;pwned\x07\x1b[2J busy", {"Retry-After": "0"})
    sheet = tmp_path / "bad.csv"
    sheet.write_text("imageUrl,name,collection,patient_id\n"
                     f"{hostile.url}/slide.svs,\"a\x1b[2Jb\u202ec\x07.svs\","
                     "\"C\u2067ol\x1b[31m\",\"P\x9b1m\"\n", encoding="utf-8")
    args = ["download", str(sheet), "-d", str(tmp_path / "out"), "--retries", "1"]
    done = run_cli([*args, "--json"] if as_json else args)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    assert "503" in text or "busy" in text.lower() or "HTTP" in text, text
    for bad in ("\x1b", "\x07", "\u202e", "\u2067", "\x9b", "\0"):
        assert bad not in text, (bad, text)
    if as_json:
        assert "\\u001b" not in done.stdout and "\\u202e" not in done.stdout.lower()


def test_verify_meets_a_fifo_and_a_link_where_files_were(
        tmp_path: Path, gen3_archive: Gen3Archive, gen3_server: Gen3Server) -> None:
    """After a download, a slide swapped for a FIFO and another for a link to a file
    outside the root (the same bytes, even): verify neither hangs nor follows the link,
    and says their rows are not taken as done (the journal's rule for a row whose leaf
    is not a regular file: a warning, as for a planted row; the next run fetches them)."""
    sheet = _pathdb_sheet(tmp_path / "slides.csv", gen3_archive, gen3_server)
    done = run_cli(["download", str(sheet), "-d", str(tmp_path / "out")])
    assert done.returncode == 0, done.stdout + done.stderr
    root = tmp_path / "out" / "slides"
    first, second = gen3_archive.slides[0], gen3_archive.slides[1]
    path = root / first.collection / first.patient_id / first.name
    path.unlink()
    os.mkfifo(path)
    outside = tmp_path / "copy.svs"
    outside.write_bytes(second.path.read_bytes())
    linked = root / second.collection / second.patient_id / second.name
    linked.unlink()
    linked.symlink_to(outside)
    before = outside.read_bytes()
    checked = run_cli(["verify", str(root)], timeout=90)
    text = checked.stdout + checked.stderr
    assert "Traceback" not in text
    assert "verified 1 series" in text and "2 rows" in text and "not taken as done" in text
    assert outside.read_bytes() == before and linked.is_symlink()
