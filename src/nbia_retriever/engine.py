"""The download engine: manifest in, complete and verified series folders out.

How one series travels (each step exists to make a wrong file impossible to publish):

1. The zip is streamed from the socket into :class:`~._zipstream.ZipStreamReader`; each
   entry is inflated, CRC-checked, MD5-hashed and written to
   ``<root>/.nbia/staging/<uid>/`` as it arrives. Memory stays flat in series size.
2. When the stream ends the series is checked as a whole: every image against
   ``md5hashes.csv``, every listed image present, and the image count against the
   metadata. The real server answers a failure mid-series with a *short but valid* zip
   and status 200, so a valid zip proves nothing on its own.
3. Images are named from their DICOM headers (``naming``), the folder is placed by
   ``layout``, and the staged folder is published with a single ``rename``: a crash
   leaves either no folder or a complete one, never half a series.
4. The journal records the series as complete, then ``metadata.csv`` gets its row.

Any failure of an attempt (reset, timeout, 5xx, 429, short zip, bad MD5) discards the
staging folder and retries with exponential backoff and jitter, honouring
``Retry-After``, up to the manifest's ``noOfrRetry``. "Not in public domain" is final.

Threads rather than asyncio: the work per chunk is zlib, MD5 and file writes, all of
which release the GIL, and a thread per worker keeps pause/cancel and the sync httpx
client simple. Front ends (CLI, TUI, Python API) drive an :class:`Engine`; they add no
download logic of their own.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import httpx

from ._dicomtags import fast_tags
from ._zipstream import EntryData, EntryEnd, EntryStart, ZipStreamReader
from .api import Credentials, NbiaClient, backoff_delay
from .errors import (
    ApiError,
    AuthError,
    IntegrityError,
    NbiaError,
    NotPublicError,
    UnsafeArchiveError,
)
from .journal import FileRecord, Journal
from .layout import (
    Layout,
    root_folder_name,
    sanitize_component,
    series_relpath_variants,
    series_relpaths,
)
from .manifest import Manifest, api_base_from_download_url
from .models import SeriesInfo, SeriesState
from .naming import LICENSE_ENTRY, MD5_ENTRY, ImageKey, assign_names, safe_entry_name
from .report import MetadataCsv, Report, SeriesResult, metadata_row

STATE_DIR = ".nbia"
#: Bytes of each image kept in memory to parse its header without reopening the file.
HEADER_BYTES = 64 * 1024
#: Non-image entries we keep in memory (md5 list, license) are capped: a hostile server
#: must not be able to exhaust memory with a huge "LICENSE".
SMALL_ENTRY_CAP = 16 * 1024 * 1024
PROGRESS_STEP = 256 * 1024
_DICOM_TAGS = ("AcquisitionNumber", "InstanceNumber", "SOPInstanceUID")


class Cancelled(Exception):
    """Raised inside a worker when the run is cancelled; never escapes the engine."""


class FatalRunError(NbiaError):
    """Something that stops the whole run (disk full, login refused)."""


@dataclass
class DownloadOptions:
    """Everything a run can be told. Defaults are what a user gets without flags."""

    workers: int = 4
    retries: int | None = None  # None: the manifest's noOfrRetry (default 4)
    timeout: float = 60.0  # seconds without a byte before an attempt fails
    api: str = "auto"
    api_url: str | None = None  # None: derived from the manifest's downloadServerUrl
    layout: Layout | str = Layout.DESCRIPTIVE
    md5: bool = True
    only_failed: bool = False
    credentials: Credentials | None = None
    verify_tls: bool = True
    backoff_base: float = 2.0
    shard: tuple[int, int] | None = None  # (k, n), 1-based k
    max_connections: int | None = None  # cap on concurrent series streams (default: workers)
    adaptive: bool = True  # halve concurrency on 429/503, creep back up on success

    def __repr__(self) -> str:  # never show credentials, even by accident
        fields = {k: v for k, v in vars(self).items() if k != "credentials"}
        user = self.credentials.username if self.credentials else None
        return f"DownloadOptions(user={user!r}, {fields})"


@dataclass(frozen=True)
class Event:
    """A progress event, delivered to subscribers from worker threads.

    ``kind`` is one of ``planned`` (metadata known, table ready), ``state`` (a series
    changed status), ``progress`` (bytes written for a series, throttled to about one
    event per MiB), ``retry`` (an attempt failed and will be retried), ``throttle`` (the
    server said 429/503 and concurrency changed, or it recovered), ``message`` and
    ``finished``.
    """

    kind: str
    uid: str = ""
    state: str = ""
    attempt: int = 0
    series_bytes: int = 0
    message: str = ""
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, object]:
        data: dict[str, object] = {"event": self.kind, "time": round(self.time, 3)}
        for key in ("uid", "state", "message"):
            value = getattr(self, key)
            if value:
                data[key] = value
        if self.attempt:
            data["attempt"] = self.attempt
        if self.kind == "progress":
            data["bytes"] = self.series_bytes
        return data


def shard_of(uid: str, count: int) -> int:
    """The 1-based shard of a series: a stable hash, so every job agrees without talking."""
    digest = hashlib.sha1(uid.encode("ascii", "replace")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def select_shard(uids: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    if shard is None:
        return list(uids)
    k, n = shard
    return [u for u in uids if shard_of(u, n) == k]


@dataclass
class _Staged:
    name: str
    path: Path
    size: int
    md5: str
    header: bytes
    is_image: bool
    key: ImageKey | None = None


class ConcurrencyLimiter:
    """How many series may stream at once: AIMD, like TCP congestion control.

    A shared public server that answers 429 or 503 is asking clients to back off. Every
    such answer halves the limit (at most once per ``cooldown`` successes, so a burst of
    429s from requests already in flight counts once); every ``limit`` successful
    series in a row raise it by one, up to ``maximum``. Pure bookkeeping plus a condition
    variable: no clocks, so its behaviour is the same on every machine.
    """

    def __init__(self, maximum: int, *, adaptive: bool = True) -> None:
        self.maximum = max(1, maximum)
        self.limit = self.maximum
        self.adaptive = adaptive
        self.active = 0
        self._successes = 0
        self._since_decrease = self.maximum  # allow the first decrease at once
        self._cond = threading.Condition()

    def acquire(self, cancelled: threading.Event) -> bool:
        with self._cond:
            while self.active >= self.limit:
                if cancelled.is_set():
                    return False
                self._cond.wait(0.5)
            self.active += 1
            return True

    def release(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def throttled(self) -> int | None:
        """A 429/503 was seen; returns the new limit if it changed."""
        with self._cond:
            if not self.adaptive or self._since_decrease < self.limit or self.limit == 1:
                return None
            self.limit = max(1, self.limit // 2)
            self._since_decrease = 0
            self._successes = 0
            return self.limit

    def succeeded(self) -> int | None:
        """A series completed; returns the new limit if it grew."""
        with self._cond:
            self._since_decrease += 1
            if not self.adaptive or self.limit >= self.maximum:
                return None
            self._successes += 1
            if self._successes >= self.limit:
                self._successes = 0
                self.limit += 1
                self._cond.notify_all()
                return self.limit
            return None


class Engine:
    """One download run. Create, optionally :meth:`prepare` (to show the table), then
    :meth:`start` (non-blocking) or :meth:`run` (blocking).

    >>> engine = Engine(read_manifest("cart.tcia"), "downloads")   # doctest: +SKIP
    >>> engine.subscribe(print)                                    # doctest: +SKIP
    >>> report = engine.run()                                      # doctest: +SKIP
    """

    def __init__(
        self,
        manifest: Manifest,
        dest: str | os.PathLike[str],
        options: DownloadOptions | None = None,
        *,
        client: NbiaClient | None = None,
    ) -> None:
        self.manifest = manifest
        self.options = options or DownloadOptions()
        self.layout = Layout(self.options.layout)
        self.dest = Path(dest)
        self.root = self.dest / root_folder_name(manifest.root_name)
        self.state_dir = self.root / STATE_DIR
        self.retries = (
            self.options.retries if self.options.retries is not None else manifest.retries
        )
        if self.options.api_url:
            self.api_url = self.options.api_url
        elif manifest.download_server_url:
            self.api_url = api_base_from_download_url(manifest.download_server_url)
        else:
            from .api import DEFAULT_API_URL

            self.api_url = DEFAULT_API_URL
        self._client = client
        self._own_client = client is None
        self.results: dict[str, SeriesResult] = {
            uid: SeriesResult(uid) for uid in select_shard(manifest.series_uids,
                                                           self.options.shard)
        }
        self.report = Report(root=self.root, results=self.results)
        self._subscribers: list[Callable[[Event], None]] = []
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._running.set()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._prepared = False
        self._started = False
        self._thread: threading.Thread | None = None
        self._queue: list[str] = []
        self._pos = 0
        self._relpaths: dict[str, PurePosixPath] = {}
        self._paused_attempts: set[str] = set()
        cap = self.options.max_connections or self.options.workers
        self.limiter = ConcurrencyLimiter(min(cap, self.options.workers),
                                          adaptive=self.options.adaptive)
        self._journal: Journal | None = None
        self._csv: MetadataCsv | None = None
        self._t0 = 0.0
        self.total_bytes = 0
        self._finished_bytes = 0
        self._active_bytes: dict[str, int] = {}

    # -- public control ---------------------------------------------------------------
    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    @property
    def client(self) -> NbiaClient:
        if self._client is None:
            self._client = NbiaClient(
                self.api_url,
                version=self.options.api,
                credentials=self.options.credentials,
                timeout=self.options.timeout,
                verify=self.options.verify_tls,
                max_connections=max(4, min(self.options.workers,
                                           self.options.max_connections or 1 << 16) + 2),
                backoff_base=self.options.backoff_base,
            )
        return self._client

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def remove(self, uids: Iterable[str]) -> None:
        """Drop series from this run before it starts (the table's "delete rows").

        Works before or after :meth:`prepare`; the manifest file is never touched.
        """
        if self._started:
            raise RuntimeError("cannot remove series once the run has started")
        gone = set(uids)
        for uid in gone:
            self.results.pop(uid, None)
        if self._prepared:
            self._queue = [u for u in self._queue if u not in gone]
            self.total_bytes = sum(
                (r.info.file_size or 0) for u in self._queue if (r := self.results[u]).info
            )

    def close(self) -> None:
        """Release the journal and connections of an engine that will not be started.

        A started engine closes them itself when it finishes.
        """
        if self._started:
            return
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._own_client and self._client is not None:
            self._client.close()
            self._client = None

    def pause(self) -> None:
        """Stop taking new series; running ones hold at their next chunk."""
        self._running.clear()
        self._emit(Event("message", message="paused"))

    def resume(self) -> None:
        self._running.set()
        self._emit(Event("message", message="resumed"))

    def cancel(self) -> None:
        """Stop as soon as possible; staged data is discarded, published data is kept."""
        self._cancel.set()
        self._running.set()
        self.limiter.wake()

    def start(self) -> None:
        """Start in the background; returns at once. Use :meth:`wait` for the report."""
        if self._started:
            return
        self._started = True
        self._thread = threading.Thread(target=self._main, name="nbia-engine", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> Report:
        self._done.wait(timeout)
        return self.report

    def run(self) -> Report:
        """Prepare, download everything and return the report (blocking)."""
        self.start()
        while not self._done.wait(0.2):
            pass
        return self.report

    def stats(self) -> dict[str, float]:
        """A snapshot for progress displays: bytes, totals and counts."""
        with self._lock:
            active = sum(self._active_bytes.values())
            done_bytes = self._finished_bytes + active
        counts = {s: 0 for s in SeriesState.ALL}
        for r in list(self.results.values()):
            counts[r.state] = counts.get(r.state, 0) + 1
        return {
            "bytes_done": done_bytes,
            "bytes_total": self.total_bytes,
            "series_total": len(self.results),
            "complete": counts[SeriesState.COMPLETE],
            "failed": sum(counts[s] for s in SeriesState.FAILED),
            "active": counts[SeriesState.DOWNLOADING],
            "elapsed": (time.monotonic() - self._t0) if self._t0 else 0.0,
        }

    # -- preparation --------------------------------------------------------------------
    def prepare(self) -> None:
        """Open the journal, skip finished series, fetch metadata for the rest.

        Safe to call before :meth:`start` (the TUI does, to fill its table) and idempotent.
        Raises :class:`AuthError` when a login is needed and fails.
        """
        if self._prepared:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "staging").mkdir(parents=True, exist_ok=True)
        journal_name = "journal.sqlite"
        if self.options.shard:
            k, n = self.options.shard
            journal_name = f"journal-{k}-of-{n}.sqlite"
        self._journal = journal = Journal(self.state_dir / journal_name)
        self._csv = MetadataCsv(self.root / "metadata.csv")
        journal.set_info("layout", self.layout.value)
        journal.set_info("manifest", self.manifest.source or "")
        states = journal.states()
        completed = journal.completed_files()
        if self.options.only_failed:
            # "Retry failed series": everything that did not complete, including series
            # a crash left "Downloading" and series never reached. Only those the
            # journal has never heard of are left for a normal run.
            for uid in list(self.results):
                if uid not in states or states[uid] == SeriesState.COMPLETE:
                    self.results.pop(uid)
        todo: list[str] = []
        done_uids: list[str] = []
        for uid, result in self.results.items():
            relpath, nfiles = completed.get(uid, ("", 0))
            if relpath and _folder_has(self.root / relpath, nfiles):
                result.state = SeriesState.COMPLETE
                result.relpath = relpath
                self.report.skipped += 1
                done_uids.append(uid)
            else:
                todo.append(uid)
        self._discard_leftovers(todo)
        self._reconcile_csv(done_uids)
        journal.ensure(todo, SeriesState.NOT_STARTED)
        if todo:
            if self.options.credentials is not None:
                self.client.login()
            failures: dict[str, str] = {}
            infos = self.client.series_metadata(todo, workers=max(4, self.options.workers),
                                                errors=failures)
            journal.set_infos(infos.values())
            for uid in todo:
                result = self.results[uid]
                result.info = infos.get(uid)
                if result.info is None:
                    if uid in failures:
                        result.state = SeriesState.ERROR
                        result.error = f"metadata: {failures[uid]}"
                    elif self.client.logged_in:
                        result.state = SeriesState.NO_DATA
                        result.error = "the server returned no metadata for this series"
                    else:
                        result.state = SeriesState.NOT_AUTHORIZED
                        result.error = ("not public or unknown (log in with --user if it "
                                        "belongs to a limited-access collection)")
                    journal.set_state(uid, result.state, error=result.error)
                    self._emit(Event("state", uid=uid, state=result.state,
                                     message=result.error))
                else:
                    result.state = SeriesState.NOT_STARTED
                    self._queue.append(uid)
        # Folders are decided for the whole set at once, so clashes (equal number,
        # description and last five UID characters) resolve the same way on every run.
        known = [r.info for r in self.results.values() if r.info is not None]
        self._relpaths = series_relpaths(known, self.layout)
        self.total_bytes = sum(
            (r.info.file_size or 0) for uid in self._queue if (r := self.results[uid]).info
        )
        self._prepared = True
        self._emit(Event("planned", message=f"{len(self._queue)} series to download, "
                                            f"{self.report.skipped} already complete"))

    def _reconcile_csv(self, uids: Iterable[str]) -> None:
        """Add metadata.csv rows lost by a crash between journal commit and csv append."""
        assert self._journal is not None and self._csv is not None
        for uid in uids:
            if uid in self._csv:
                continue
            entry = self._journal.get(uid)
            if entry and entry.info:
                self.results[uid].info = entry.info
                row = metadata_row(entry.info, "./" + entry.relpath, entry.completed,
                                   images=sum(1 for f in entry.files if f.name.endswith(".dcm")),
                                   size=entry.bytes)
                self._csv.append(row)

    # -- the run ------------------------------------------------------------------------
    def _main(self) -> None:
        self._t0 = time.monotonic()
        try:
            try:
                self.prepare()
            except AuthError as exc:
                self.report.fatal = str(exc)
                self.report.auth_failed = True
                return
            except NbiaError as exc:
                self.report.fatal = str(exc)
                return
            except OSError as exc:
                self.report.fatal = f"cannot prepare {self.root}: {exc.strerror or exc}"
                return
            except sqlite3.Error as exc:  # e.g. the disk is full: one line, no traceback
                self.report.fatal = _journal_error(self.state_dir, exc)
                return
            for uid in self._queue:
                self._set_state(uid, SeriesState.QUEUED)
            workers = [
                threading.Thread(target=self._worker, name=f"nbia-worker-{i}", daemon=True)
                for i in range(max(1, min(self.options.workers, len(self._queue) or 1)))
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            if self._cancel.is_set():
                self.report.cancelled = True
                for uid in self._queue:
                    r = self.results.get(uid)
                    if r is not None and r.state in (SeriesState.QUEUED,
                                                     SeriesState.NOT_STARTED):
                        self._set_state(uid, SeriesState.CANCELLED)
        finally:
            self.report.elapsed = time.monotonic() - self._t0
            if self._journal is not None:
                self._journal.close()
            if self._own_client and self._client is not None:
                self._client.close()
            # Subscribers hear "finished" before waiters wake, so a front end that prints
            # its own summary after wait() never interleaves with the event stream.
            self._emit(Event("finished", message=self.report.summary()))
            self._done.set()

    def _next(self) -> str | None:
        while True:
            self._running.wait()
            if self._cancel.is_set():
                return None
            with self._lock:
                if not self._running.is_set():
                    continue
                if self._pos >= len(self._queue):
                    return None
                uid = self._queue[self._pos]
                self._pos += 1
                return uid

    def _worker(self) -> None:
        while (uid := self._next()) is not None:
            if uid not in self.results:
                continue
            try:
                self._download(uid)
            except FatalRunError as exc:
                self.report.fatal = str(exc)
                self.cancel()
            except Exception as exc:  # a bug must not kill the run silently
                self._fail(uid, SeriesState.ERROR, f"internal error: {type(exc).__name__}: {exc}")

    def _download(self, uid: str) -> None:
        result = self.results[uid]
        info = result.info
        assert info is not None
        allowed = self.retries + 1
        attempt = 0
        while True:
            attempt += 1
            result.attempts = attempt
            result.error = ""
            self._set_state(uid, SeriesState.DOWNLOADING, attempt=attempt)
            try:
                if not self.limiter.acquire(self._cancel):
                    raise Cancelled
                try:
                    self._attempt(uid, info, attempt)
                finally:
                    self.limiter.release()
                self._paused_attempts.discard(uid)
                if (grown := self.limiter.succeeded()) is not None:
                    self._emit(Event("throttle", message=f"concurrency up to {grown}"))
                return
            except Cancelled:
                self._discard(uid)
                self._set_progress(uid, 0, final=True)
                self._set_state(uid, SeriesState.CANCELLED, error="cancelled")
                return
            except NotPublicError as exc:
                self._discard(uid)
                self._fail(uid, SeriesState.NOT_AUTHORIZED, str(exc))
                return
            except AuthError as exc:
                error, retry_after, final = str(exc), None, not self.client.logged_in
                if final:
                    self._discard(uid)
                    self._fail(uid, SeriesState.NOT_AUTHORIZED, error)
                    return
            except OSError as exc:
                self._discard(uid)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    self._fail(uid, SeriesState.ERROR, f"disk full: {exc.strerror}")
                    raise FatalRunError(
                        f"disk full writing to {self.root}: free some space and re-run "
                        "the same command to resume"
                    ) from None
                error, retry_after = f"{type(exc).__name__}: {exc}", None
            except sqlite3.Error as exc:
                # SQLite reports a full disk as its own error, not as an OSError.
                self._discard(uid)
                message = _journal_error(self.state_dir, exc)
                self._fail(uid, SeriesState.ERROR, message)
                raise FatalRunError(message) from None
            except ApiError as exc:
                error, retry_after = str(exc), exc.retry_after
                if exc.status in (429, 503) and (shrunk := self.limiter.throttled()) is not None:
                    self._emit(Event("throttle", uid=uid,
                                     message=f"server busy: concurrency down to {shrunk}"))
                if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                    self._discard(uid)
                    self._fail(uid, SeriesState.ERROR, error)
                    return
            except IntegrityError as exc:
                error, retry_after = str(exc), None
            except httpx.TimeoutException as exc:
                error, retry_after = f"timed out ({type(exc).__name__})", None
            except httpx.HTTPError as exc:
                error, retry_after = f"{type(exc).__name__}: {exc}", None
            self._discard(uid)
            self._set_progress(uid, 0)
            result.error = error
            if uid in self._paused_attempts:
                # The stream was held open through a pause and may have been dropped by
                # the server or a proxy meanwhile: that is not the series' failure.
                self._paused_attempts.discard(uid)
                allowed += 1
            if attempt >= allowed:
                self._fail(uid, SeriesState.ERROR, f"{error} (after {attempt} attempts)")
                return
            self._emit(Event("retry", uid=uid, attempt=attempt, message=error))
            delay = backoff_delay(attempt, self.options.backoff_base, retry_after)
            if not self._cancel.wait(delay) and not self._running.is_set():
                self._set_state(uid, SeriesState.PAUSED)  # no retries while paused
                self._running.wait()
            if self._cancel.is_set():
                self._set_progress(uid, 0, final=True)
                self._set_state(uid, SeriesState.CANCELLED, error="cancelled")
                return

    def _fail(self, uid: str, state: str, error: str) -> None:
        result = self.results[uid]
        result.error = error
        self._set_progress(uid, 0, final=True)
        self._set_state(uid, state, error=error)

    # -- one attempt ----------------------------------------------------------------------
    def _staging(self, uid: str) -> Path:
        return self.state_dir / "staging" / sanitize_component(uid)

    def _discard(self, uid: str) -> None:
        shutil.rmtree(self._staging(uid), ignore_errors=True)

    def _discard_leftovers(self, uids: Iterable[str]) -> None:
        """Remove what interrupted attempts of these series left in staging: one scan of
        the staging folder, not one lookup per series (manifests reach 200,000).
        Other shards' series are not ours to touch."""
        staging = self.state_dir / "staging"
        ours = {sanitize_component(uid) for uid in uids}
        with os.scandir(staging) as entries:
            names = [e.name for e in entries if e.name in ours]
        for name in names:
            shutil.rmtree(staging / name, ignore_errors=True)

    def _checkpoint(self, uid: str) -> None:
        """Between chunks: honour cancel, and hold here while paused."""
        if self._cancel.is_set():
            raise Cancelled
        if not self._running.is_set():
            self._paused_attempts.add(uid)
            self._set_state(uid, SeriesState.PAUSED)
            self._running.wait()
            if self._cancel.is_set():
                raise Cancelled
            self._set_state(uid, SeriesState.DOWNLOADING)

    def _attempt(self, uid: str, info: SeriesInfo, attempt: int) -> None:
        staging = self._staging(uid)
        shutil.rmtree(staging, ignore_errors=True)
        parts = staging / ".parts"
        parts.mkdir(parents=True)
        expected = info.file_size
        # Zip-bomb cap: far above any honest series, far below "fill the disk".
        if expected:
            cap = max(expected * 4, expected + 256 * 1024 * 1024)
        elif info.image_count:
            cap = info.image_count * 2 * 1024**3
        else:
            cap = 256 * 1024**3
        reader = ZipStreamReader(max_total_size=cap)
        staged: list[_Staged] = []
        small: dict[str, bytearray] = {}
        names: set[str] = set()
        current: dict[str, object] = {}
        written = 0
        last_report = 0

        def handle(events: Iterable[object]) -> None:
            nonlocal written
            for ev in events:
                if isinstance(ev, EntryData):
                    data = ev.data
                    handle_file = current.get("file")
                    if handle_file is not None:
                        handle_file.write(data)  # type: ignore[attr-defined]
                        current["md5"].update(data)  # type: ignore[attr-defined]
                        header = current["header"]
                        if len(header) < HEADER_BYTES:  # type: ignore[arg-type]
                            header += bytes(data[: HEADER_BYTES - len(header)])  # type: ignore[operator, arg-type]
                    else:
                        buf = current["buffer"]
                        buf += data  # type: ignore[operator]
                        if len(buf) > SMALL_ENTRY_CAP:  # type: ignore[arg-type]
                            raise UnsafeArchiveError(
                                f"series {uid}: entry {current['name']!r} is implausibly large"
                            )
                    written += len(data)
                elif isinstance(ev, EntryStart):
                    name = ev.name
                    if name in names:
                        raise UnsafeArchiveError(f"series {uid}: duplicate zip entry {name!r}")
                    names.add(name)
                    base = _basename(name)
                    current.clear()
                    current["name"] = name
                    if base in (MD5_ENTRY, LICENSE_ENTRY):
                        current["buffer"] = small.setdefault(base, bytearray())
                    else:
                        path = parts / f"{len(staged):08d}.part"
                        current["path"] = path
                        current["file"] = open(path, "wb")  # noqa: SIM115 - closed at EntryEnd
                        current["md5"] = hashlib.md5(usedforsecurity=False)
                        current["header"] = bytearray()
                elif isinstance(ev, EntryEnd):
                    handle_file = current.get("file")
                    if handle_file is not None:
                        handle_file.close()  # type: ignore[attr-defined]
                        name = str(current["name"])
                        entry = _Staged(
                            name=name, path=current["path"],  # type: ignore[arg-type]
                            size=ev.size, md5=current["md5"].hexdigest(),  # type: ignore[attr-defined]
                            header=bytes(current["header"]),  # type: ignore[arg-type]
                            is_image=name.lower().endswith(".dcm"),
                        )
                        if entry.is_image:
                            # Read the naming tags now and let the header bytes go: kept
                            # for a 2,000-image series they would cost 128 MB.
                            entry.key = _image_key(entry)
                            entry.header = b""
                        staged.append(entry)
                    current.clear()

        try:
            with self.client.open_series(uid, md5=self.options.md5) as response:
                for chunk in response.iter_raw():
                    self._checkpoint(uid)
                    handle(reader.feed(chunk))
                    if written - last_report >= PROGRESS_STEP:
                        last_report = written
                        self._set_progress(uid, written)
                handle(reader.close())
        except IntegrityError as exc:
            if str(exc).startswith("series "):
                raise
            # The reader names the entry; say which series too.
            raise type(exc)(f"series {uid}: {exc}") from None
        finally:
            handle_file = current.get("file")
            if handle_file is not None:
                handle_file.close()  # type: ignore[attr-defined]
        if not reader.finished:
            raise IntegrityError(f"series {uid}: the zip stream ended without its directory")
        self._set_progress(uid, written)
        self._verify(uid, info, staged, small)
        self._publish(uid, info, staged, small, attempt)

    def _verify(self, uid: str, info: SeriesInfo, staged: list[_Staged],
                small: dict[str, bytearray]) -> None:
        images = [s for s in staged if s.is_image]
        if self.options.md5:
            if MD5_ENTRY not in small:
                raise IntegrityError(
                    f"series {uid}: no {MD5_ENTRY} in the zip (the stream is incomplete)"
                )
            listed = _parse_md5_list(bytes(small[MD5_ENTRY]), uid)
            present = {_basename(s.name) for s in staged}
            missing = sum(1 for n in listed if n not in present)
            if missing:
                raise IntegrityError(
                    f"series {uid}: short zip, {missing} of {len(listed)} files listed in "
                    f"{MD5_ENTRY} are missing"
                )
            unlisted = []
            for s in staged:
                # Every entry, not one per listed name: a/1.dcm and b/1.dcm share a name in
                # md5hashes.csv, and neither may go unchecked.
                base = _basename(s.name)
                if base not in listed:
                    if s.is_image:
                        unlisted.append(s.name)
                elif s.md5 != listed[base]:
                    raise IntegrityError(f"series {uid}: MD5 mismatch for {base}")
            if unlisted:
                raise IntegrityError(
                    f"series {uid}: {len(unlisted)} images are not in {MD5_ENTRY} "
                    f"(first: {unlisted[0]!r})"
                )
        if info.image_count is not None and len(images) < info.image_count:
            raise IntegrityError(
                f"series {uid}: short zip, {len(images)} of {info.image_count} images"
            )
        if not images and not staged:
            raise IntegrityError(f"series {uid}: the zip holds no files")

    def _publish(self, uid: str, info: SeriesInfo, staged: list[_Staged],
                 small: dict[str, bytearray], attempt: int) -> None:
        staging = self._staging(uid)
        images = [s for s in staged if s.is_image]
        keys = [s.key or _image_key(s) for s in images]
        final = assign_names(keys)
        records: list[FileRecord] = []
        used: set[str] = set()
        for s in images:
            name = final[s.name]
            os.rename(s.path, staging / name)
            used.add(name.lower())
            records.append(FileRecord(name, s.size, s.md5))
        for s in staged:
            if s.is_image:
                continue
            name = _unique(safe_entry_name(s.name), used)
            os.rename(s.path, staging / name)
            records.append(FileRecord(name, s.size, s.md5))
        (staging / ".parts").rmdir()
        relpath = self._folder_for(uid, info)
        target = self.root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        if small.get(LICENSE_ENTRY):
            # Before the series is published: once it is journaled a re-run skips it, so
            # a crash right after publishing must not be able to lose the LICENSE.
            self._write_license(relpath.parts[0], bytes(small[LICENSE_ENTRY]))
        if target.exists() and _folder_owner(target) not in (uid, None):
            raise IntegrityError(f"series {uid}: {relpath} was just taken by another series")
        if target.exists():
            # Ours, from an interrupted run (published, not yet journaled) or damaged:
            # replace it via the staging area, never by deleting in place.
            trash = self.state_dir / "staging" / (sanitize_component(uid) + ".old")
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(staging, target)
        nbytes = sum(r.size for r in records)
        self._journal.mark_complete(  # type: ignore[union-attr]
            uid, relpath=str(relpath), files=records, nbytes=nbytes, attempts=attempt, info=info
        )
        now = time.time()
        # The series is published and journaled: from here on nothing may turn it back
        # into a failure. A lost metadata.csv row is re-added by the next run.
        try:
            self._csv.append(metadata_row(  # type: ignore[union-attr]
                info, "./" + str(relpath), now, images=len(images), size=nbytes))
        except OSError as exc:
            self._emit(Event("message", uid=uid, message=f"could not update metadata.csv: "
                                                         f"{exc.strerror or exc}"))
        result = self.results[uid]
        result.relpath = str(relpath)
        result.files = len(records)
        result.bytes_done = nbytes
        with self._lock:
            self._active_bytes.pop(uid, None)
            self._finished_bytes += info.file_size or nbytes
            self.report.bytes_downloaded += nbytes
        self._set_state(uid, SeriesState.COMPLETE)

    def _folder_for(self, uid: str, info: SeriesInfo) -> PurePosixPath:
        """The planned folder, unless it exists on disk and holds another series.

        Never publish into, or replace, a folder that belongs to someone else: another
        shard of the same manifest may have put a clashing series there.
        """
        planned = self._relpaths.get(uid)
        variants = series_relpath_variants(info, self.layout)
        candidates = [planned, *variants] if planned else list(variants)
        for relpath in dict.fromkeys(candidates):
            target = self.root / relpath
            if not target.exists() or _folder_owner(target) in (uid, None):
                return relpath
        raise IntegrityError(f"series {uid}: every folder name for it is taken on disk")

    def _write_license(self, collection_dir: str, text: bytes) -> None:
        path = self.root / collection_dir / "LICENSE"
        if path.exists():
            return
        # The temporary file lives in the staging area: a crash must not leave it
        # beside the LICENSE, where no re-run would ever clean it up.
        tmp = self.state_dir / "staging" / f".LICENSE.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(text)
        os.replace(tmp, path)

    # -- bookkeeping ------------------------------------------------------------------------
    def _set_state(self, uid: str, state: str, *, error: str | None = None,
                   attempt: int = 0) -> None:
        result = self.results.get(uid)
        if result is None:
            return
        result.state = state
        if state != SeriesState.COMPLETE and self._journal is not None and state in (
            SeriesState.DOWNLOADING, *SeriesState.FINAL
        ):
            with contextlib.suppress(Exception):
                self._journal.set_state(uid, state, error=error, attempts=result.attempts or None)
        self._emit(Event("state", uid=uid, state=state, attempt=attempt,
                         message=error or ""))

    def _set_progress(self, uid: str, nbytes: int, *, final: bool = False) -> None:
        with self._lock:
            if final:
                self._active_bytes.pop(uid, None)
            else:
                self._active_bytes[uid] = nbytes
        self.results[uid].bytes_done = nbytes
        self._emit(Event("progress", uid=uid, series_bytes=nbytes))

    def _emit(self, event: Event) -> None:
        for callback in list(self._subscribers):
            with contextlib.suppress(Exception):
                callback(event)


def _journal_error(state_dir: Path, exc: sqlite3.Error) -> str:
    return (f"cannot write the download journal in {state_dir} ({exc}): free some space "
            "if the disk is full, then re-run the same command to resume")


def _basename(name: str) -> str:
    """The last part of a zip entry name, whichever separator the server used."""
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def _folder_has(folder: Path, nfiles: int) -> bool:
    """A published folder still holds at least the files the journal recorded."""
    try:
        return sum(1 for e in os.scandir(folder) if e.is_file()) >= nfiles
    except OSError:
        return False


def _folder_owner(folder: Path) -> str | None:
    """The series a published folder holds (from one image header); None if unknown.

    An empty folder or one without readable DICOM (e.g. left by a crash mid-replace)
    belongs to nobody, so it may be reused.
    """
    import pydicom

    for path in folder.glob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                 specific_tags=["SeriesInstanceUID"])
            uid = ds.get("SeriesInstanceUID")
            return str(uid) if uid else None
        except Exception:
            continue
    return None


def _parse_md5_list(data: bytes, uid: str) -> dict[str, str]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise IntegrityError(f"series {uid}: {MD5_ENTRY} is not text") from None
    rows = list(csv.reader(io.StringIO(text)))
    listed: dict[str, str] = {}
    for row in rows:
        if len(row) < 2:
            continue
        name, digest = row[0].strip(), row[1].strip().lower()
        if name.lower() == "filename":
            continue
        listed[_basename(name)] = digest
    return listed


def _image_key(s: _Staged) -> ImageKey:
    """Read just the three tags naming needs, from the bytes kept in memory if enough."""
    fast = fast_tags(s.header) if s.header else None
    if fast is not None:
        return ImageKey(entry=s.name, acquisition=fast["AcquisitionNumber"],
                        instance=fast["InstanceNumber"],
                        sop_instance_uid=fast["SOPInstanceUID"] or "")
    import pydicom

    values: dict[str, str | None] = dict.fromkeys(_DICOM_TAGS)
    sources: list[object] = [io.BytesIO(s.header)]
    if s.size > len(s.header):
        sources.append(s.path)
    for source in sources:
        try:
            ds = pydicom.dcmread(source, stop_before_pixels=True, force=True,
                                 specific_tags=list(_DICOM_TAGS))
            for tag in _DICOM_TAGS:
                value = ds.get(tag)
                values[tag] = None if value is None or value == "" else str(value)
            # A header longer than the bytes kept in memory reads as "tags absent"
            # without any error: only trust a partial read that found every tag.
            if source is sources[-1] or all(values[t] is not None for t in _DICOM_TAGS):
                break
        except Exception:
            continue
    return ImageKey(
        entry=s.name,
        acquisition=values["AcquisitionNumber"],
        instance=values["InstanceNumber"],
        sop_instance_uid=values["SOPInstanceUID"] or "",
    )


def _unique(name: str, used: set[str]) -> str:
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    candidate, n = name, 1
    while candidate.lower() in used:
        n += 1
        candidate = f"{stem}_{n}.{ext}" if dot else f"{name}_{n}"
    used.add(candidate.lower())
    return candidate


def make_engine(
    manifest: Manifest | str | os.PathLike[str] | Sequence[str],
    dest: str | os.PathLike[str] = ".",
    **options: object,
) -> Engine:
    """Build an :class:`Engine` from a manifest (object, path, or list of UIDs)."""
    from .manifest import read_manifest

    if isinstance(manifest, (str, os.PathLike)):
        manifest = read_manifest(manifest)
    elif not isinstance(manifest, Manifest):
        uids = list(manifest)
        manifest = Manifest(series_uids=tuple(dict.fromkeys(uids)), headers={}, source=None,
                            duplicates_dropped=len(uids) - len(set(uids)))
    opts = DownloadOptions()
    user, password = options.pop("user", None), options.pop("password", None)
    if user:
        opts.credentials = Credentials(str(user), str(password or ""))
    opts = replace(opts, **options)  # type: ignore[arg-type]
    return Engine(manifest, dest, opts)
