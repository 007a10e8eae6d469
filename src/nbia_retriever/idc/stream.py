"""One IDC series as a byte stream the engine stages without a zip.

IDC keeps a series as one object per instance under ``<crdc_series_uuid>/``. The engine
stages a series from one ordered stream of bytes and a reader that cuts it into entries
(:func:`~nbia_retriever.engine.staging.stage_series`), so this module gives it both:

* :class:`IdcStream` lists the series (:func:`~.s3.list_objects`), checks the listing
  against the index (as many objects as ``instanceCount``, no two names alike), then
  fetches the objects ``inflight`` at a time and yields their bytes in key order. S3
  answers each GET alone and serves many at once, so per-instance requests in flight
  hide each request's latency, which is most of the time of a ~500 KB CT slice.
* :meth:`IdcStream.reader` cuts that stream back into the objects by their listed sizes
  and emits the zip reader's events (:class:`~nbia_retriever._zipstream.EntryStart`,
  ``EntryData``, ``EntryEnd``), then a synthetic ``md5hashes.csv`` holding each
  object's ETag where the ETag is a plain MD5. The engine's own MD5 check then compares
  the bytes it wrote with the ETags, exactly as it compares an NBIA zip's entries with
  the server's list: one staging path, one set of checks, for both sources.

How the engine stages a series (:func:`~nbia_retriever.engine.staging.stage_series`
calls the reader's ``stage_into``): the fetchers write the objects themselves. Each
thread that reads an object's socket hashes it, writes it into the series' staging folder
and keeps its first bytes (the header), so no byte crosses threads and the hashing and
writing of several objects run beside each other, outside the GIL; the consumer only
takes a small :class:`~nbia_retriever.engine.staging.EntryFile` record per object, in
key order. Measured (``benchmarks/idc.py``, interleaved with the byte path): the same on
small objects (the CPU per GB is the transfer's, not the handing over), and 0.54x ->
0.82x s5cmd on objects far larger than a read far from the bucket (``slowbig``: 8 MiB
objects at 10 MB/s per connection), which the byte path's budget (below) fetched about
one at a time. Memory then holds no object's bytes at all: one read and one header per
object in flight; what the fetchers may write past the consumer's last tick is bounded
(:data:`DISK_AHEAD`), so a paused run stops soon.

Without ``stage_into`` (a consumer of the bytes themselves) memory stays flat in object
and series size this way: object ``j`` is requested only once the
consumer finished object ``j - inflight``, and the objects after the one being consumed
share a budget of :data:`BUFFER_BYTES` (8 MiB) ahead of the consumer, the current one
up to :data:`SLOT_BYTES` more (a fetcher with no room waits, not reading its socket),
and the streams of one process share :data:`PROCESS_BYTES` (32 MiB) of such budgets (an
IDC run streams up to 64 series at once: 8 MiB each made a worker process 120 MB),
so a stream holds at most that plus one read per object in flight, whatever the sizes
and however many are in flight. Small objects (a CT slice) are then fetched ``inflight``
at once; one object far larger than the budget at the head of the queue holds the
others back until it is consumed.

How many objects are in flight adapts: :data:`START_INFLIGHT` at first, doubled (up to
``inflight``) every :data:`GROW_AFTER` (5 ms) the consumer waits for bytes. On a fast
link the consumer (hashing and writing) is the bottleneck and seldom waits that long,
and a few fetchers leave the cores to it: on loopback 64 threads from the start cost
5.1 CPU s/GB against 3.5. Far from the bucket each object waits a round trip (tens of
ms) before its first byte, and the window opens to ``inflight`` within that first wait.

The fetchers are long-lived threads shared by every stream of one transport
(:class:`Fetchers`, kept in the opener's ``cache``), so each keeps its keep-alive
connection from object to object and series to series: a thread per object would open
a connection per object, and a thread that ended would leave its socket open.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import re
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._zipstream import EntryData, EntryEnd, EntryStart, ZipEvent
from ..api.http import Origin, Response, Transport
from ..engine.pieces import CutReader, md5_listing
from ..engine.staging import HEADER_BYTES, SPACE_CHECK_BYTES, EntryFile, part_name
from ..errors import IntegrityError, NbiaError, NetworkError, UnsafeArchiveError
from ..untrusted import quote
from .s3 import S3Object, get_object, list_objects

__all__ = ["BUFFER_BYTES", "GROW_AFTER", "INFLIGHT", "PROCESS_BYTES", "PROCESS_FETCHES",
           "SLOT_BYTES", "START_INFLIGHT", "Fetchers", "IdcOpener", "IdcStream",
           "ObjectReader", "StagingReader"]

#: Objects of one series requested at once at most, by default.
INFLIGHT = 8
#: ... and at first: the window doubles each time the consumer has waited this long for
#: bytes (module docstring).
START_INFLIGHT = 2
GROW_AFTER = 0.005
#: Most objects a series the index gives no count for may list (the largest TCIA series
#: hold a few thousand images).
UNCOUNTED_LIMIT = 100_000
#: Bytes the object being consumed may hold ahead of the consumer (4 reads of 256 KiB).
SLOT_BYTES = 1024 * 1024
#: Bytes the objects after it may hold together, however many are in flight.
BUFFER_BYTES = 8 * 1024 * 1024
#: ... and the streams of one process together (each at least one read).
PROCESS_BYTES = 32 * 1024 * 1024
#: Objects the streams of one process fetch at once, shared out like PROCESS_BYTES (each
#: stream at least 2): every fetch holds a connection's 256 KiB read buffer and a read,
#: so 16 streams x 8 made a worker process 85 MB; 64 connections are 640 MB/s even at
#: 10 MB/s each.
PROCESS_FETCHES = 64
#: Bytes a stream's fetchers may write to disk ahead of the consumer's last tick when
#: they stage the objects themselves (:meth:`IdcStream.stage_into`): how far a paused run
#: goes on, and how coarse the progress of one huge object is.
DISK_AHEAD = 16 * 1024 * 1024
#: Largest piece handed out in one ``EntryData`` (as the zip reader's).
PIECE_SIZE = 256 << 10
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", re.ASCII)


class Fetchers:
    """Long-lived threads that run fetch jobs on one :class:`Transport` (module
    docstring). A job is handed to an idle thread, or a new one when none is idle, so a
    job never waits behind another stream's: the threads are as many as the most
    objects ever in flight at once. :meth:`close` ends the threads and closes the
    transport's connections (a long-lived program runs many downloads)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False
        self.threads = 0
        #: Streams of this process reading now (they share PROCESS_BYTES).
        self.streams = 0

    def submit(self, job: Callable[[], None], fail: Callable[[NbiaError], None]) -> None:
        """Run ``job`` on a fetcher thread; ``fail`` instead when none can be had (a
        pids limit, or after :meth:`close`): the stream fails, it never waits forever."""
        with self._lock:
            closed = self._closed
            spare = self._idle > 0 and not closed
            if spare:
                self._idle -= 1
            elif not closed:
                self.threads += 1
        if closed:
            fail(NetworkError("the IDC fetchers are closed"))
            return
        if not spare:
            try:
                threading.Thread(target=self._serve, name="idc-fetch", daemon=True).start()
            except RuntimeError as exc:  # no thread to be had
                with self._lock:
                    self.threads -= 1
                fail(NetworkError(f"no thread for another IDC request ({exc})"))
                return
        self._jobs.put(job)

    def budget(self) -> int:
        """What one stream's objects after its current one may hold now."""
        return max(PIECE_SIZE, min(BUFFER_BYTES, PROCESS_BYTES // max(1, self.streams)))

    def window(self) -> int:
        """The most objects one stream may have in flight now."""
        return max(2, PROCESS_FETCHES // max(1, self.streams))

    def joined(self, delta: int) -> None:
        with self._lock:
            self.streams += delta

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with contextlib.suppress(BaseException):
                job()
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        with self._lock:
            self._closed, count = True, self.threads
            self.threads = self._idle = 0
        for _ in range(count):
            self._jobs.put(None)
        self.transport.close()


@dataclass(frozen=True, slots=True)
class IdcOpener:
    """One IDC series, opened in the engine or in a worker process (picklable: plain
    values only, no credential: the buckets are anonymous)."""

    endpoint: str
    bucket: str
    crdc_series_uuid: str
    series_uid: str
    #: None: the index does not say (prior_versions_index has no count): the listing
    #: decides, up to :data:`UNCOUNTED_LIMIT` objects.
    instance_count: int | None
    timeout: float = 60.0
    connect_timeout: float = 30.0
    verify: bool = True
    inflight: int = INFLIGHT

    @property
    def what(self) -> str:
        return f"series {self.series_uid}"

    def secrets(self) -> tuple[str, ...]:
        return ()

    def open_stream(self, cache: dict[Hashable, Any]) -> contextlib.AbstractContextManager[
            IdcStream]:
        key = ("idc", self.timeout, self.connect_timeout, self.verify)
        fetchers = cache.get(key)
        if fetchers is None:
            fetchers = cache.setdefault(key, Fetchers(Transport(
                timeout=self.timeout, connect_timeout=self.connect_timeout,
                verify=self.verify)))
        return _opened(IdcStream(self, fetchers))


@contextlib.contextmanager
def _opened(stream: IdcStream) -> Iterator[IdcStream]:
    try:
        stream.list()
        yield stream
    finally:
        stream.close()


class _Slot:
    """One object's bytes between its fetcher and the consumer."""

    __slots__ = ("buffered", "chunks", "done", "entry", "index", "obj", "ready")

    def __init__(self, index: int, obj: S3Object, lock: threading.Lock) -> None:
        self.index = index
        self.obj = obj
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.done = False
        self.ready = threading.Condition(lock)
        #: Staged by its fetcher (IdcStream.stage_into): the file, once whole.
        self.entry: EntryFile | None = None


class _Stopped(Exception):
    """The stream was aborted or failed: a fetcher stops quietly."""


class IdcStream:
    """The objects of one series, in key order, as one stream (module docstring)."""

    def __init__(self, opener: IdcOpener, fetchers: Fetchers) -> None:
        self.opener = opener
        self._fetchers = fetchers
        self.what = f"series {opener.series_uid} (IDC {Origin.of(opener.endpoint).label})"
        self.objects: list[S3Object] = []
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        #: Fetchers of the objects after the current one wait here for room.
        self._space = threading.Condition(self._lock)
        self._joined = False
        self._buffered = 0
        self._current = 0
        #: Objects requested ahead of the consumer now (grows up to ``inflight``).
        self.window = 0
        self._live: set[Response] = set()
        self._error: BaseException | None = None
        self._aborted = False
        self._received = 0
        self._started = False
        # Staged by the fetchers (stage_into): where, what they wrote and the consumer
        # has not yet ticked past, the free-space check, the writers still at work.
        self._folder: Path | None = None
        self._look: Callable[[int], None] | None = None
        self._unacked = 0
        #: Fetchers waiting for the consumer's next tick now (DISK_AHEAD written).
        self.held = 0
        self._next_look = SPACE_CHECK_BYTES
        self._writers = 0
        self._tick = threading.Condition(self._lock)
        self._ready: deque[EntryFile] = deque()

    # -- listing -------------------------------------------------------------------------
    def list(self) -> list[S3Object]:
        """List the series and check the listing against the index (module docstring)."""
        opener, what = self.opener, self.what
        if not _UUID.fullmatch(opener.crdc_series_uuid):
            raise IntegrityError(f"{what}: the index gives crdc_series_uuid "
                                 f"{quote(opener.crdc_series_uuid, 60)!r}, not a UUID")
        if not _BUCKET.fullmatch(opener.bucket):
            raise IntegrityError(f"{what}: the index gives the bucket "
                                 f"{quote(opener.bucket, 80)!r}, not a bucket name")
        expected = opener.instance_count
        limit = UNCOUNTED_LIMIT if expected is None else max(2 * expected, expected + 1000)
        objects = list_objects(self._fetchers.transport, opener.endpoint, opener.bucket,
                               opener.crdc_series_uuid + "/", what=what, limit=limit)
        if expected is None and not objects:
            raise IntegrityError(f"{what}: the listing of s3://{opener.bucket}/"
                                 f"{opener.crdc_series_uuid}/ is empty")
        if expected is not None and len(objects) != expected:
            raise IntegrityError(f"{what}: the listing of s3://{opener.bucket}/"
                                 f"{opener.crdc_series_uuid}/ has {len(objects)} objects, "
                                 f"the index says {expected}")
        names: set[str] = set()
        for obj in objects:
            folded = obj.name.casefold()
            if folded in names:
                raise IntegrityError(f"{what}: two objects are named {quote(obj.name, 80)} "
                                     "(differing only in case)")
            names.add(folded)
        self.objects = objects
        return objects

    def reader(self, *, max_total_size: int | None = None,
               max_entries: int = 1_000_000) -> ObjectReader:
        """A reader of this stream's bytes with the zip reader's interface; it has
        ``stage_into`` (:class:`~nbia_retriever.engine.staging.EntryReader`): the
        fetchers then write the objects themselves (:meth:`stage_into`)."""
        return StagingReader(self, max_total_size=max_total_size, max_entries=max_entries)

    def stage_into(self, folder: Path, look: Callable[[int], None]) -> None:
        """Before :meth:`chunks`: each fetcher writes its object into ``folder`` (as
        :func:`~nbia_retriever.engine.staging.part_name` numbers them in key order),
        hashing it as it writes, and keeps its first bytes; :meth:`chunks` then yields
        empty ticks, and the finished objects wait in key order for
        :meth:`take_ready` (the reader's). No object then waits for the consumer's
        budget: a series of big objects is fetched ``inflight`` at once (module
        docstring: the measurement)."""
        if self._started:
            raise RuntimeError("IdcStream.stage_into() after chunks()")
        self._folder, self._look = folder, look

    def take_ready(self) -> tuple[EntryFile, ...]:
        """The objects staged whole since the last call, in key order."""
        with self._lock:
            ready = tuple(self._ready)
            self._ready.clear()
        return ready

    # -- the ByteStream ------------------------------------------------------------------
    @property
    def bytes_received(self) -> int:
        return self._received

    def chunks(self) -> Iterator[bytes]:
        """The objects' bytes in key order, fetched up to ``inflight`` objects ahead
        (the window grows from :data:`START_INFLIGHT` while the consumer waits for
        bytes: module docstring)."""
        if self._started:
            raise RuntimeError("IdcStream.chunks() twice")
        self._started = True
        self._joined = True
        self._fetchers.joined(1)
        lock = self._lock
        with lock:
            self._slots = [_Slot(i, obj, lock) for i, obj in enumerate(self.objects)]
        if self._folder is not None:
            yield from self._staged_ticks()
            return
        slots = self._slots
        most = max(1, self.opener.inflight)
        window = self.window = min(START_INFLIGHT, most, self._fetchers.window())
        submitted = 0
        for i, slot in enumerate(slots):
            while True:
                ahead = min(window, self._fetchers.window())  # streams joined since
                while submitted < len(slots) and submitted < i + ahead:
                    self._submit(slots[submitted])
                    submitted += 1
                with lock:
                    starved = False
                    while not slot.chunks and not slot.done and self._error is None \
                            and not self._aborted:
                        if window < min(most, self._fetchers.window()) and \
                                submitted < len(slots):
                            if not slot.ready.wait(GROW_AFTER):
                                starved = not slot.chunks and not slot.done
                                break
                        else:
                            slot.ready.wait()
                    if starved and self._error is None and not self._aborted:
                        # waiting on the link, not the disk or the CPU: open the window
                        window = self.window = min(most, self._fetchers.window(),
                                                   2 * window)
                        continue
                    if self._error is not None:
                        raise self._error
                    if self._aborted:
                        raise NetworkError(f"{self.what}: stopped (cancelled)")
                    if not slot.chunks:
                        break  # done
                    chunk = slot.chunks.popleft()
                    slot.buffered -= len(chunk)
                    self._buffered -= len(chunk)
                    slot.ready.notify()  # its fetcher, if the slot was full
                    self._space.notify()  # one fetcher of a later object
                yield chunk
            with lock:
                self._current = i + 1
                self._space.notify_all()  # the next object's fetcher is exempt now

    def _staged_ticks(self) -> Iterator[bytes]:
        """:meth:`chunks` when the fetchers stage the objects (:meth:`stage_into`): an
        empty tick each time the next objects in key order are whole, or the fetchers
        wait for credit (:data:`DISK_AHEAD` written since the last tick; renewed at each).
        The window grows as for bytes: while the consumer waits on the link."""
        slots, lock = self._slots, self._lock
        most = max(1, self.opener.inflight)
        window = self.window = min(START_INFLIGHT, most, self._fetchers.window())
        submitted = emitted = 0
        while emitted < len(slots):
            ahead = min(window, self._fetchers.window())
            while submitted < len(slots) and submitted < emitted + ahead:
                self._submit(slots[submitted])
                submitted += 1
            with lock:
                starved = False
                # (a fetcher held for credit is the signal, not the count: the next
                # read may not fit in what is left of DISK_AHEAD)
                while not slots[emitted].done and self._error is None and \
                        not self._aborted and not self.held:
                    if window < min(most, self._fetchers.window()) and \
                            submitted < len(slots):
                        if not self._tick.wait(GROW_AFTER):
                            starved = not slots[emitted].done
                            break
                    else:
                        self._tick.wait()
                if self._error is not None:
                    raise self._error
                if self._aborted:
                    raise NetworkError(f"{self.what}: stopped (cancelled)")
                if starved:
                    window = self.window = min(most, self._fetchers.window(), 2 * window)
                    continue
                self._unacked = 0
                self._space.notify_all()
                while emitted < len(slots) and slots[emitted].done:
                    entry = slots[emitted].entry
                    assert entry is not None
                    self._ready.append(entry)
                    slots[emitted].entry = None
                    emitted += 1
            yield b""

    def abort(self) -> None:
        """From another thread: a blocked :meth:`chunks` ends at once, every object's
        socket is shut down (never reused)."""
        self._stop(None)

    def close(self) -> None:
        """Stop, and wait for the fetchers still writing into the staging folder (their
        sockets are shut, so at most one write each): the engine removes or reuses
        that folder next, and a late write would land in the next attempt's."""
        self._stop(None)
        with self._lock:
            joined, self._joined = self._joined, False
            while self._writers:
                self._tick.wait()
        if joined:
            self._fetchers.joined(-1)

    def _stop(self, error: BaseException | None) -> None:
        with self._lock:
            if error is None:
                self._aborted = True
            elif self._error is None and not self._aborted:
                # the attempt fails: the other objects stop too (after an abort, what
                # the fetchers then meet, a shut socket, is its echo, not a cause)
                self._error = error
            for response in self._live:
                response.abort()
            self._live.clear()
            for slot in self._slots:
                slot.ready.notify_all()
            self._space.notify_all()
            self._tick.notify_all()

    # -- the fetchers' side --------------------------------------------------------------
    def _submit(self, slot: _Slot) -> None:
        fetch = self._fetch if self._folder is None else self._fetch_to_disk
        self._fetchers.submit(lambda: fetch(slot), self._stop)

    def _fetch_to_disk(self, slot: _Slot) -> None:
        """One object into its staged file, hashed and its header kept as it is written
        (:meth:`stage_into`); its record then waits for the consumer in key order."""
        obj, folder = slot.obj, self._folder
        assert folder is not None
        try:
            with self._receiving(obj, writer=True) as chunks:
                part = part_name(slot.index + 1)
                md5 = hashlib.md5(usedforsecurity=False)
                header = bytearray()
                with open(folder / part, "xb") as out:
                    for chunk in chunks:
                        self._credit(len(chunk))
                        out.write(chunk)
                        md5.update(chunk)
                        if len(header) < HEADER_BYTES:
                            header += chunk[:HEADER_BYTES - len(header)]
        except _Stopped:
            return
        except (NbiaError, OSError) as exc:  # staging maps a full disk (OSError) itself
            self._stop(exc)
            return
        except BaseException as exc:  # a bug: still end the consumer's wait, and say so
            self._stop(NbiaError(f"{self.what}: {type(exc).__name__}: {exc}"))
            return
        with self._lock:
            slot.entry = EntryFile(obj.name, part, obj.size, md5.hexdigest(), bytes(header))
            slot.done = True
            self._tick.notify_all()

    @contextlib.contextmanager
    def _receiving(self, obj: S3Object, *, writer: bool = False) -> Iterator[Iterator[bytes]]:
        """The object's bytes as they arrive, checked against the size listed (an
        :class:`IntegrityError` as soon as it is longer, on leaving if it was shorter),
        its response in ``_live`` meanwhile so that :meth:`abort` ends it. Raises
        :class:`_Stopped` once the stream is stopped. A ``writer`` (the fetchers that
        stage) counts in ``_writers``, which the consumer's tick waits for."""
        lock = self._lock
        with lock:
            if self._aborted or self._error is not None:
                raise _Stopped
        got = 0
        with get_object(self._fetchers.transport, self.opener.endpoint,
                        self.opener.bucket, obj, what=self.what) as response:
            with lock:
                if self._aborted or self._error is not None:
                    raise _Stopped
                self._live.add(response)
                if writer:
                    self._writers += 1

            def checked() -> Iterator[bytes]:
                nonlocal got
                for chunk in response.chunks():
                    got += len(chunk)
                    if got > obj.size:
                        raise IntegrityError(f"{self.what}: object {quote(obj.key, 120)} "
                                             f"is longer than the {obj.size} bytes listed")
                    yield chunk

            try:
                yield checked()
            finally:
                with lock:
                    self._live.discard(response)
                    if writer:
                        self._writers -= 1
                        self._tick.notify_all()
        if got != obj.size:
            raise IntegrityError(f"{self.what}: object {quote(obj.key, 120)} ended after "
                                 f"{got} of the {obj.size} bytes listed")

    def _credit(self, n: int) -> None:
        """Room to write ``n`` more bytes: at most :data:`DISK_AHEAD` since the
        consumer's last tick (a paused run stops soon), and the free-space check every
        :data:`SPACE_CHECK_BYTES`."""
        look = 0
        with self._lock:
            while not self._aborted and self._error is None and self._unacked and \
                    self._unacked + n > DISK_AHEAD:
                self.held += 1
                self._tick.notify_all()  # the consumer ticks on a full credit too
                self._space.wait()
                self.held -= 1
            if self._aborted or self._error is not None:
                raise _Stopped
            self._unacked += n
            self._received += n
            if self._received >= self._next_look:
                self._next_look = self._received + SPACE_CHECK_BYTES
                look = self._received
        if look and self._look is not None:
            self._look(look)

    def _fetch(self, slot: _Slot) -> None:
        try:
            with self._receiving(slot.obj) as chunks:
                for chunk in chunks:
                    self._put(slot, chunk)
        except _Stopped:
            return
        except NbiaError as exc:
            self._stop(exc)
        except BaseException as exc:  # a bug: still end the consumer's wait, and say so
            self._stop(NbiaError(f"{self.what}: {type(exc).__name__}: {exc}"))
        with self._lock:
            slot.done = True
            slot.ready.notify_all()

    def _put(self, slot: _Slot, chunk: bytes) -> None:
        """Queue ``chunk`` for the consumer once there is room: the object being
        consumed may always hold up to :data:`SLOT_BYTES` (so the consumer always has
        something coming), the later ones share what the stream's budget leaves (so a
        run of small objects is fetched well ahead, a big one at the head holds the
        others back by at most the budget)."""
        n = len(chunk)
        with self._lock:
            while not self._aborted and self._error is None:
                if slot.index == self._current:
                    if not slot.buffered or slot.buffered + n <= SLOT_BYTES:
                        break
                    slot.ready.wait()
                elif self._buffered + n <= self._fetchers.budget():
                    break
                else:
                    self._space.wait()
            if self._aborted or self._error is not None:
                raise _Stopped
            slot.chunks.append(chunk)
            slot.buffered += n
            self._buffered += n
            self._received += n
            slot.ready.notify_all()


class ObjectReader(CutReader):
    """The objects' concatenated bytes cut back into entries by their listed sizes,
    with :class:`~nbia_retriever._zipstream.ZipStreamReader`'s interface (``feed``,
    ``close``, ``finished``) and caps (``max_total_size``, ``max_entries``). At
    :meth:`close` it adds ``md5hashes.csv`` with the objects whose ETag is a plain MD5.

    Not thread-safe: one reader per attempt. After an error it re-raises it forever.
    """

    def __init__(self, objects: Sequence[S3Object], *, what: str,
                 max_total_size: int | None = None, max_entries: int = 1_000_000) -> None:
        self._objects = objects
        self._what = what
        self.max_total_size = max_total_size
        self.max_entries = max_entries
        self.bytes_in = 0
        self.bytes_out = 0
        self._index = 0
        self._left = objects[0].size if objects else 0
        self._open = False  # EntryStart of the current object was emitted
        self._checked = False
        self._closed = False
        self._done = False
        self._error: NbiaError | None = None

    @property
    def finished(self) -> bool:
        """True once every object arrived whole and the MD5 list was emitted."""
        return self._done

    def _check_caps(self) -> None:
        if self._checked:
            return
        self._checked = True
        if len(self._objects) + 1 > self.max_entries:
            self._fail(UnsafeArchiveError(f"{self._what}: {len(self._objects)} objects, more "
                                          f"than the {self.max_entries - 1} allowed"))
        total = sum(o.size for o in self._objects)
        if self.max_total_size is not None and total > self.max_total_size:
            self._fail(UnsafeArchiveError(f"{self._what}: the objects add up to {total:,} "
                                          f"bytes, beyond the {self.max_total_size:,} allowed"))

    def _fail(self, error: NbiaError) -> None:
        self._error = error
        raise error

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[ZipEvent]:
        """The events ``data`` completes (lazily: run it to its end before the next)."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError("ObjectReader.feed() after close()")
        self._check_caps()
        view = memoryview(data)
        if view.ndim != 1 or view.format not in ("B", "b", "c"):
            view = view.cast("B")
        self.bytes_in += len(view)
        return self._events(view)

    def _cut(self, view: memoryview) -> Iterator[ZipEvent]:
        objects, pos, end = self._objects, 0, len(view)
        while self._index < len(objects):
            obj = objects[self._index]
            if not self._open:
                self._open = True
                yield EntryStart(obj.name, False)
            if self._left == 0:
                yield EntryEnd(obj.name, 0, obj.size, obj.size)
                self._index += 1
                self._open = False
                if self._index < len(objects):
                    self._left = objects[self._index].size
                continue
            if pos >= end:
                return
            take = min(self._left, end - pos, PIECE_SIZE)
            piece = view[pos:pos + take]
            pos += take
            self._left -= take
            self.bytes_out += take
            yield EntryData(piece)
        if pos < end:
            raise IntegrityError(f"{self._what}: {end - pos} bytes more than the objects' "
                                 "listed sizes")

    def close(self) -> Iterator[ZipEvent]:
        """The end of the stream: the zero-byte objects still due, then the MD5 list;
        :class:`IntegrityError` at once when an object is incomplete."""
        if self._error is not None:
            raise self._error
        self._closed = True
        self._check_caps()
        tail = list(self._events(memoryview(b"")))
        if self._index < len(self._objects):
            obj = self._objects[self._index]
            self._fail(IntegrityError(
                f"{self._what}: the stream ended inside object {quote(obj.key, 120)} after "
                f"{obj.size - self._left} of its {obj.size} bytes"))
        self._done = True
        return md5_listing(tail, ((o.name, o.md5) for o in self._objects))


class StagingReader(ObjectReader):
    """:class:`ObjectReader` for a stream whose fetchers may stage the objects
    themselves: with ``stage_into`` called (by
    :func:`~nbia_retriever.engine.staging.stage_series`) it emits their
    :class:`~nbia_retriever.engine.staging.EntryFile` records, in key order, for the
    stream's ticks; otherwise it cuts bytes as :class:`ObjectReader` does."""

    def __init__(self, stream: IdcStream, *, max_total_size: int | None = None,
                 max_entries: int = 1_000_000) -> None:
        super().__init__(stream.objects, what=stream.what, max_total_size=max_total_size,
                         max_entries=max_entries)
        self._stream = stream
        self._staged = False

    def stage_into(self, folder: Path, look: Callable[[int], None]) -> None:
        self._check_caps()  # before the first request, as for bytes
        self._stream.stage_into(folder, look)
        self._staged = True

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[ZipEvent]:
        if not self._staged:
            return super().feed(data)
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError("ObjectReader.feed() after close()")
        if len(data):
            raise RuntimeError("StagingReader.feed(): bytes, but the fetchers stage")
        ready = self._stream.take_ready()
        for entry in ready:
            obj = self._objects[self._index]
            # the stream's own records, in its order: a mismatch is a bug here
            assert entry.name == obj.name and entry.size == obj.size
            self._index += 1
            self.bytes_in += entry.size
            self.bytes_out += entry.size
        return iter(ready)  # type: ignore[arg-type]

    def close(self) -> Iterator[ZipEvent]:
        if not self._staged:
            return super().close()
        if self._error is not None:
            raise self._error
        self._closed = True
        if self._index < len(self._objects):
            obj = self._objects[self._index]
            self._fail(IntegrityError(f"{self._what}: the stream ended before object "
                                      f"{quote(obj.key, 120)}"))
        self._done = True
        return md5_listing([], ((o.name, o.md5) for o in self._objects))
