"""IDC's objects as one series stream (``idc.s3``, ``idc.stream``), over real HTTP.

moto's S3 server runs in a child process on 127.0.0.1 (its own GIL and memory, so the
memory test measures the client alone), filled with DICOM files of the synthetic
archive under IDC's layout (``<crdc_series_uuid>/<crdc_instance_uuid>.dcm``); a series
is staged by the engine's own :func:`stage_series` through the stream's reader, and
checked by the engine's own :func:`check_series`. S3's faults (a wrong byte, a missing
object, 503 SlowDown, a reset, a truncated listing, a multipart ETag) come from the
reference server's S3 mode (``server/s3.py``); the ones it does not make (a stall to
abort, 403, a body longer than listed, hostile listings) from :class:`S3Stub`, a small
aiohttp S3 of this file that serves what a test tells it to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import socket
import subprocess
import sys
import threading
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from nbia_retriever.engine import checks
from nbia_retriever.engine.staging import Progress, StagedSeries, stage_series
from nbia_retriever.errors import ApiError, IntegrityError, NetworkError
from nbia_retriever.idc.s3 import S3Object, get_object, list_objects, list_page
from nbia_retriever.idc.stream import IdcOpener, IdcStream
from nbia_retriever.models import SeriesInfo
from nbia_retriever.naming import MD5_ENTRY
from nbia_retriever.retry import classify
from nbia_retriever.server.idcdata import IdcSeriesVersion
from nbia_retriever.server.runner import AppThread
from nbia_retriever.server.s3 import S3Faults, S3Server
from nbia_retriever.server.synth import ArchiveSummary, SynthSeries
from s3_fixtures import S3Archive, s3_archive, s3_server  # noqa: F401

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

BUCKET = "idc-open-data"


def series_uuid(series_uid: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "series:" + series_uid))


def instance_uuid(sop_uid: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "instance:" + sop_uid))


def sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# ----------------------------------------------------------------------------- moto


_MOTO = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Moto:
    url: str
    client: Any
    proc: subprocess.Popen[str]

    def put(self, key: str, body: bytes | Any) -> None:
        self.client.put_object(Bucket=BUCKET, Key=key, Body=body, ACL="public-read")


@contextlib.contextmanager
def moto_server() -> Iterator[Moto]:
    """moto's S3 in a child process; it ends when its stdin closes."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _MOTO, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=url, aws_access_key_id="test",
                              aws_secret_access_key="test", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield Moto(url, client, proc)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class IdcSeriesFixture:
    series: SynthSeries
    uuid: str
    objects: dict[str, bytes]  # key -> bytes


def put_series(moto: Moto, series: SynthSeries) -> IdcSeriesFixture:
    prefix = series_uuid(series.series_uid)
    objects = {f"{prefix}/{instance_uuid(sop_uid(p))}.dcm": p.read_bytes() for p in series.files}
    for key, data in objects.items():
        moto.put(key, data)
    return IdcSeriesFixture(series, prefix, objects)


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    return archive_factory(collections=1, patients=1, studies=1, series=2, images=5,
                           awkward=False, restricted=False)


@pytest.fixture(scope="module")
def moto(archive: ArchiveSummary) -> Iterator[tuple[Moto, list[IdcSeriesFixture]]]:
    with moto_server() as server:
        yield server, [put_series(server, s) for s in archive.series]


def opener(endpoint: str, uuid_: str, uid: str, count: int, **kw: Any) -> IdcOpener:
    return IdcOpener(endpoint=endpoint, bucket=BUCKET, crdc_series_uuid=uuid_,
                     series_uid=uid, instance_count=count, timeout=30.0,
                     connect_timeout=10.0, **kw)


def info_of(uid: str, count: int) -> SeriesInfo:
    return SeriesInfo(uid, image_count=count)


def stage(stream: IdcStream, uid: str, info: SeriesInfo, tmp_path: Path) -> StagedSeries:
    return stage_series(uid, info, stream.chunks(), tmp_path / "staging" / "s", root=tmp_path,
                        checkpoint=lambda: None, progress=Progress(),
                        on_progress=lambda n: None, reader=stream.reader)


@contextlib.contextmanager
def consumed_until_aborted(stream: IdcStream) -> Iterator[list[BaseException | None]]:
    """``stream`` consumed in another thread until, on leaving, this thread aborts it;
    the consumer has ended then. Yields what it saw: its exception (or None, its end)."""
    outcome: list[BaseException | None] = []

    def consume() -> None:
        try:
            for _ in stream.chunks():
                pass
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    try:
        yield outcome
    finally:
        stream.abort()
        thread.join(30)
    assert not thread.is_alive()


@pytest.fixture
def cache() -> Iterator[dict[Any, Any]]:
    kept: dict[Any, Any] = {}
    yield kept
    for value in kept.values():
        value.close()


# ----------------------------------------------------------------------------- moto tests


def test_a_series_is_staged_from_s3_with_etags_as_its_md5_list(
        moto: tuple[Moto, list[IdcSeriesFixture]], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    server, fixtures = moto
    fx = fixtures[0]
    uid, count = fx.series.series_uid, len(fx.objects)
    with opener(server.url, fx.uuid, uid, count, inflight=3).open_stream(cache) as stream:
        staged = stage(stream, uid, info_of(uid, count), tmp_path)
        assert stream.bytes_received == sum(len(b) for b in fx.objects.values())
    keys = sorted(fx.objects)
    assert [e.name for e in staged.entries] == [k.rpartition("/")[2] for k in keys]
    for entry, key in zip(staged.entries, keys, strict=True):
        data = (staged.folder / entry.part).read_bytes()
        assert data == fx.objects[key]
        assert entry.md5 == hashlib.md5(data).hexdigest()
        assert entry.tags is not None and entry.tags.series_uid == uid
    assert staged.md5_list == {k.rpartition("/")[2]: hashlib.md5(v).hexdigest()
                               for k, v in fx.objects.items()}
    checks.check_series(uid, info_of(uid, count), staged.entries, staged.md5_list,
                        md5_required=True)


def test_a_listing_that_disagrees_with_the_index_is_retried(
        moto: tuple[Moto, list[IdcSeriesFixture]], cache: dict[Any, Any]) -> None:
    server, fixtures = moto
    fx = fixtures[1]
    uid, count = fx.series.series_uid, len(fx.objects)
    wrong = opener(server.url, fx.uuid, uid, count + 1)
    with pytest.raises(IntegrityError, match=rf"has {count} objects, the index says "
                                             rf"{count + 1}") as caught, \
            wrong.open_stream(cache):
        pass
    assert classify(caught.value).retry
    assert str(caught.value).startswith(f"series {uid}")


def test_a_listing_of_more_than_1000_keys_follows_continuation_tokens(
        tmp_path: Path, cache: dict[Any, Any]) -> None:
    prefix = str(uuid.uuid4())
    with moto_server() as server:
        keys = [f"{prefix}/{i:05d}.bin" for i in range(1005)]
        for i, key in enumerate(keys):
            server.put(key, i.to_bytes(2, "big"))
        from nbia_retriever.api.http import Transport

        transport = Transport(timeout=30.0)
        try:
            listed = list_objects(transport, server.url, BUCKET, prefix + "/", what="test")
        finally:
            transport.close()
        assert [o.key for o in listed] == keys
        assert [o.size for o in listed] == [2] * 1005
        # and the whole series streams, in key order, each object cut at its size
        uid = "1.2.3.4"
        with opener(server.url, prefix, uid, 1005).open_stream(cache) as stream:
            reader = stream.reader(max_total_size=None, max_entries=2000)
            data = []
            for chunk in stream.chunks():
                for ev in reader.feed(chunk):
                    if type(ev).__name__ == "EntryData":
                        data.append(bytes(ev.data))  # type: ignore[union-attr]
            tail = list(reader.close())
        assert reader.finished
        assert b"".join(data) == b"".join(i.to_bytes(2, "big") for i in range(1005))
        assert tail[-1].name == MD5_ENTRY  # type: ignore[union-attr]


def test_memory_stays_flat_for_a_200_mb_object_and_many_big_ones(
        tmp_path: Path, cache: dict[Any, Any]) -> None:
    """One 200 MB object, then 24 of 2 MiB (three times the stream's budget): the
    client's peak is its buffers, not an object and not the series."""
    size = 200 * 1024 * 1024
    blob = tmp_path / "big.bin"
    digest = hashlib.md5()
    with blob.open("wb") as f:
        block = bytes(range(256)) * 4096  # 1 MiB
        for i in range(size // len(block)):
            piece = i.to_bytes(4, "big") + block[4:]
            f.write(piece)
            digest.update(piece)
    prefix = str(uuid.uuid4())
    small = {f"{prefix}/m{i:02d}.bin": bytes([i]) * (2 << 20) for i in range(24)}
    with moto_server() as server:
        with blob.open("rb") as f:
            server.put(f"{prefix}/big.bin", f)
        blob.unlink()
        for key, data in small.items():
            server.put(key, data)
        uid = "1.2.3.5"
        count = 1 + len(small)
        tracemalloc.start()
        try:
            with opener(server.url, prefix, uid, count).open_stream(cache) as stream:
                staged = stage(stream, uid, SeriesInfo(uid, image_count=count,
                                                       file_size=size + (48 << 20)),
                               tmp_path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    big, *rest = staged.entries
    assert big.size == size and big.md5 == digest.hexdigest()
    assert [(e.name, e.md5) for e in rest] == [(k.rpartition("/")[2], hashlib.md5(v).hexdigest())
                                               for k, v in small.items()]
    assert staged.md5_list is not None and staged.md5_list["big.bin"] == digest.hexdigest()
    assert peak < 24 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB for {size / 1e6:.0f} MB + 50 MB"


def test_the_opener_is_picklable_and_carries_no_secret() -> None:
    import pickle

    op = opener("http://127.0.0.1:1", str(uuid.uuid4()), "1.2", 3)
    assert pickle.loads(pickle.dumps(op)) == op
    assert op.secrets() == () and op.what == "series 1.2"


# ----------------------------------------------------------------------------- S3 faults
# The reference server's S3 mode (``server/s3.py``) over the IDC view of an archive.


@pytest.fixture
def s3(s3_server: S3Server,  # noqa: F811
       s3_archive: S3Archive) -> tuple[S3Server, str, IdcSeriesVersion]:  # noqa: F811
    """The server, and one current series it holds (uid, its version)."""
    uid = s3_archive.idc_uids[1]
    return s3_server, uid, s3_archive.view.current[uid]


def s3_opener(s3: tuple[S3Server, str, IdcSeriesVersion], **kw: Any) -> IdcOpener:
    server, uid, version = s3
    return IdcOpener(endpoint=server.url, bucket=version.bucket,
                     crdc_series_uuid=version.crdc_series_uuid, series_uid=uid,
                     instance_count=len(version.objects), timeout=30.0, connect_timeout=10.0,
                     **kw)


def s3_stage(s3: tuple[S3Server, str, IdcSeriesVersion], tmp_path: Path,
             cache: dict[Any, Any], **kw: Any) -> StagedSeries:
    _, uid, version = s3
    with s3_opener(s3, **kw).open_stream(cache) as stream:
        return stage(stream, uid, info_of(uid, len(version.objects)), tmp_path)


def test_the_s3_mode_series_is_staged_byte_for_byte(
        s3: tuple[S3Server, str, IdcSeriesVersion], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    _, uid, version = s3
    staged = s3_stage(s3, tmp_path, cache, inflight=2)
    assert [e.name for e in staged.entries] == [o.key.rpartition("/")[2]
                                                for o in version.objects]
    for entry, obj in zip(staged.entries, version.objects, strict=True):
        assert (staged.folder / entry.part).read_bytes() == obj.path.read_bytes()
    checks.check_series(uid, info_of(uid, len(version.objects)), staged.entries,
                        staged.md5_list, md5_required=True)


def test_a_wrong_byte_fails_the_md5_check_against_the_etag(
        s3: tuple[S3Server, str, IdcSeriesVersion], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    server, uid, version = s3
    server.set_faults(S3Faults(corrupt={uid: None}))
    staged = s3_stage(s3, tmp_path, cache)
    first = version.objects[0].key.rpartition("/")[2]
    with pytest.raises(IntegrityError, match=rf"series {uid}: MD5 mismatch for {first}"):
        checks.check_series(uid, info_of(uid, len(version.objects)), staged.entries,
                            staged.md5_list, md5_required=True)


def test_a_listed_object_that_is_missing_is_a_retried_integrity_error(
        s3: tuple[S3Server, str, IdcSeriesVersion], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    server, uid, version = s3
    server.set_faults(S3Faults(missing={uid: None}))
    with pytest.raises(IntegrityError, match=r"was listed but is missing \(HTTP 404 "
                                             r"NoSuchKey\)") as caught:
        s3_stage(s3, tmp_path, cache)
    assert version.objects[0].key in str(caught.value)
    assert str(caught.value).startswith(f"series {uid}")
    assert classify(caught.value).retry


def test_503_slowdown_is_the_slow_down_verdict(
        s3: tuple[S3Server, str, IdcSeriesVersion], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    server, _, _ = s3
    server.set_faults(S3Faults(slowdown=1, retry_after=7.0))
    with pytest.raises(ApiError, match=r"HTTP 503 SlowDown") as caught:
        s3_stage(s3, tmp_path, cache)
    verdict = classify(caught.value)
    assert verdict.retry and verdict.throttle and verdict.retry_after == 7.0
    s3_stage(s3, tmp_path, cache)  # the next attempt goes through


def test_a_reset_mid_object_is_a_network_error(
        s3: tuple[S3Server, str, IdcSeriesVersion], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    server, uid, _ = s3
    server.set_faults(S3Faults(reset={uid: 1}))
    with pytest.raises(NetworkError) as caught:
        s3_stage(s3, tmp_path, cache)
    assert classify(caught.value).retry
    assert [r.fault for r in server.requests if r.fault] == ["reset"]
    s3_stage(s3, tmp_path, cache)  # the connections left are sound


def test_a_truncated_listing_is_a_retried_integrity_error(
        s3: tuple[S3Server, str, IdcSeriesVersion], cache: dict[Any, Any]) -> None:
    server, uid, version = s3
    server.set_faults(S3Faults(truncate={uid: None}))
    n = len(version.objects)
    with pytest.raises(IntegrityError, match=rf"has {n - 1} objects, the index says {n}") \
            as caught, s3_opener(s3).open_stream(cache):
        pass
    assert classify(caught.value).retry


def test_a_multipart_etag_is_left_out_of_the_md5_list(
        s3: tuple[S3Server, str, IdcSeriesVersion], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    server, _, version = s3
    first = version.objects[0]
    server.set_faults(S3Faults(multipart=frozenset([first.key])))
    staged = s3_stage(s3, tmp_path, cache)
    assert staged.md5_list is not None
    assert first.key.rpartition("/")[2] not in staged.md5_list
    assert len(staged.md5_list) == len(version.objects) - 1


def test_get_object_from_an_offset_is_a_range_request(
        s3: tuple[S3Server, str, IdcSeriesVersion]) -> None:
    from nbia_retriever.api.http import Transport

    server, _, version = s3
    obj = version.objects[0]
    listed = S3Object(obj.key, obj.size, obj.etag.strip('"'))
    data = obj.path.read_bytes()
    transport = Transport(timeout=30.0)
    try:
        with get_object(transport, server.url, version.bucket, listed, what="t",
                        start=1000) as response:
            assert response.status == 206
            assert b"".join(response.chunks()) == data[1000:]
    finally:
        transport.close()


def test_closing_the_cache_ends_the_fetcher_threads(
        s3: tuple[S3Server, str, IdcSeriesVersion], tmp_path: Path) -> None:
    """A program that runs many downloads does not keep every run's fetchers."""
    _, uid, version = s3
    before = set(threading.enumerate())
    kept: dict[Any, Any] = {}
    with s3_opener(s3, inflight=4).open_stream(kept) as stream:
        stage(stream, uid, info_of(uid, len(version.objects)), tmp_path)
    [fetchers] = kept.values()
    mine = [t for t in threading.enumerate() if t not in before and t.name == "idc-fetch"]
    assert 1 <= len(mine) == fetchers.threads <= 4
    fetchers.close()
    for thread in mine:
        thread.join(10)
    assert not any(t.is_alive() for t in mine)
    with pytest.raises(NetworkError, match="closed"), \
            s3_opener(s3).open_stream(kept) as stream:
        list(stream.chunks())


def test_a_worker_process_stages_an_idc_series_with_its_reader(
        s3: tuple[S3Server, str, IdcSeriesVersion], tmp_path: Path) -> None:
    """The opener crosses to a worker process, which lists, fetches and stages the
    series there through the stream's own reader (procs' ``reader=`` call site)."""
    import time

    from nbia_retriever.engine.procs import WorkerPool

    _, uid, version = s3
    pool = WorkerPool(1)
    pool.start()
    try:
        deadline = time.monotonic() + 60
        while pool.ready() < 1:
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.01)
        staged = pool.stage(s3_opener(s3), info_of(uid, len(version.objects)),
                            tmp_path / "staging" / "s", tmp_path, progress=Progress(),
                            on_progress=lambda n: None, checkpoint=lambda: None,
                            on_open=lambda attempt: None, cancelled=RuntimeError)
    finally:
        pool.close()
    assert staged is not None
    assert staged.md5_list == {o.key.rpartition("/")[2]: o.etag.strip('"')
                               for o in version.objects}
    checks.check_series(uid, info_of(uid, len(version.objects)), staged.entries,
                        staged.md5_list, md5_required=True)


# ----------------------------------------------------------------------------- the stub


@dataclass
class S3Stub:
    """A small S3 (path-style, anonymous) that serves ``objects`` and lies on request.

    The faults of the reference server's S3 mode are tested with it (above); these are
    the ones it does not make. ``faults``: key -> "stall" | "denied" | "longer" |
    "redirect";
    ``listing``: None (honest) or "truncated" (IsTruncated without a
    token) | "doctype" | "outside" (a key outside the prefix) | "slash" (a key with a
    folder); ``page``: keys per listing page.
    """

    objects: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)
    listing: str | None = None
    page: int = 1000
    #: set when a stalled body's reader went away (the client closed its socket)
    released: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    #: keys of the GETs received, in order
    gets: list[str] = field(default_factory=list)
    _stop: asyncio.Event | None = None
    _runner: AppThread | None = None
    _waits: dict[int, threading.Event] = field(default_factory=dict)

    def requested(self, n: int) -> threading.Event:
        """Set once ``n`` GETs of objects arrived."""
        event = self._waits.setdefault(n, threading.Event())
        if len(self.gets) >= n:
            event.set()
        return event

    @property
    def url(self) -> str:
        assert self._runner is not None
        return self._runner.url

    def __enter__(self) -> S3Stub:
        app = web.Application()
        app.router.add_get("/{bucket}", self._list)
        app.router.add_get("/{bucket}/{key:.+}", self._get)
        self._runner = AppThread(app, shutdown_timeout=0.2, name="s3-stub")
        self._runner.start()
        # A stalled body's handler is cancelled when the client closes its connection:
        # how the stub knows that abort() closed the socket.
        web_runner = self._runner._runner
        assert web_runner is not None and web_runner.server is not None
        web_runner.server.handler_cancellation = True
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        loop = self._runner._loop
        if loop is not None and self._stop is not None:
            loop.call_soon_threadsafe(self._stop.set)
        self._runner.stop()

    async def _list(self, request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        keys = sorted(k for k in self.objects if k.startswith(prefix))
        start = int(request.query.get("continuation-token", "0"))
        part = keys[start:start + self.page]
        more = start + self.page < len(keys)
        rows = [(k, self.objects[k]) for k in part]
        if self.listing == "outside":
            rows.append(("elsewhere/x.dcm", b"x"))
        if self.listing == "slash":
            rows.append((prefix + "a/b.dcm", b"x"))
        contents = "".join(
            f"<Contents><Key>{k}</Key><Size>{len(v)}</Size>"
            f"<ETag>&quot;{hashlib.md5(v).hexdigest()}&quot;</ETag></Contents>"
            for k, v in rows)
        truncated = "true" if more or self.listing == "truncated" else "false"
        token = f"<NextContinuationToken>{start + self.page}</NextContinuationToken>" \
            if more and self.listing != "truncated" else ""
        head = '<?xml version="1.0" encoding="UTF-8"?>'
        if self.listing == "doctype":
            head += '<!DOCTYPE x [<!ENTITY a "aaaaaaaa">]>'
        body = (f'{head}<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{request.match_info['bucket']}</Name><Prefix>{prefix}</Prefix>"
                f"<IsTruncated>{truncated}</IsTruncated>{token}{contents}</ListBucketResult>")
        return web.Response(body=body.encode(), content_type="application/xml")

    @staticmethod
    def _error(status: int, code: str, **headers: str) -> web.Response:
        body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>"
        return web.Response(status=status, body=body.encode(), content_type="application/xml",
                            headers=headers)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        self.gets.append(key)
        for n, event in list(self._waits.items()):
            if len(self.gets) >= n:
                event.set()
        data = self.objects.get(key)
        fault = self.faults.get(key)
        if data is None:
            return self._error(404, "NoSuchKey")
        if fault == "denied":
            return self._error(403, "AccessDenied")
        if fault == "redirect":  # to another host: a bucket in another region would
            raise web.HTTPTemporaryRedirect(f"http://localhost:1/{key}")
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        if fault == "longer":
            response = web.StreamResponse(headers={"ETag": etag})
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(data + b"extra")
            await response.write_eof()
            return response
        response = web.StreamResponse(headers={"ETag": etag,
                                               "Content-Length": str(len(data))})
        await response.prepare(request)
        if fault == "stall":
            await response.write(data[: len(data) // 2])
            self.stalled.set()
            try:
                await self._stop_event().wait()
            except asyncio.CancelledError:  # the client closed the connection
                self.released.set()
                raise
            return response
        await response.write(data)
        await response.write_eof()
        return response

    def _stop_event(self) -> asyncio.Event:
        if self._stop is None:
            self._stop = asyncio.Event()
        return self._stop


# ----------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def dicoms(archive: ArchiveSummary) -> tuple[str, dict[str, bytes]]:
    """One synthetic series under its IDC keys: (series uid, key -> bytes)."""
    series = archive.series[0]
    prefix = series_uuid(series.series_uid)
    return series.series_uid, {f"{prefix}/{instance_uuid(sop_uid(p))}.dcm": p.read_bytes()
                               for p in series.files}


@pytest.fixture
def stub(dicoms: tuple[str, dict[str, bytes]]) -> Iterator[S3Stub]:
    with S3Stub(objects=dict(dicoms[1])) as srv:
        yield srv


def stub_opener(stub: S3Stub, dicoms: tuple[str, dict[str, bytes]], **kw: Any) -> IdcOpener:
    uid, objects = dicoms
    prefix = next(iter(objects)).partition("/")[0]
    return opener(stub.url, prefix, uid, kw.pop("count", len(objects)), **kw)


def stage_stub(stub: S3Stub, dicoms: tuple[str, dict[str, bytes]], tmp_path: Path,
               cache: dict[Any, Any], **kw: Any) -> StagedSeries:
    uid, objects = dicoms
    with stub_opener(stub, dicoms, **kw).open_stream(cache) as stream:
        return stage(stream, uid, info_of(uid, len(objects)), tmp_path)


def test_the_stub_serves_an_honest_series_across_listing_pages(
        stub: S3Stub, dicoms: tuple[str, dict[str, bytes]], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    stub.page = 2  # three pages for five objects
    uid, objects = dicoms
    staged = stage_stub(stub, dicoms, tmp_path, cache)
    checks.check_series(uid, info_of(uid, len(objects)), staged.entries, staged.md5_list,
                        md5_required=True)


def test_403_access_denied_is_final_and_says_why(
        stub: S3Stub, dicoms: tuple[str, dict[str, bytes]], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    stub.faults[sorted(dicoms[1])[0]] = "denied"
    with pytest.raises(ApiError, match=r"HTTP 403 AccessDenied: the bucket refuses "
                                       r"anonymous access") as caught:
        stage_stub(stub, dicoms, tmp_path, cache)
    assert not classify(caught.value).retry


def test_a_redirect_to_another_host_is_not_followed(
        stub: S3Stub, dicoms: tuple[str, dict[str, bytes]], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    stub.faults[sorted(dicoms[1])[0]] = "redirect"
    with pytest.raises(ApiError, match=r"redirected to another host \(http://localhost:1\); "
                                       r"not followed") as caught:
        stage_stub(stub, dicoms, tmp_path, cache)
    assert not classify(caught.value).retry


def test_an_object_longer_than_listed_is_refused(
        stub: S3Stub, dicoms: tuple[str, dict[str, bytes]], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    bad = sorted(dicoms[1])[0]
    stub.faults[bad] = "longer"
    with pytest.raises(IntegrityError, match="longer than the"):
        stage_stub(stub, dicoms, tmp_path, cache)


@pytest.mark.parametrize(("listing", "message"), [
    ("truncated", "more follow but gives no continuation token"),
    ("doctype", "declares a DTD"),
    ("outside", "unexpected key 'elsewhere/x.dcm'"),
    ("slash", "unexpected key"),
])
def test_a_bad_listing_is_an_integrity_error_naming_it(
        stub: S3Stub, dicoms: tuple[str, dict[str, bytes]], listing: str, message: str,
        cache: dict[Any, Any]) -> None:
    stub.listing = listing
    with pytest.raises(IntegrityError, match=message) as caught, \
            stub_opener(stub, dicoms).open_stream(cache):
        pass
    assert str(caught.value).startswith(f"series {dicoms[0]}")


def test_abort_from_another_thread_ends_a_blocked_stream_and_closes_its_socket(
        stub: S3Stub, dicoms: tuple[str, dict[str, bytes]], cache: dict[Any, Any]) -> None:
    stub.faults[sorted(dicoms[1])[0]] = "stall"
    with stub_opener(stub, dicoms, inflight=1).open_stream(cache) as stream, \
            consumed_until_aborted(stream) as outcome:
        # half the first object is out and the server holds the rest: the consumer
        # waits for it, its fetcher is blocked in recv
        assert stub.stalled.wait(30)
    assert len(outcome) == 1 and isinstance(outcome[0], NetworkError)
    assert "cancelled" in str(outcome[0])
    assert stub.released.wait(30), "the stalled object's connection stayed open"


def test_the_window_opens_while_the_consumer_starves(cache: dict[Any, Any]) -> None:
    """The first of 20 objects stalls: the consumer waits, and the window doubles from
    START_INFLIGHT to the most allowed (8): objects 0 to 7 are requested, no more."""
    prefix = str(uuid.uuid4())
    objects = {f"{prefix}/{i:02d}.dcm": bytes([i]) * 5000 for i in range(20)}
    keys = sorted(objects)
    with S3Stub(objects=objects) as srv:
        srv.faults[keys[0]] = "stall"
        with opener(srv.url, prefix, "1.2", len(objects), inflight=8).open_stream(cache) \
                as stream, consumed_until_aborted(stream) as outcome:
            assert srv.stalled.wait(30) and srv.requested(8).wait(30)
            assert stream.window == 8
        assert sorted(srv.gets) == keys[:8]
    assert isinstance(outcome[0], NetworkError)


def test_list_page_refuses_what_is_not_a_plain_listing() -> None:
    ok = (b'<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>p/a.dcm</Key>'
          b'<Size>3</Size><ETag>"0123456789abcdef0123456789abcdef"</ETag></Contents>'
          b'<Contents><Key>p/b.dcm</Key><Size>4</Size><ETag>"abc-2"</ETag></Contents>'
          b'</ListBucketResult>')
    objects, token = list_page(ok, "t", "p/")
    assert token is None
    assert objects == [S3Object("p/a.dcm", 3, "0123456789abcdef0123456789abcdef"),
                       S3Object("p/b.dcm", 4, "abc-2")]
    assert objects[0].md5 and objects[1].md5 is None
    for bad, message in [
        (ok.replace(b"p/a.dcm", b"p/../a.dcm"), "unexpected key"),
        (ok.replace(b"p/a.dcm", b"p/md5hashes.csv"), "unexpected key"),
        (ok.replace(b"p/a.dcm", b"p/a b.dcm"), "unexpected key"),
        (ok.replace(b"p/a.dcm", b"p/.hidden"), "unexpected key"),
        (ok.replace(b"<Size>3", b"<Size>-3"), "the size"),
        (b"<Error><Code>x</Code></Error>", "not a listing"),
        (b"not xml", "not XML"),
    ]:
        with pytest.raises(IntegrityError, match=message):
            list_page(bad, "t", "p/")


# ----------------------------------------------------------------------------- the reader


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 600_000), min_size=1, max_size=6),
       cuts=st.lists(st.integers(1, 700_000), max_size=12))
def test_the_reader_cuts_any_chunking_back_into_the_objects(sizes: list[int],
                                                            cuts: list[int]) -> None:
    from nbia_retriever._zipstream import EntryData, EntryEnd, EntryStart
    from nbia_retriever.idc.stream import ObjectReader

    bodies = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    objects = [S3Object(f"p/o{i}.dcm", len(b), hashlib.md5(b).hexdigest() if i % 2 else "x-2")
               for i, b in enumerate(bodies)]
    stream, chunks, pos = b"".join(bodies), [], 0
    for cut in cuts:
        chunks.append(stream[pos:pos + cut])
        pos += cut
    chunks.append(stream[pos:])
    reader = ObjectReader(objects, what="series 1")
    got: dict[str, bytearray] = {}
    order: list[tuple[str, str]] = []
    for event in [ev for c in chunks for ev in reader.feed(c)] + list(reader.close()):
        if isinstance(event, EntryStart):
            order.append(("start", event.name))
            got[event.name] = bytearray()
        elif isinstance(event, EntryData):
            got[order[-1][1]] += event.data
        elif isinstance(event, EntryEnd):
            order.append(("end", event.name))
            assert event.size == len(got[event.name])
    names = [o.name for o in objects] + [MD5_ENTRY]
    assert order == [(kind, n) for n in names for kind in ("start", "end")]
    assert [bytes(got[o.name]) for o in objects] == bodies
    assert reader.finished
    listed = checks.parse_md5_list(bytes(got[MD5_ENTRY]), "1")
    assert listed == {o.name: o.etag for i, o in enumerate(objects) if i % 2}


def test_the_reader_refuses_a_short_or_long_stream_and_its_caps() -> None:
    from nbia_retriever.errors import UnsafeArchiveError
    from nbia_retriever.idc.stream import ObjectReader

    objects = [S3Object("p/a.dcm", 3, "x"), S3Object("p/b.dcm", 2, "y")]
    short = ObjectReader(objects, what="series 1")
    list(short.feed(b"abcd"))
    with pytest.raises(IntegrityError, match=r"ended inside object p/b.dcm after 1 of its 2"):
        list(short.close())
    assert not short.finished
    long = ObjectReader(objects, what="series 1")
    with pytest.raises(IntegrityError, match="1 bytes more than the objects' listed sizes"):
        list(long.feed(b"abcdef"))
    with pytest.raises(IntegrityError):  # and forever after
        list(long.feed(b""))
    with pytest.raises(UnsafeArchiveError, match="beyond the 4 allowed"):
        list(ObjectReader(objects, what="series 1", max_total_size=4).feed(b"a"))
    with pytest.raises(UnsafeArchiveError, match="more than the 1 allowed"):
        list(ObjectReader(objects, what="series 1", max_entries=2).close())


def test_the_streams_of_a_process_share_one_buffer_budget(cache: dict[Any, Any]) -> None:
    """12 series of 16 x 1 MiB at once through one transport: each stream's share of
    PROCESS_BYTES and of PROCESS_FETCHES shrinks as streams join (never below one read,
    two objects), every byte arrives, and the process holds about PROCESS_BYTES plus a
    slot per stream, not 12 x 8 MiB."""
    from nbia_retriever.idc.stream import (
        PIECE_SIZE,
        PROCESS_BYTES,
        PROCESS_FETCHES,
        SLOT_BYTES,
    )

    series = {}
    objects: dict[str, bytes] = {}
    for s in range(12):
        prefix = str(uuid.uuid4())
        series[prefix] = {f"{prefix}/{i:02d}.dcm": bytes([s, i]) * (512 << 10)
                          for i in range(16)}
        objects.update(series[prefix])
    with S3Stub(objects=objects) as srv:
        streams = [opener(srv.url, p, f"1.2.{n}", 16, inflight=16).open_stream(cache)
                   for n, p in enumerate(series)]
        opened = [s.__enter__() for s in streams]
        fetchers = opened[0]._fetchers
        assert fetchers.budget() == 8 << 20  # none reading yet: the stream's own cap
        barrier = threading.Barrier(len(opened))
        got: dict[int, dict[str, str]] = {}
        tracemalloc.start()
        try:
            def consume(n: int, stream: IdcStream) -> None:
                chunks = stream.chunks()
                first = next(chunks)
                barrier.wait()  # all 12 are reading: the share is PROCESS_BYTES / 12
                assert fetchers.budget() == PROCESS_BYTES // 12
                assert fetchers.window() == PROCESS_FETCHES // 12  # objects in flight
                digests, objs = {}, iter(stream.objects)
                obj, left, md5 = next(objs), 0, hashlib.md5()
                left = obj.size
                for chunk in itertools.chain([first], chunks):  # hashed as it comes
                    view = memoryview(chunk)
                    while view:
                        take = min(left, len(view))
                        md5.update(view[:take])
                        view, left = view[take:], left - take
                        if left == 0:
                            digests[obj.key] = md5.hexdigest()
                            obj = next(objs, obj)
                            left, md5 = obj.size, hashlib.md5()
                got[n] = digests

            threads = [threading.Thread(target=consume, args=(n, s))
                       for n, s in enumerate(opened)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            for s in streams:
                s.__exit__(None, None, None)
    assert fetchers.streams == 0 and fetchers.budget() == 8 << 20
    for n, prefix in enumerate(series):
        assert got[n] == {k: hashlib.md5(v).hexdigest() for k, v in series[prefix].items()}
    # the shared budget, and per stream its current object's slot and one read per fetcher
    bound = PROCESS_BYTES + 12 * (SLOT_BYTES + 16 * PIECE_SIZE)
    assert peak < bound, f"peak {peak / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- fetchers stage
# (issue 23's speed work: the threads that read the sockets hash and write the objects
# themselves; only a record per object crosses threads)


def test_the_fetchers_write_the_objects_and_only_ticks_cross_threads(
        stub: S3Stub, dicoms: tuple[str, dict[str, bytes]], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    from nbia_retriever.engine.staging import HEADER_BYTES, EntryFile, part_name

    objects = dicoms[1]
    folder = tmp_path / "f"
    folder.mkdir()
    looked: list[int] = []
    with stub_opener(stub, dicoms, inflight=3).open_stream(cache) as stream:
        reader = stream.reader(max_total_size=None, max_entries=100)
        reader.stage_into(folder, looked.append)  # type: ignore[attr-defined]
        chunks = list(stream.chunks())
        events = [ev for chunk in chunks for ev in reader.feed(chunk)]
        tail = list(reader.close())
    assert chunks and set(chunks) == {b""}  # no byte crossed threads
    keys = sorted(objects)
    assert [type(ev) for ev in events] == [EntryFile] * len(keys)
    for n, (ev, key) in enumerate(zip(events, keys, strict=True), 1):
        data = objects[key]
        assert isinstance(ev, EntryFile)
        assert (ev.name, ev.part, ev.size) == (key.rpartition("/")[2], part_name(n), len(data))
        assert ev.md5 == hashlib.md5(data).hexdigest() and ev.header == data[:HEADER_BYTES]
        assert (folder / ev.part).read_bytes() == data
    assert reader.finished and tail[-1].name == MD5_ENTRY  # type: ignore[union-attr]
    assert stream.bytes_received == sum(len(b) for b in objects.values())
    assert looked == []  # under SPACE_CHECK_BYTES: no look yet


def test_a_full_disk_seen_by_a_fetcher_fails_the_series_and_no_writer_is_left(
        tmp_path: Path, cache: dict[Any, Any]) -> None:
    """The free-space look runs in the fetchers (every SPACE_CHECK_BYTES they write):
    its DiskFullError reaches the consumer, and close() returns only once no fetcher
    writes into the folder the engine removes next."""
    from nbia_retriever.engine.staging import SPACE_CHECK_BYTES
    from nbia_retriever.errors import DiskFullError

    prefix = str(uuid.uuid4())
    objects = {f"{prefix}/{i:02d}.dcm": bytes([i]) * (700 << 10) for i in range(6)}
    looks: list[int] = []

    def full(written: int) -> None:  # a disk that filled after the first interval
        looks.append(written)
        raise DiskFullError("disk space: test disk is down to 0 MB free")

    folder = tmp_path / "f"
    folder.mkdir()
    with S3Stub(objects=objects) as srv, pytest.raises(DiskFullError, match="down to 0"), \
            opener(srv.url, prefix, "1.2", len(objects), inflight=4).open_stream(
                cache) as stream:
        reader = stream.reader(max_total_size=None, max_entries=100)
        reader.stage_into(folder, full)  # type: ignore[attr-defined]
        for chunk in stream.chunks():
            list(reader.feed(chunk))
    assert looks and looks[0] >= SPACE_CHECK_BYTES
    assert stream._writers == 0


def test_abort_while_a_fetcher_writes_leaves_no_writer_after_close(
        stub: S3Stub, dicoms: tuple[str, dict[str, bytes]], tmp_path: Path,
        cache: dict[Any, Any]) -> None:
    """A stalled object half written: abort ends the consumer, close() waits for the
    fetcher to let go of its file, and the folder can then be removed and reused."""
    key = sorted(dicoms[1])[0]
    stub.faults[key] = "stall"
    folder = tmp_path / "f"
    folder.mkdir()
    with stub_opener(stub, dicoms, inflight=1).open_stream(cache) as stream:
        reader = stream.reader(max_total_size=None, max_entries=100)
        reader.stage_into(folder, lambda n: None)  # type: ignore[attr-defined]
        with consumed_until_aborted(stream) as outcome:
            assert stub.stalled.wait(30)
    assert stream._writers == 0
    assert isinstance(outcome[0], NetworkError) and "cancelled" in str(outcome[0])
    import shutil

    shutil.rmtree(folder)  # nothing writes there any more
    assert not folder.exists()


def test_stage_series_refuses_an_entry_file_out_of_its_order(tmp_path: Path) -> None:
    """A source's EntryFile must be the next numbered part: a second series' records, or
    a bug that skips one, never become another entry's file."""
    from nbia_retriever.engine.staging import EntryFile, part_name
    from nbia_retriever.errors import UnsafeArchiveError

    class Reader:
        finished = True

        def __init__(self, **caps: Any) -> None:
            self.folder: Path | None = None

        def stage_into(self, folder: Path, look: Callable[[int], None]) -> None:
            self.folder = folder

        def feed(self, data: bytes) -> Iterator[Any]:
            assert self.folder is not None
            (self.folder / part_name(2)).write_bytes(b"x")
            return iter([EntryFile("a.dcm", part_name(2), 1, hashlib.md5(b"x").hexdigest(),
                                   b"x")])

        def close(self) -> Iterator[Any]:
            return iter(())

    with pytest.raises(UnsafeArchiveError, match="out of order"):
        stage_series("1.2", info_of("1.2", 1), [b""], tmp_path / "s", root=tmp_path,
                     checkpoint=lambda: None, progress=Progress(),
                     on_progress=lambda n: None, reader=Reader)


def test_a_consumer_that_stops_ticking_stops_the_fetchers_after_disk_ahead(
        tmp_path: Path, cache: dict[Any, Any]) -> None:
    """A paused run (stage_series holds in checkpoint between ticks): the fetchers write
    at most DISK_AHEAD past the consumer's last tick, then wait; the next ticks renew
    their credit and every object arrives whole."""
    from nbia_retriever.engine.staging import EntryFile
    from nbia_retriever.idc.stream import DISK_AHEAD

    prefix = str(uuid.uuid4())
    size = DISK_AHEAD // 2 + 12345
    objects = {f"{prefix}/{i:02d}.dcm": bytes([i]) * size for i in range(5)}
    folder = tmp_path / "f"
    folder.mkdir()
    with S3Stub(objects=objects) as srv, \
            opener(srv.url, prefix, "1.2", len(objects), inflight=5).open_stream(
                cache) as stream:
        reader = stream.reader(max_total_size=None, max_entries=100)
        reader.stage_into(folder, lambda n: None)  # type: ignore[attr-defined]
        ticks = stream.chunks()
        events = list(reader.feed(next(ticks)))
        with stream._lock:  # paused: no tick; the fetchers hold once the credit is spent
            at_tick = stream.bytes_received - stream._unacked
            while stream.held == 0:
                assert stream._tick.wait(30)
            assert stream.bytes_received - at_tick <= DISK_AHEAD
        for tick in ticks:  # resumed
            events += reader.feed(tick)
        tail = list(reader.close())
    assert [ev.name for ev in events if isinstance(ev, EntryFile)] == [
        k.rpartition("/")[2] for k in sorted(objects)]
    assert all(ev.md5 == hashlib.md5(objects[f"{prefix}/{ev.name}"]).hexdigest()
               for ev in events if isinstance(ev, EntryFile))
    assert reader.finished and tail[-1].name == MD5_ENTRY  # type: ignore[union-attr]
