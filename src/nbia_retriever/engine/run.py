"""The :class:`Engine`: one download run, its controls, its threads, its events.

How one series travels (each step exists to make a wrong file impossible to publish):

1. :mod:`.plan` knows it is not done yet, has its metadata and its folder;
2. a worker takes it from the :class:`~.scheduler.WorkQueue` when the
   :class:`~.scheduler.ConcurrencyLimiter` gives it a slot, and takes its lock
   (``.nbia/locks``), so no other run on this root fetches it at the same time;
3. :mod:`.staging` streams the zip from the :class:`~.source.Source` into this run's
   staging folder, hashing and inflating as it arrives;
4. :mod:`.checks` decides whether what arrived is the whole series and only it;
5. :mod:`.publish` names the files, moves the folder into place with one ``rename``,
   and records it (journal, then metadata.csv).

Any failure of an attempt (reset, stall, 5xx, 429, short zip, bad MD5, an image of
another series) discards its staging folder and hands the series back to the queue, to
run again after a backoff (exponential with jitter, at least the server's Retry-After),
up to the manifest's ``noOfrRetry`` (one :class:`~nbia_retriever.retry.RetryPolicy`).
Final answers ("not in public domain") end the series at once; a certificate that cannot
be verified, a full disk or an unwritable journal end the run.

Threads rather than asyncio: per chunk, the work is zlib, MD5 and file writes, all of
which release the GIL, and the stream transport hands out 256 KiB per read, so the
Python left per byte is small (``benchmarks/transports.py``). The threads: the caller's
(or a ``nbia-engine`` thread) plans; up to ``max_connections`` workers download; one
monitor samples throughput for the limiter. Front ends (CLI, TUI, Python API) drive an
:class:`Engine` and add no download logic of their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..api import Credentials
from ..api.http import use_proxy
from ..errors import (
    EXIT_AUTH,
    EXIT_USAGE,
    DestinationError,
    DiskFullError,
    IntegrityError,
    JournalError,
    NbiaError,
    NetworkError,
    ServerUnreachableError,
    UsageError,
    exit_code,
)
from ..layout import Layout, root_folder_name, sanitize_component, series_relpath_variant
from ..manifest import Manifest, read_manifest
from ..models import FAILED_STATES, FINAL_STATES, SeriesInfo, SeriesState, is_file_uid
from ..ondisk import DownloadRoot, RunStaging, SeriesLock, ensure_dir
from ..report import FILES_CSV, MetadataCsv, Report, SeriesResult
from ..retry import RetryPolicy
from ..session import Session, session_for
from ..untrusted import quote, redact
from . import checks
from .events import Event, EventKind, Stats
from .journal import (
    ROWS_MARK,
    FileRecord,
    Journal,
    JournalEntry,
    RunRecord,
    header_lines,
    rows_mark,
)
from .ledger import Ledger
from .licenses import gate_for
from .options import DownloadOptions
from .pieces import PIECES_DIR, ConnectionBudget
from .plan import PlanBatch, Planner, PlanPhase, bulk
from .procs import RemoteAttempt, WorkerPool, available_cores, default_processes
from .publish import Fetched, Published, Publisher, file_relpath
from .rows import file_count, row_key
from .scheduler import ConcurrencyLimiter, WorkQueue
from .source import ByteStream, RemoteSource, Source, Verdict, source_factory, takes_files
from .staging import (
    NoRoomError,
    Progress,
    StagedSeries,
    discard,
    disk_full,
    series_folder_name,
    stage_series,
)

if TYPE_CHECKING:
    from typing import Unpack

    from ..api import NbiaClient
    from .options import DownloadKwargs

#: Seconds between two throughput samples of the monitor.
SAMPLE_WINDOW = 0.25
#: Seconds before a series another run holds is looked at again.
LOCK_RETRY = 2.0


class Cancelled(Exception):
    """Raised inside a worker when the run is cancelled; never escapes the engine."""


class _Fatal(Exception):
    """Stops the whole run (disk full, login refused, TLS): ``args[0]`` is the line."""


def shard_of(uid: str, count: int) -> int:
    """The 1-based shard of a series: a stable hash, so every job agrees without talking."""
    digest = hashlib.sha1(uid.encode("ascii", "replace")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def select_shard(uids: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    if shard is None:
        return list(uids)
    k, n = shard
    return [u for u in uids if shard_of(u, n) == k]


class Engine:
    """One download run. Create, optionally :meth:`prepare` (to show the table), then
    :meth:`start` (non-blocking) or :meth:`run` (blocking).

    >>> engine = Engine(read_manifest("cart.tcia"), "downloads")   # doctest: +SKIP
    >>> engine.subscribe(print)                                    # doctest: +SKIP
    >>> report = engine.run()                                      # doctest: +SKIP

    ``session`` is who the run talks to (:mod:`nbia_retriever.session`: the server, the
    host policy, the credentials), opened by the front end; without one the engine opens
    it from ``options``. ``source`` replaces the source ``options.source`` names (any
    :class:`~.source.Source`); ``client`` an :class:`~nbia_retriever.api.NbiaClient` of
    the caller's; ``confirm_host`` is asked (with the host's name) before a password goes
    to a host the user has not chosen (with a session, the session's own asks).
    """

    def __init__(
        self,
        manifest: Manifest,
        dest: str | os.PathLike[str],
        options: DownloadOptions | None = None,
        *,
        client: NbiaClient | None = None,
        source: Source | None = None,
        confirm_host: Callable[[str], bool] | None = None,
        session: Session | None = None,
    ) -> None:
        self.manifest = manifest
        self.options = options or DownloadOptions()
        if self.options.annotations == "manifest":
            # The manifest decides, as in the Java CLI: includeAnnotation=true asks for
            # them; a manifest without the key (or a list of UIDs) does not.
            says = manifest.header("includeAnnotation") is not None \
                and manifest.include_annotation
            self.options = replace(self.options, annotations="yes" if says else "no")
        self.layout = Layout(self.options.layout)
        self.dest = Path(dest)
        self.root = self.dest / root_folder_name(manifest.root_name)
        self.disk = DownloadRoot(self.root)
        self.state_dir = self.disk.state_dir
        self.retries = (
            self.options.retries if self.options.retries is not None else manifest.retries
        )
        if session is None:
            session = session_for(manifest, self.options, confirm=confirm_host, client=client)
        elif client is not None:
            session = replace(session, client=client)
        self.session = session
        self.api_url = session.api_url
        self._client = client
        self._source = source
        #: Lines about the manifest for the user (``.s5cmd`` lines IDC's index lacks).
        self.manifest_notes: list[str] = []
        if manifest.kind == "s5cmd" and source is None and self.options.idc_pinned is None:
            # not at --help: IDC's index only for a manifest that names IDC objects
            from ..idc.source import resolve_for_run

            manifest, self.options, self.manifest_notes = resolve_for_run(manifest,
                                                                          self.options)
            self.manifest = manifest
        with bulk():
            # (a DRS/PathDB sheet's files after its series: engine.route)
            uids = select_shard(manifest.keys, self.options.shard)
            self.results: dict[str, SeriesResult] = dict(zip(uids, map(SeriesResult, uids),
                                                             strict=True))
        #: The registry name of this run's source: on its events, results, journal rows.
        #: ``auto`` routes series one by one: its rows say "nbia" until a series is
        #: routed to IDC (``Source.where``, on the journal row and the result).
        self.source_name = "nbia" if self.options.source == "auto" else self.options.source
        if source is None:
            source_factory(self.options.source)  # an unknown name is refused here, at once
            if self.options.source == "idc":
                # IDC's index and endpoint are checked here too (a UsageError before
                # anything runs, not a failure in the engine's thread).
                self._source = self.source
        if self.source_name != "nbia":  # SeriesResult's default: no loop for it
            for result in self.results.values():
                result.source = self.source_name
        self.report = Report(root=self.root, results=self.results,
                             only_failed=self.options.only_failed)
        self.report.warnings.extend(self.manifest_notes)
        self._subscribers: list[Callable[[Event], None]] = []
        #: The one writer of the series' states and their counts (engine.ledger); its
        #: lock is this engine's lock.
        self.ledger = Ledger(self.results, self.report, self._emit, self.source_name)
        self._lock = self.ledger.lock
        self._running = threading.Event()
        self._running.set()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._plan_done = threading.Event()
        self._plan_lock = threading.Lock()
        self._plan_state = PlanPhase.NEW
        self._started = False
        self._thread: threading.Thread | None = None
        pinned = self.options.workers is not None
        self.limiter = ConcurrencyLimiter(self.options.streams_cap,
                                          adaptive=self.options.adaptive,
                                          explore=not pinned,
                                          initial=self.options.streams_start)
        #: The limiter's connections shared out: a series in pieces borrows the idle
        #: ones (engine.pieces).
        self.budget = ConnectionBudget(lambda: self.limiter.limit)
        self.queue = WorkQueue()
        # Series planned for download (each result's ``variant`` says which variant of its
        # folder name; the folder itself is worked out again when it is published: a
        # string per series is memory a 1,000,000-series run does not need).
        self._policies: dict[str, RetryPolicy] = {}
        self._paused_attempts: set[str] = set()
        self._progress: dict[str, Progress] = {}
        # Open series streams (in this process or a worker's), for cancel().
        self._streams: dict[str, ByteStream | RemoteAttempt] = {}
        self._pool: WorkerPool | None = None
        self._pool_lock = threading.Lock()
        self._worker_attempts = 0
        # Threads inflating/hashing/writing at once (see stage_series): one per core, and
        # one more to cover the moments a thread is in a system call.
        self._cpu = threading.BoundedSemaphore(available_cores() + 1)
        self._planner: Planner | None = None
        self._staging: RunStaging | None = None
        self._publisher: Publisher | None = None
        self._journal: Journal | None = None
        self._others: list[Journal] = []
        self._t0 = 0.0
        self._verified = 0
        self._received_done = 0
        self._high_water = 0
        self._busy = 0
        self._todo: list[str] = []
        self._complete: dict[str, str] = {}
        self._plan_wall = 0.0
        self._owed_rows: list[tuple[str, SeriesInfo, str, tuple[FileRecord, ...]]] = []
        self._fatal_error: NbiaError | None = None
        self._stop_monitor = threading.Event()
        #: A fresh root is created once the source has answered (the first metadata
        #: batch): a server that cannot be reached leaves the destination as it was.
        self._commit_owed = False
        self._answered = False
        #: Licences: the filter and the agreement asked once per collection.
        options = self.options
        self._licenses = gate_for(options.agree_to_license, options.license_filter,
                                  options.exclude_license, options.confirm_license)
        self._refused_now = 0


    # -- public control ---------------------------------------------------------------
    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    @property
    def client(self) -> NbiaClient:
        """The NBIA client of this run (the session's; the source's, once built)."""
        if self._client is None:
            client: NbiaClient | None = getattr(self.source, "client", None)
            self._client = client or self.session.open_client()
        return self._client

    @property
    def source(self) -> Source:
        """Where this run's series come from: ``options.source`` through the registry
        (:data:`~.source.SOURCES`), unless the caller gave one."""
        if self._source is None:
            if self.manifest.files:
                from .route import files_source  # a DRS/PathDB sheet's files

                self._source = files_source(self.manifest, self.session, self.options)
            else:
                self._source = self.session.source(self.options)  # a given client is in it
        return self._source

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def planning(self) -> bool:
        return not self._plan_done.is_set()

    def remove(self, uids: Iterable[str]) -> None:
        """Drop series from this run before it starts (the table's "delete rows").

        Works before or after :meth:`prepare`; the manifest file is never touched.
        """
        if self._started:
            raise RuntimeError("cannot remove series once the run has started")
        gone = set(uids)
        self.queue.drop(gone)
        self.ledger.drop(gone)

    @property
    def total_bytes(self) -> int:
        """The bytes of the series planned for download (the ledger counts them)."""
        return self.ledger.total_bytes

    @property
    def cancelled(self) -> bool:
        """:meth:`cancel` was called (or something fatal stopped the run)."""
        return self._cancel.is_set()

    @property
    def fatal_error(self) -> NbiaError | None:
        """What stopped the whole run (``report.fatal`` as an exception), if anything."""
        return self._fatal_error

    def fill_finished_metadata(self) -> int:
        """Put the journals' metadata on series that were complete before this run.

        Planning skips finished series without reading their metadata (a no-op re-run of
        200,000 series must not parse 200,000 JSON records); a view showing them calls
        this, in a worker thread, to fill their rows. Returns how many were filled.
        """
        missing = {uid for uid, r in list(self.results.items())
                   if r.state == SeriesState.COMPLETE and r.info is None}
        filled = 0
        for path in self.disk.journal_paths():
            if not missing:
                break
            try:
                with Journal(path, readonly=True) as journal:
                    entries = list(journal.entries(SeriesState.COMPLETE))
            except DestinationError:
                continue
            for entry in entries:
                result = self.results.get(entry.uid)
                if entry.uid in missing and entry.info is not None and result is not None:
                    result.info = entry.info
                    result.files = entry.nfiles or len(entry.files)
                    result.bytes_done = entry.bytes
                    result.source = entry.source
                    missing.discard(entry.uid)
                    filled += 1
        return filled

    def folder_of(self, uid: str) -> str:
        """Where a series goes (once planned) or went (once complete), relative to the
        root, as ``a/b/c/d``; "" while it is not planned or cannot be downloaded."""
        result = self.results.get(uid)
        if result is None:
            return ""
        if result.relpath:
            return result.relpath
        variant = result.variant
        if variant is None or result.info is None:
            return ""
        if is_file_uid(uid):  # a file item: Collection/Patient/<name>
            return file_relpath(result.info, self.layout)
        return str(series_relpath_variant(result.info, self.layout, variant))

    def close(self) -> None:
        """Release the journal and connections of an engine that will not be started.

        A started engine closes them itself when it finishes.
        """
        if self._started:
            return
        self._release()

    def pause(self) -> None:
        """Stop taking new series; running ones hold at their next chunk."""
        self._running.clear()
        self._hold_remote(True)
        self._emit(Event(EventKind.MESSAGE, message="paused"))

    def resume(self) -> None:
        self._running.set()
        self._hold_remote(False)
        self.queue.wake()
        self._emit(Event(EventKind.MESSAGE, message="resumed"))

    def _hold_remote(self, on: bool) -> None:
        """Tell the attempts in worker processes (they hold at their next chunk)."""
        with self._lock:
            remote = [s for s in self._streams.values() if isinstance(s, RemoteAttempt)]
        for attempt in remote:
            attempt.hold(on)

    def cancel(self) -> None:
        """Stop as soon as possible; staged data is discarded, published data is kept."""
        self._cancel.set()
        self._running.set()
        self.limiter.wake()
        self.queue.wake()
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:  # a read stalled on a silent server returns now
            with contextlib.suppress(Exception):
                stream.abort()

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
        """Plan, download everything and return the report (blocking)."""
        self.start()
        while not self._done.wait(0.2):
            pass
        return self.report

    def stats(self) -> Stats:
        """A snapshot for progress displays (:class:`~.events.Stats`)."""
        with self._lock:
            active = list(self._progress.values())
            in_flight = sum(p.written for p in active)
            received = self._received_done + sum(p.received for p in active)
            done = self._verified + in_flight
            streams = len(self._streams)
            self._high_water = max(self._high_water, min(done, self.total_bytes or done))
            high = self._high_water
        # Kept by the ledger at each transition: a 200,000-series run asks several times
        # a second.
        counts = self.ledger.counts()
        return Stats(
            bytes_verified=self._verified, bytes_in_flight=in_flight,
            bytes_total=self.total_bytes, series_total=len(self.results),
            complete=counts[SeriesState.COMPLETE],
            failed=sum(counts[s] for s in FAILED_STATES),
            active=counts[SeriesState.DOWNLOADING], planned=self.ledger.planned,
            planning=self.planning, concurrency=self.limiter.limit,
            elapsed=(time.monotonic() - self._t0) if self._t0 else 0.0,
            progress_bytes=high, bytes_received=received,
            processes=pool.ready() if (pool := self._pool) is not None else 0,
            worker_attempts=self._worker_attempts, open_streams=streams,
        )

    # -- planning -----------------------------------------------------------------------
    def prepare(self, *, write: bool = False) -> None:
        """Read the journals, skip finished series, fetch metadata, choose folders.

        Blocking; safe to call before :meth:`start` (the TUI does, in a worker thread, to
        fill its table while metadata arrives) and idempotent. Without ``write`` nothing
        is created on disk (a destination only looked at gets no ``.nbia/``): the root
        and its journal are made at :meth:`start`. With ``write`` they are made now, as a
        started run would. Raises what stops the run (:class:`AuthError` for a refused
        login, :class:`DestinationError`, :class:`UsageError`, any other
        :class:`NbiaError`).
        """
        if self._claim_plan():
            if self._plan_step(lambda: self._plan_local(create=write)):
                self._plan_step(self._plan_remote)
            self._end_plan()
        else:
            self._plan_done.wait()
        if self._fatal_error is not None:
            raise self._fatal_error

    def _claim_plan(self) -> bool:
        """True for the one caller that plans (prepare() or the engine thread)."""
        with self._plan_lock:
            if self._plan_state is not PlanPhase.NEW:
                return False
            self._plan_state = PlanPhase.RUNNING
            return True

    def _plan_step(self, step: Callable[[], None]) -> bool:
        """Run a planning step; what stops the run becomes ``report.fatal``."""
        try:
            with bulk():
                step()
            return True
        except NbiaError as exc:
            self._set_fatal(exc)
        except OSError as exc:
            full = disk_full(self.root, exc)
            self._set_fatal(full if full is not None else DestinationError(
                f"cannot use {self.root}: {exc.strerror or exc}"))
        except Exception as exc:  # a bug must not leave the run hanging
            self._set_fatal(NbiaError(f"internal error while planning: "
                                      f"{type(exc).__name__}: {quote(str(exc))}"))
        return False

    def _end_plan(self) -> None:
        self._plan_state = PlanPhase.DONE
        self.queue.close()
        self._plan_done.set()

    def _set_fatal(self, exc: NbiaError) -> None:
        self._fatal_error = exc
        self.report.fatal = redact(str(exc))
        code = exit_code(exc)  # the one mapping: 3 login, 2 usage or an unusable root
        if code == EXIT_AUTH:
            self.report.auth_failed = True
        elif code == EXIT_USAGE:
            self.report.usage_error = True
        elif isinstance(exc, ServerUnreachableError):
            self.report.unreachable = True
        self._emit(Event(EventKind.ERROR, message=self.report.fatal))
        self.cancel()

    def _plan_local(self, *, create: bool = False) -> None:
        self._plan_wall = time.time()
        self.source.check()  # an untrusted host is refused before anything is created
        journal_path = self.disk.journal_path(self.options.shard)
        planner = Planner(self.disk, journal_path, self.layout,
                          only_failed=self.options.only_failed, source=self.source_name)
        planner.source_of = getattr(self.source, "where", None)  # a routing source's
        self._planner = planner
        opened = planner.open(self.results, create=create)
        for warning in planner.warnings:  # journal rows naming folders outside the root
            if warning not in self.report.warnings:
                self.report.warnings.append(warning)
                self._emit(Event(EventKind.MESSAGE, message=warning))
        self._complete = opened.complete
        self._todo = opened.todo
        if not opened.complete and len(opened.todo) == len(self.results):
            if create:  # a fresh root: every series is to do (no 1,000,000-entry set)
                self._commit()
            return
        todo = set(opened.todo)
        complete = opened.complete
        drop: list[str] = []
        done: list[str] = []
        for uid, result in list(self.results.items()):
            if uid in complete:
                if self.options.only_failed:
                    drop.append(uid)  # --only-failed: finished series are not shown
                    continue
                result.relpath = complete[uid]
                done.append(uid)
            elif uid not in todo:
                drop.append(uid)  # --only-failed: never part of an earlier run
        self.ledger.drop(drop)
        self.ledger.move_many(done, SeriesState.COMPLETE, emit=False, tally="skipped")
        if create:
            self._commit()

    def _commit(self) -> None:
        """What only a started run does: create the root and write (journal, staging,
        metadata.csv rows lost to a crash or owed to adopted series)."""
        planner = self._planner
        assert planner is not None
        planner.commit()
        self._journal = planner.journal
        assert self._journal is not None
        self._record_run(self._journal)
        self._staging = self.disk.new_run_staging()
        bind = getattr(self.source, "bind_run", None)  # a huge series' images go there
        if bind is not None:
            pieces = ensure_dir(self.disk.state_dir, [PIECES_DIR])
            if takes_files(bind):  # a file item's spool: .nbia/files/ (engine.publish)
                bind(pieces, self.budget, files=ensure_dir(self.disk.state_dir, [FILES_DIR]))
            else:
                bind(pieces, self.budget)
        csv = MetadataCsv(self.disk.metadata_csv, lazy=True)  # read if needed (_reconcile_csv)
        self._publisher = Publisher(self.disk, self._staging, self.layout, self._journal, csv,
                                    note=lambda uid, text: self._emit(
                                        Event(EventKind.MESSAGE, uid=uid, source=self.source_name,
                                              message=text)))
        self._open_other_journals(planner.journal_path)
        self._reconcile_csv(self._complete)
        with self._lock:
            owed, self._owed_rows = self._owed_rows, []
        for uid, info, relpath, files in owed:
            self._publisher.adopt_row(uid, info, relpath, time.time(), files)

    def _record_run(self, journal: Journal) -> None:
        """The root knows where it came from: this run's manifest (path, header lines),
        server(s) and API, one row of the journal's ``runs`` table (``verify --server``,
        ``list -d`` and the view read it back through :func:`.journal.root_origin`)."""
        manifest = self.manifest
        path = manifest.source or ""  # "<manifest>": parsed from a string, no file
        path = os.path.abspath(path) if path and not path.startswith("<") else ""
        servers = [self.session.api_url.rstrip("/")]
        servers += [u for u in getattr(self._source, "servers", ()) or ()
                    if isinstance(u, str) and u not in servers]
        record = RunRecord(time.time(), manifest=path, headers=header_lines(manifest.headers),
                           servers=tuple(servers), chosen=bool(self.session.chosen),
                           api=self.session.version, source=self.source_name)
        with contextlib.suppress(NbiaError):  # where it came from is help, not the run
            journal.record_run(record)

    def _open_other_journals(self, own: Path) -> None:
        """Other runs' journals in this root (shards): read-only, also those that appear
        while this run goes on."""
        known = {j.path for j in self._others} | {own}
        for path in self.disk.journal_paths():
            if path in known:
                continue
            with contextlib.suppress(DestinationError):
                self._others.append(Journal(path, readonly=True))

    def _rows_mark(self, uids: Iterable[str]) -> str | None:
        """:func:`.journal.rows_mark` of this root's report files and ``uids``."""
        return rows_mark(row_key(), (self.disk.metadata_csv, self.disk.path / FILES_CSV),
                         uids)

    def _reconcile_csv(self, complete: dict[str, str]) -> None:
        """Add metadata.csv rows lost by a crash between journal commit and csv append;
        not one file read when the last run's mark says every one of these series had
        its row and the files have not changed since (:func:`.journal.rows_mark`)."""
        publisher = self._publisher
        assert publisher is not None and self._journal is not None
        if complete and not self._owed_rows:
            mark = self._rows_mark(complete)
            if mark is not None and mark == self._journal.get_info(ROWS_MARK):
                return
        missing = [uid for uid in complete if not publisher.has_row(uid)]
        for uid in missing:
            entry = self._journal.get(uid)
            if entry is None:
                entry = next((e for j in self._others if (e := j.get(uid))), None)
            if entry and entry.info:
                if uid in self.results:
                    self.results[uid].info = entry.info
                # The folder planning believed (checked inside the root), whichever
                # journal the metadata came from.
                publisher.adopt_row(uid, entry.info, complete[uid], entry.completed,
                                    entry.files)

    def _plan_remote(self) -> None:
        todo = self._todo
        if len(todo) + len(self._complete) != len(self.results):  # some were removed
            todo = [u for u in todo if u in self.results]
        if not todo:
            self._emit(Event(EventKind.PLANNED, count=0, message=self._planned_text(True)))
            return
        source = self.source
        assert self._planner is not None
        try:
            source.prepare()
            for batch in self._planner.batches(source, todo):
                self._answered = True
                self._commit_now()
                self._take_batch(batch)
                if self._cancel.is_set():
                    break
        except NetworkError as exc:
            if self._answered or isinstance(exc, ServerUnreachableError):
                raise
            # Not one answer from the start: a server down, a wrong host, no network.
            raise ServerUnreachableError(str(exc)) from None
        self._commit_now()
        self._source_notes()
        self._license_summary()
        self._emit(Event(EventKind.PLANNED, count=self.ledger.planned,
                         message=self._planned_text(True)))

    def _source_notes(self) -> None:
        """Lines a source keeps for the user (``auto`` falling back to NBIA), each once."""
        notes = getattr(self._source, "notes", None)
        while notes:
            note = notes.pop(0)
            if note not in self.report.warnings:
                self.report.warnings.append(note)
                self._emit(Event(EventKind.MESSAGE, message=note))

    def _commit_now(self) -> None:
        """Create a fresh root now that the source has answered (see ``_commit_owed``)."""
        if self._commit_owed and not self._cancel.is_set():
            self._commit_owed = False
            self._commit()

    def _take_batch(self, batch: PlanBatch) -> None:
        seen = len(batch.ready) + len(batch.unavailable) + len(batch.adopted)
        ready = self._license_hook(batch.ready)
        seen -= len(batch.ready) - len(ready) - self._refused_now
        self.queue.put(self.ledger.plan(ready, seen, started=self._started))
        for uid, failed_state, why, info in batch.unavailable:
            result = self.results.get(uid)
            if result is None:
                continue
            result.info, result.error = info, why
            self.ledger.move(uid, failed_state, message=why)
        for uid, info, relpath, files in batch.adopted:
            result = self.results.get(uid)
            if result is None:
                continue
            result.info, result.relpath = info, relpath
            result.files = len(files)
            with self._lock:
                publisher = self._publisher
                if publisher is None:
                    self._owed_rows.append((uid, info, relpath, files))
            if publisher is not None:
                publisher.adopt_row(uid, info, relpath, time.time(), files)
            self.ledger.move(uid, SeriesState.COMPLETE, tally="adopted",
                             message="found on disk: adopted without downloading")
        self._emit(Event(EventKind.PLANNED, count=self.ledger.planned,
                         message=self._planned_text(False)))

    def _license_hook(self, ready: list[Any]) -> list[Any]:
        """Licences (``engine.licenses``), before a batch is queued: series the
        ``--license``/``--exclude-license`` filter leaves out leave the run; those of a
        collection whose licence the user has not accepted end as Not Authorized, with
        the reason (the user is asked first when a front end can ask)."""
        gate = self._licenses
        keep: list[Any] = []
        dropped: list[str] = []
        refused: list[tuple[str, SeriesInfo]] = []
        for item in ready:
            uid, info = item[0], item[1]
            if not gate.wanted(info):
                dropped.append(uid)
            elif gate.allowed(info):
                keep.append(item)
            else:
                refused.append((uid, info))
        if dropped:
            self.queue.drop(set(dropped))
            self.ledger.drop(dropped)
        for uid, info in refused:
            result = self.results.get(uid)
            if result is not None:
                result.info, result.error = info, gate.refusal(info)
                self.ledger.move(uid, SeriesState.NOT_AUTHORIZED, message=result.error)
        self._refused_now = len(refused)
        while gate.notes:
            note = gate.notes.pop(0)
            self.report.warnings.append(note)
            self._emit(Event(EventKind.MESSAGE, message=note))
        return keep

    def _license_summary(self) -> None:
        line = self._licenses.summary()
        if line and line not in self.report.warnings:
            self.report.warnings.append(line)
            self._emit(Event(EventKind.MESSAGE, message=line))

    def _planned_text(self, final: bool) -> str:
        return self.ledger.planned_text(final, len(self._todo))

    # -- the run ------------------------------------------------------------------------
    def _main(self) -> None:
        self._t0 = time.monotonic()
        workers: list[threading.Thread] = []
        monitor: threading.Thread | None = None
        try:
            self.start_workers()
            plan_here = self._claim_plan()
            if plan_here:
                # A fresh root waits for the source's first answer (_commit_now); one
                # that exists is opened for writing at once, as before.
                fresh = not self.disk.exists()
                self._commit_owed = fresh
                if not self._plan_step(lambda: self._plan_local(create=not fresh)):
                    self._end_plan()
                    return
            else:
                self._plan_done.wait()  # prepare() plans (it touches nothing on disk)
                if self.report.fatal or not self._plan_step(self._commit):
                    return
                self._queue_prepared()
            workers = [threading.Thread(target=self._worker, name=f"nbia-worker-{i}",
                                        daemon=True)
                       for i in range(max(1, self.options.streams_cap))]
            for w in workers:
                w.start()
            # Where the streams start (an --json consumer sees every change after it).
            self._emit(Event(EventKind.CONCURRENCY, count=self.limiter.limit,
                             message=f"{self.limiter.limit} concurrent streams"))
            monitor = threading.Thread(target=self._monitor, name="nbia-monitor", daemon=True)
            monitor.start()
            if plan_here:
                self._plan_step(self._plan_remote)
                self._end_plan()
            for w in workers:
                w.join()
            self._source_notes()  # what the source found while downloading (a fallback)
            if self._planner is not None and not self.report.fatal:
                # Rows written in the background (a started run's, after prepare()).
                self._plan_step(self._planner.wait_rows)
            if self._cancel.is_set():
                self.report.cancelled = True
                for result in self.results.values() if not self.report.unreachable else ():
                    if result.state in (SeriesState.QUEUED, SeriesState.NOT_STARTED,
                                        SeriesState.PAUSED):
                        self._set_state(result.uid, SeriesState.INTERRUPTED)
        finally:
            self._stop_monitor.set()
            self.limiter.wake()
            if monitor is not None:
                monitor.join(timeout=2)
            self.report.elapsed = time.monotonic() - self._t0
            self._release()
            # Subscribers hear "finished" before waiters wake, so a front end that prints
            # its own summary after wait() never interleaves with the event stream.
            self._emit(Event(EventKind.FINISHED, message=self.report.summary()))
            self._done.set()

    def start_workers(self) -> None:
        """Start the worker processes (``engine.procs``) now; :meth:`start` does it
        first thing. They import while this process plans, and streams use them as they
        become ready (threads stage until then): :meth:`stats` counts them. Idempotent;
        nothing happens with ``processes=0`` or a source that cannot hand out requests."""
        count = self.options.processes
        if count is None:
            count = default_processes()
        count = min(count, self.options.streams_cap)
        with self._pool_lock:
            if self._pool is not None or count <= 0 or \
                    not isinstance(self.source, RemoteSource):
                return
            self._pool = WorkerPool(count)
            self._pool.start()

    def _queue_prepared(self) -> None:
        """Series prepare() planned before start(): they are queued now."""
        for uid, result in list(self.results.items()):
            if result.variant is not None and result.state == SeriesState.NOT_STARTED:
                self.ledger.move(uid, SeriesState.QUEUED)

    def _mark_rows(self) -> None:
        """At the end of a run that read or wrote the report files: if every complete
        series has its row, the mark that lets the next run skip reading them."""
        publisher, journal = self._publisher, self._journal
        if publisher is None or journal is None or not publisher.csv.loaded:
            return  # not read: a mark that held at the start still holds
        complete = [uid for uid, r in self.results.items()
                    if r.state == SeriesState.COMPLETE and r.relpath]
        if not complete or not all(publisher.has_row(uid) for uid in complete):
            return
        mark = self._rows_mark(complete)
        if mark is not None:
            with contextlib.suppress(NbiaError):  # a speed-up for the next run only
                journal.set_info(ROWS_MARK, mark)

    def _release(self) -> None:
        with contextlib.suppress(Exception):  # never in the way of closing
            self._mark_rows()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        for journal in self._others:
            with contextlib.suppress(Exception):
                journal.close()
        self._others = []
        if self._planner is not None:
            self._planner.close()
            self._planner = None
            self._journal = None
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if self._source is not None:
            with contextlib.suppress(Exception):
                self._source.close()
        elif self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()

    def _monitor(self) -> None:
        """Samples throughput for the limiter until the workers are gone.

        It also counts the streams that waited a whole window for their first byte (no
        byte received nor written at this sample and the one before: a worker process
        reports every RX_STEP bytes or image): a server thinking before each zip, which
        the limiter answers with more streams rather than by the bursty rate."""
        waited: set[int] = set()
        while not self._stop_monitor.wait(SAMPLE_WINDOW):
            stats = self.stats()
            with self._lock:
                saturated = self._busy + self.budget.borrowed >= self.limiter.limit
                idle = {id(p) for p in self._progress.values()
                        if not p.received and not p.written}
            waiting, waited = len(idle & waited), idle
            changed = self.limiter.sample(stats.bytes_received, saturated=saturated,
                                          waiting=waiting)
            if changed is not None:
                self._emit(Event(EventKind.CONCURRENCY, count=changed,
                                 message=f"{changed} concurrent streams"))

    def _worker(self) -> None:
        while True:
            if not self.limiter.acquire(self._cancel, done=lambda: self.queue.finished):
                return
            try:
                uid = self.queue.get(self._cancel, self._running)
                if uid is None:
                    self.limiter.wake()  # workers waiting for a slot: nothing is left
                    return
                self._run_one(uid)
                if self.queue.finished:
                    self.limiter.wake()
            except _Fatal as exc:
                if not self.report.fatal:
                    self.report.fatal = redact(str(exc.args[0]))
                    self._emit(Event(EventKind.ERROR, message=self.report.fatal))
                self.cancel()
            finally:
                self.limiter.release()

    # -- one series ---------------------------------------------------------------------
    def _run_one(self, uid: str) -> None:
        result = self.results.get(uid)
        variant = result.variant if result is not None else None
        if result is None or variant is None or result.info is None:
            self.queue.done(uid)
            return
        lock = SeriesLock(self.disk.locks_dir, sanitize_component(uid, fallback="series"))
        try:
            held = lock.acquire()
        except (OSError, DestinationError) as exc:
            self._finish(uid, SeriesState.ERROR, f"cannot lock the series: {exc}")
            return
        if not held:
            result.error = "another download into this root holds it; waiting"
            self.queue.retry_later(uid, LOCK_RETRY)
            return
        complete = False
        try:
            if self._complete_elsewhere(uid):
                complete = True
                self.queue.done(uid)
                return
            complete = self._attempt(uid, result, variant)
        finally:
            lock.release(remove=complete)

    def _complete_elsewhere(self, uid: str) -> bool:
        """Another run on this root (a shard, a TUI beside a CLI) finished it meanwhile:
        a journal says so with a time after this run began planning."""
        if self._planner is not None:
            with self._lock:
                self._open_other_journals(self._planner.journal_path)
        for journal in (self._journal, *self._others):
            if journal is None:
                continue
            try:
                entry = journal.get(uid)
            except DestinationError:
                continue
            if entry is not None and entry.state == SeriesState.COMPLETE and entry.relpath \
                    and entry.completed >= self._plan_wall and _holds_its_images(
                        self.root / entry.relpath, entry):
                result = self.results[uid]
                result.relpath, result.files = entry.relpath, entry.nfiles
                self.ledger.move(uid, SeriesState.COMPLETE, tally="skipped",
                                 message="completed by another run of this root")
                return True
        return False

    def _attempt(self, uid: str, result: SeriesResult, variant: int) -> bool:
        """One attempt; True if the series is complete."""
        info = result.info
        assert info is not None and self._staging is not None
        policy = self._policies.get(uid) or RetryPolicy(total=self.retries,
                                                        backoff_base=self.options.backoff_base)
        attempt = policy.attempts + 1
        result.attempts = attempt
        result.error = ""
        self._set_state(uid, SeriesState.DOWNLOADING, attempt=attempt)
        progress = Progress()
        staging = self._staging.series_dir(series_folder_name(uid))
        with self._lock:
            self._progress[uid] = progress
            self._busy += 1
        try:
            if is_file_uid(uid):  # a file item (issue 24): one file, no zip, no checks
                published = self._fetch_file(uid, info, progress, attempt)
            else:
                staged = self._stage(uid, info, staging, progress)
                # The source's own rules when it has them (see Source), else NBIA's.
                check = getattr(self.source, "check_series", checks.check_series)
                check(uid, info, staged.entries, staged.md5_list,
                      md5_required=self.options.md5)
                assert self._publisher is not None
                published = self._publisher.publish(uid, info, staged, variant=variant,
                                                    attempts=attempt)
            where = getattr(self.source, "where", None)
            if where is not None:
                result.source = where(uid)
        except Cancelled:
            discard(staging)
            self._interrupted(uid, progress)
            return False
        except NbiaError as exc:
            discard(staging)
            if self._cancel.is_set():  # the stream was aborted by cancel(): not a failure
                self._interrupted(uid, progress)
                return False
            self._failed(uid, result, policy, exc)
            return False
        except OSError as exc:
            discard(staging)
            full = disk_full(self.root, exc)
            if full is not None:
                self._finish(uid, SeriesState.ERROR, str(full))
                raise _Fatal(str(full)) from None
            self._failed(uid, result, policy, NbiaError(f"{type(exc).__name__}: "
                                                        f"{exc.strerror or exc}"))
            return False
        except Exception as exc:  # a bug must not kill the run silently
            discard(staging)
            self._finish(uid, SeriesState.ERROR,
                         f"internal error: {type(exc).__name__}: {quote(str(exc))}")
            return False
        finally:
            with self._lock:
                self._progress.pop(uid, None)
                self._received_done += progress.received
                self._busy -= 1
        self._policies.pop(uid, None)
        self._paused_attempts.discard(uid)
        result.info = published.info
        result.relpath = str(published.relpath)
        result.files = len(published.files)
        result.bytes_done = published.nbytes
        with self._lock:
            self._verified += info.file_size or published.nbytes
            self.report.bytes_downloaded += published.nbytes
        self._set_state(uid, SeriesState.COMPLETE)
        self.queue.done(uid)
        if (grown := self.limiter.succeeded()) is not None:
            self._emit(Event(EventKind.CONCURRENCY, count=grown,
                             message=f"concurrency up to {grown}"))
        return True

    def _fetch_file(self, uid: str, info: SeriesInfo, progress: Progress,
                    attempt: int) -> Published:
        """One attempt at a file item: the source's stream fetches the whole file into
        the run's spool (resumable, verified as it is written: ``files.transfer``), then
        it is published by one link (:meth:`.publish.Publisher.publish_file`). Always in
        this process: a source's ``remote()`` is not asked (nothing to inflate)."""

        def on_progress(nbytes: int) -> None:
            progress.received = progress.written = nbytes
            self._on_progress(uid, nbytes)

        with self.budget.stream(self._cancel), self.source.open(info) as stream:
            with self._lock:
                self._streams[uid] = stream
            try:
                if self._cancel.is_set():
                    raise Cancelled()
                fetch = getattr(stream, "fetch", None)
                if fetch is None:
                    raise NbiaError(f"{self.source.name} has no file for {uid}")
                fetched: Fetched = fetch(checkpoint=lambda: self._checkpoint(uid),
                                         on_progress=on_progress)
            finally:
                with self._lock:
                    self._streams.pop(uid, None)
        assert self._publisher is not None
        return self._publisher.publish_file(uid, info, fetched, attempts=attempt)

    def _stage(self, uid: str, info: object, staging: Path, progress: Progress) -> StagedSeries:

        assert isinstance(info, SeriesInfo)
        with self.budget.stream(self._cancel):  # connections a series in pieces borrowed
            return self._stage_now(uid, info, staging, progress)

    def _stage_now(self, uid: str, info: SeriesInfo, staging: Path,
                   progress: Progress) -> StagedSeries:
        pool, source = self._pool, self.source
        if pool is not None and isinstance(source, RemoteSource):
            staged = source.remote(info, lambda request: self._stage_remote(
                pool, uid, request, info, staging, progress))
            if staged is not None:
                return staged
        with source.open(info) as stream:
            with self._lock:
                self._streams[uid] = stream
            try:
                if self._cancel.is_set():
                    raise Cancelled()
                watch = getattr(stream, "watch", None)
                if watch is not None:  # a stream that fetches before its first chunk
                    def fetched(n: int) -> None:
                        progress.received = n
                        self._on_progress(uid, n)

                    watch(lambda: self._checkpoint(uid), fetched)
                return stage_series(
                    uid, info, stream.chunks(), staging, root=self.root,
                    checkpoint=lambda: self._checkpoint(uid), progress=progress,
                    on_progress=lambda n: self._on_progress(uid, n), cpu=self._cpu,
                    reader=getattr(stream, "reader", None))
            finally:
                with self._lock:
                    self._streams.pop(uid, None)

    def _stage_remote(self, pool: WorkerPool, uid: str, request: object, info: SeriesInfo,
                      staging: Path, progress: Progress) -> StagedSeries | None:
        """One attempt in a worker process (``engine.procs``); None if none is ready."""

        def opened(attempt: RemoteAttempt) -> None:
            with self._lock:
                self._streams[uid] = attempt
            if not self._running.is_set():
                attempt.hold(True)
            if self._cancel.is_set():
                attempt.abort()

        def opened_counted(attempt: RemoteAttempt) -> None:
            with self._lock:
                self._worker_attempts += 1
            opened(attempt)

        try:
            staged = pool.stage(request, info, staging, self.root, progress=progress,
                                on_progress=lambda n: self._on_progress(uid, n),
                                checkpoint=lambda: self._checkpoint(uid),
                                on_open=opened_counted, cancelled=Cancelled)
        finally:
            with self._lock:
                self._streams.pop(uid, None)
        assert staged is None or isinstance(staged, StagedSeries)
        return staged

    def _failed(self, uid: str, result: SeriesResult, policy: RetryPolicy,
                exc: NbiaError) -> None:
        error = redact(str(exc))
        if isinstance(exc, DiskFullError | JournalError):
            self._finish(uid, SeriesState.ERROR, error)
            raise _Fatal(error)
        if isinstance(exc, DestinationError | NoRoomError):
            self._finish(uid, SeriesState.ERROR, error)
            return
        verdict = Verdict(retry=True) if isinstance(exc, IntegrityError) \
            else self.source.verdict(exc)
        if verdict.fatal:
            self._finish(uid, SeriesState.ERROR, error)
            raise _Fatal(error)
        if verdict.throttle and (shrunk := self.limiter.throttled()) is not None:
            self._emit(Event(EventKind.THROTTLE, uid=uid, source=self.source_name, count=shrunk,
                             message=f"server busy: concurrency down to {shrunk}"))
        if verdict.timeout and (shrunk := self.limiter.timed_out()) is not None:
            self._emit(Event(EventKind.THROTTLE, uid=uid, source=self.source_name, count=shrunk,
                             message=f"repeated timeouts: concurrency down to {shrunk}"))
        if not verdict.retry:
            self._finish(uid, verdict.state, error)
            return
        # A stream held open through a pause may have been dropped by the server or a
        # proxy meanwhile: that is not the series' failure.
        paused = uid in self._paused_attempts
        self._paused_attempts.discard(uid)
        policy = policy.increment(error, counts=not paused)
        if policy.exhausted:
            self._finish(uid, SeriesState.ERROR, f"{error} (after {result.attempts} attempts)")
            return
        self._policies[uid] = policy
        result.error = error
        self._set_progress(uid, 0)
        self._emit(Event(EventKind.RETRY, uid=uid, source=self.source_name,
                         attempt=result.attempts, message=error))
        delay = 0.0 if paused else policy.backoff(verdict.retry_after)
        self.ledger.move(uid, SeriesState.QUEUED, attempt=result.attempts, message=error)
        self.queue.retry_later(uid, delay)

    def _interrupted(self, uid: str, progress: Progress) -> None:
        """A series stopped mid-stream by cancel(): its bytes so far are discarded with
        its staging folder, and fetched again by the next run (the summary says how
        many: ``report.interrupted_bytes``)."""
        if not is_file_uid(uid):  # a file item's part stays in the spool: resumed
            with self._lock:
                self.report.interrupted_bytes += progress.received
        self._finish(uid, SeriesState.INTERRUPTED, "interrupted")

    def _finish(self, uid: str, state: SeriesState, error: str) -> None:
        """A series ends without being published."""
        result = self.results.get(uid)
        if result is not None:
            result.error = "" if state == SeriesState.INTERRUPTED and not error else error
            if state == SeriesState.INTERRUPTED:
                result.error = "interrupted"
        self._policies.pop(uid, None)
        self._set_progress(uid, 0)
        self._set_state(uid, state, error=error)
        self.queue.done(uid)

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

    # -- bookkeeping ------------------------------------------------------------------------
    def _on_progress(self, uid: str, nbytes: int) -> None:
        self._set_progress(uid, nbytes)

    def _set_state(self, uid: str, state: SeriesState, *, error: str | None = None,
                   attempt: int = 0) -> None:
        """A worker's transition: the ledger writes it, the journal records it (a
        start, or an end other than a publish, which writes its own row)."""
        journal = self._journal

        def record(result: SeriesResult) -> None:
            assert journal is not None
            with contextlib.suppress(NbiaError):
                journal.set_state(uid, state, error=error, attempts=result.attempts or None,
                                  info=result.info if state in FAILED_STATES else None)

        journaled = state != SeriesState.COMPLETE and journal is not None and (
            state == SeriesState.DOWNLOADING or state in FINAL_STATES)
        self.ledger.move(uid, state, attempt=attempt, message=error or "",
                         record=record if journaled else None)

    def _set_progress(self, uid: str, nbytes: int) -> None:
        result = self.results.get(uid)
        if result is not None:
            result.bytes_done = nbytes
        self._emit(Event(EventKind.PROGRESS, uid=uid, source=self.source_name, series_bytes=nbytes))

    def _emit(self, event: Event) -> None:
        for callback in list(self._subscribers):
            with contextlib.suppress(Exception):
                callback(event)


#: Where a file item's transfer keeps its part file (``<root>/.nbia/files/``), handed to
#: a source whose ``bind_run`` takes ``files=``: on the root's file system, so the
#: verified file is published by a link, never copied.
FILES_DIR = "files"


def _holds_its_images(folder: Path, entry: JournalEntry) -> bool:
    """A row another run wrote (or someone planted) is believed when its folder, inside
    the root (the journal checked that), holds at least its files and its images."""
    images = entry.info.image_count if entry.info is not None else None
    count = file_count(folder)
    return count is not None and count >= max(entry.nfiles, images or 0, 1)


def make_engine(
    manifest: Manifest | str | os.PathLike[str] | Sequence[str],
    dest: str | os.PathLike[str] = ".",
    **kwargs: Unpack[DownloadKwargs],
) -> Engine:
    """Build an :class:`Engine` from a manifest (object, path, or list of UIDs).

    ``kwargs`` are :class:`DownloadOptions` fields plus ``user``/``password``
    (:class:`~.options.DownloadKwargs`, which mypy checks); an unknown name is a
    :class:`UsageError` naming it, for callers mypy does not see.
    """

    if isinstance(manifest, str | os.PathLike):
        manifest = read_manifest(manifest)
    elif not isinstance(manifest, Manifest):
        uids = list(manifest)
        manifest = Manifest(series_uids=tuple(dict.fromkeys(uids)), headers={}, source=None,
                            duplicates_dropped=len(uids) - len(set(uids)))
    options: dict[str, Any] = dict(kwargs)
    user, password = options.pop("user", None), options.pop("password", None)
    source = options.pop("source", None)
    if isinstance(source, str):  # a registry name is an option; an object is the source
        options["source"], source = source, None
    confirm = options.pop("confirm_host", None)
    known = set(DownloadOptions.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"unknown download option {unknown[0]!r}; known: "
                         f"{', '.join(sorted(known - {'credentials'}))}")
    opts = DownloadOptions()
    if user:
        opts.credentials = Credentials(str(user), str(password or ""))
    opts = replace(opts, **options)
    use_proxy(opts.proxy)  # process-wide: the worker processes inherit it
    session = session_for(manifest, opts, confirm=confirm)  # the Python API's one session
    return Engine(manifest, dest, opts, source=source, session=session)
