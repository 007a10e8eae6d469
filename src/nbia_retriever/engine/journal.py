"""The download journal: what happened to every series, durable across crashes.

A SQLite file in ``<root>/.nbia/`` records each series' state, attempts, last error,
where it was published, how many files it holds and the MD5 of every file. It is what
makes a re-run resume (skip verified series in one bulk read, retry the rest), what
``--only-failed`` reads, and what ``verify`` checks the files against. SQLite gives
atomic commits for free, so a SIGKILL at any moment leaves either the old or the new
row, never half of one.

Writes that concern many series at once (the rows of a new manifest, a batch of series
that turned out to be unavailable, adopted folders) are one transaction each, with
prepared statements: planning 200,000 series must cost milliseconds here, not minutes.
Metadata is stored when a series ends (complete or failed), not while planning.

Rows are input like a manifest (a shared root is a group folder: anyone of the group can
plant a journal in ``.nbia/`` or add rows to a group-writable one). Every read checks the
folder a row names (:mod:`.rows`): a row naming one outside the root, or through a
symbolic link, is never handed out as Complete; such rows are counted per journal
(:attr:`Journal.refused`, :meth:`Journal.refused_message`) for one warning each. Rows
this user wrote carry a MAC (column ``mac``) that lets a re-run believe them by one
``stat``; :meth:`Journal.completed_index` says which do.

Each run also leaves one row in the ``runs`` table (:class:`RunRecord`): the manifest it
read (its path and a copy of its header lines), the server(s) and API it used, signed
like a Complete row. So ``verify --server``, ``--repair``, ``list -d`` and the view ask
the server the files came from (:func:`root_origin`), not the public default; a record
this user did not sign is shown and asked about, never trusted with a password.
Journals older than the table simply have no record (None).

The journal never stores credentials: it has no column that could hold one, and every
error text is redacted (:func:`~nbia_retriever.untrusted.redact`) before it is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import DestinationError, JournalError
from ..models import INFO_FIELDS, LEGACY_CANCELLED, SeriesInfo, SeriesState, is_file_uid
from ..ondisk import check_database, journal_paths
from ..untrusted import plain, redact
from .rows import (
    REFUSED,
    FolderCheck,
    refused_message,
    row_key,
    row_kind_ok,
    row_relpath_ok,
    sign,
    signed,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    relpath TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '',
    files TEXT NOT NULL DEFAULT '',
    bytes INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL DEFAULT 0,
    completed REAL NOT NULL DEFAULT 0,
    nfiles INTEGER NOT NULL DEFAULT 0,
    folder_mtime INTEGER NOT NULL DEFAULT 0,
    adopted INTEGER NOT NULL DEFAULT 0,
    checked REAL NOT NULL DEFAULT 0,
    mac TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT 'nbia'
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    started REAL NOT NULL,
    manifest TEXT NOT NULL DEFAULT '',
    headers TEXT NOT NULL DEFAULT '',
    servers TEXT NOT NULL DEFAULT '',
    chosen INTEGER NOT NULL DEFAULT 0,
    api TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    mac TEXT NOT NULL DEFAULT ''
);
"""
#: Characters of a manifest's header lines kept in a run record (a manifest's header is
#: a few hundred bytes; a planted one must not make every reader load megabytes).
RUN_HEADERS_MAX = 8192
#: The covering index of :meth:`Journal.completed_index` (made after the columns exist).
#: (``state`` is a column too: without it SQLite does not take the index as covering.)
COMPLETE_INDEX = ("CREATE INDEX IF NOT EXISTS finished_rows ON series (state, uid, relpath, "
                  "nfiles, folder_mtime, checked, mac) WHERE state = 'Complete'")
#: Columns added after the first release: (name, definition). Old journals get them.
ADDED_COLUMNS = (
    ("nfiles", "INTEGER NOT NULL DEFAULT 0"),
    ("folder_mtime", "INTEGER NOT NULL DEFAULT 0"),
    ("adopted", "INTEGER NOT NULL DEFAULT 0"),
    ("checked", "REAL NOT NULL DEFAULT 0"),
    ("mac", "TEXT NOT NULL DEFAULT ''"),
    # Where the series came from (``DownloadOptions.source``); every row older than
    # this column came from an NBIA server, the only source there was.
    ("source", "TEXT NOT NULL DEFAULT 'nbia'"),
)
#: A folder mtime recorded less than this long after the mtime itself may hide a change
#: made in the same clock tick (file systems keep coarse timestamps): not trusted alone.
RACY_SECONDS = 2.0
#: Numbers and texts cast in SQL: a planted row may hold any type in any column.
_COLUMNS = ("uid, CAST(state AS TEXT), CAST(attempts AS INTEGER), CAST(last_error AS TEXT),"
            " relpath, metadata, files, CAST(bytes AS INTEGER), CAST(completed AS REAL),"
            " CAST(nfiles AS INTEGER), CAST(adopted AS INTEGER), CAST(source AS TEXT)")
COMPLETE = SeriesState.COMPLETE.value
T = TypeVar("T")


def _state(value: object) -> str:
    """A row's state as today's string: journals before issue 25 say "Cancelled" for
    what is now "Interrupted"."""
    text = value if isinstance(value, str) else str(value)
    return SeriesState.INTERRUPTED.value if text == LEGACY_CANCELLED else text


@dataclass(frozen=True, slots=True)
class RunRecord:
    """Where one run's series came from (one row of the ``runs`` table).

    ``manifest`` is the manifest's absolute path ("" for a list of UIDs given in Python
    or a repair), ``headers`` a copy of its header lines (``key=value``, one a line),
    ``servers`` the services root(s) it talked to, ``chosen`` whether the user named the
    first (``--api-url``) rather than the manifest, ``api`` the API option (``auto``,
    ``v1``, ``v4``...), ``source`` the source's registry name. ``trusted``: the row
    carries this user's MAC (:func:`~.rows.row_key`), so this user wrote it; anything
    else is a claim from whoever could write the folder, like a manifest's.
    """

    started: float
    manifest: str = ""
    headers: str = ""
    servers: tuple[str, ...] = ()
    chosen: bool = False
    api: str = ""
    source: str = ""
    trusted: bool = False
    journal: str = ""

    @property
    def server(self) -> str | None:
        """The (first) services root the run talked to, if recorded."""
        return self.servers[0] if self.servers else None

    def _message(self) -> bytes:
        text = "\0".join((repr(self.started), self.manifest, self.headers,
                          "\n".join(self.servers), str(int(self.chosen)), self.api,
                          self.source))
        return text.encode("utf-8", "surrogatepass")

    def mac(self, key: bytes) -> str:
        return hashlib.blake2b(self._message(), key=key, digest_size=16,
                               person=b"nbia-run").hexdigest()


def header_lines(headers: dict[str, str]) -> str:
    """A manifest's headers as the lines it had (``key=value``), without any
    ``user:password@`` a URL value may carry, cut at :data:`RUN_HEADERS_MAX`."""
    lines = []
    for key, value in headers.items():
        if "://" in value and "@" in value.partition("://")[2].partition("/")[0]:
            scheme, _, rest = value.partition("://")
            netloc, slash, tail = rest.partition("/")
            value = f"{scheme}://{netloc.rpartition('@')[2]}{slash}{tail}"
        lines.append(f"{key}={value}")
    return "\n".join(lines)[:RUN_HEADERS_MAX]


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One published file: its name inside the series folder, size and MD5 (``""`` for
    a file adopted from an existing tree and not hashed)."""

    name: str
    size: int
    md5: str


@dataclass(slots=True)
class CompleteRecord:
    """What a re-run needs to skip a finished series without opening anything.

    Not frozen: a re-run makes one per finished series, and fills in ``stamp`` once it
    has looked at all the folders at once (a frozen dataclass is made in three times
    the time).

    ``folder_mtime`` is the folder's stamp (:func:`~.rows.folder_stamp`, its ctime on
    POSIX) when it was last seen complete, at time ``checked``. Only a record checked
    well after that stamp proves, by an equal stamp alone, that nothing changed (the
    "racy timestamp" problem git's index knows), and only if this user wrote it
    (``trusted``: its MAC holds). ``stamp`` is the folder's stamp now (None: no folder
    there), read when the journal was; ``images`` the image count of the row's
    metadata for rows not ``trusted`` (their folders are counted against it).
    """

    relpath: str
    nfiles: int
    folder_mtime: int
    checked: float = 0.0
    trusted: bool = False
    stamp: int | None = None
    images: int = 0

    def unchanged(self, mtime: int) -> bool:
        return (self.trusted and self.folder_mtime != 0 and mtime == self.folder_mtime
                and self.checked - mtime / 1e9 > RACY_SECONDS)

    @property
    def needs(self) -> int:
        """The files its folder must hold at least to be believed by a count."""
        return max(self.nfiles, 1) if self.trusted else max(self.nfiles, self.images, 1)


#: UIDs per statement of :meth:`Journal.ensure` (its JSON text stays about a megabyte).
_ENSURE_BLOCK = 20_000


def _json_strings(values: list[str]) -> str:
    """``json.dumps(values)``, by a join when nothing needs escaping (UIDs nearly never
    do): ten times faster, a third of a second for 1,000,000 UIDs."""
    text = "".join(values)
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return '["' + '","'.join(values) + '"]' if values else "[]"
    return json.dumps(values)


@dataclass(frozen=True)
class JournalEntry:
    uid: str
    state: str
    attempts: int
    last_error: str
    relpath: str
    info: SeriesInfo | None
    files: tuple[FileRecord, ...]
    bytes: int
    completed: float
    nfiles: int = 0
    adopted: bool = False
    source: str = "nbia"


def info_to_json(info: SeriesInfo) -> str:
    data: dict[str, Any] = {name: getattr(info, name) for name in INFO_FIELDS}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def info_from_json(text: str) -> SeriesInfo | None:
    if not text:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            return None
        data.pop("extra", None)
        known = {k: v for k, v in data.items() if k in INFO_FIELDS}
        return SeriesInfo(**known)
    except (ValueError, TypeError, RecursionError):
        return None


def damaged_message(path: Path, exc: BaseException) -> str:
    """How to get out of a journal SQLite cannot read, in one line."""
    return (f"the download journal {path} is damaged ({plain(str(exc))}): move it aside "
            f"(mv {path} {path}.damaged) and re-run the same command; series already on "
            "disk are recognised and adopted without downloading them again")


def write_failed_message(path: Path, exc: BaseException) -> str:
    text = str(exc).lower()
    if "full" in text or "disk" in text or "space" in text:
        return (f"cannot write the download journal {path} (disk full): free some space, "
                "then re-run the same command to resume")
    return (f"cannot write the download journal {path} ({plain(str(exc))}); re-run the same "
            "command to resume")


class Journal:
    """Thread-safe access to one journal file (one connection, one lock, WAL mode).

    Every SQLite failure comes out as :class:`~nbia_retriever.errors.JournalError` with a
    message that says how to recover (a damaged file, a full disk), never as a raw
    ``sqlite3`` exception.
    """

    def __init__(self, path: Path, *, readonly: bool = False, source: str = "nbia") -> None:
        self.path = Path(path)
        self.readonly = readonly
        #: The source this run downloads from: written on every row it adds or changes.
        self.source = source
        #: Where one series came from, when the source routes series (``auto``: "nbia",
        #: or IDC's bucket, version folder and release: ``verify --server`` reads it).
        self.source_of: Callable[[str], str] | None = None
        self._lock = threading.Lock()
        self._ensure_thread: threading.Thread | None = None
        self._ensure_error: JournalError | None = None
        #: uids of rows that named a folder outside the root (never handed out Complete)
        self.refused: set[str] = set()
        self._folders = FolderCheck(self.path.parent.parent)  # <root>/.nbia/<journal>
        check_database(self.path)  # no link, FIFO or device: SQLite opens by name
        try:
            if readonly:
                # as_uri escapes what a URI would read otherwise ('#', '?', '%' in a name)
                uri = self.path.absolute().as_uri() + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False,
                                           isolation_level=None)
                self._db.execute("PRAGMA busy_timeout=30000")
                self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
                self._columns = self._column_names()
                return
            self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._columns = self._column_names()
            self._migrate()
            # What a re-run reads of each finished series, in an index of its own: the
            # scan then reads ~30 bytes a row instead of the whole row (metadata, file
            # list), 0.18 against 0.55 s for 200,000 series. Partial, so the rows of
            # series still to do (a million written while planning) never touch it.
            self._db.execute(COMPLETE_INDEX)
        except sqlite3.DatabaseError as exc:
            if getattr(self, "_db", None) is not None:
                self._db.close()
            if isinstance(exc, sqlite3.OperationalError) and not _is_corruption(exc):
                raise JournalError(write_failed_message(self.path, exc)) from None
            raise JournalError(damaged_message(self.path, exc)) from None

    def _column_names(self) -> set[str]:
        return {row[1] for row in self._db.execute("PRAGMA table_info(series)")}

    def _migrate(self) -> None:
        missing = [(n, d) for n, d in ADDED_COLUMNS if n not in self._columns]
        if not missing:
            return
        self._db.execute("BEGIN IMMEDIATE")
        for name, definition in missing:
            self._db.execute(f"ALTER TABLE series ADD COLUMN {name} {definition}")
        if any(name == "nfiles" for name, _ in missing):
            rows = self._db.execute("SELECT uid, files FROM series WHERE state = ?",
                                    (COMPLETE,)).fetchall()
            self._db.executemany("UPDATE series SET nfiles = ? WHERE uid = ?",
                                 ((len(_files(files)), uid) for uid, files in rows))
        self._db.execute("COMMIT")
        self._columns = self._column_names()

    def close(self) -> None:
        with contextlib.suppress(JournalError):
            self.wait()
        with self._lock:
            self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, work: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
        with self._lock:
            try:
                return work(self._db)
            except sqlite3.DatabaseError as exc:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                if _is_corruption(exc):
                    raise JournalError(damaged_message(self.path, exc)) from None
                if write:
                    raise JournalError(write_failed_message(self.path, exc)) from None
                raise JournalError(f"cannot read the download journal {self.path} "
                                   f"({plain(str(exc))})") from None

    def _many(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN")
            db.executemany(sql, rows)
            db.execute("COMMIT")

        self._run(work, write=True)

    # -- reads --------------------------------------------------------------------------
    def states(self) -> dict[str, str]:
        """uid -> state for every series, in one query (the fast path of a no-op re-run)."""
        states: dict[str, str] = self._run(
            lambda db: dict(db.execute("SELECT uid, state FROM series")))
        old = [uid for uid, state in states.items() if state == LEGACY_CANCELLED]
        for uid in old:
            states[uid] = SeriesState.INTERRUPTED.value
        return states

    def runs(self) -> list[RunRecord]:
        """Every run recorded in this journal, oldest first ([] for a journal older than
        the ``runs`` table). Types are forced: a planted row may hold anything."""
        def work(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                "AND name = 'runs'").fetchone()
            if not exists:
                return []
            return db.execute(
                "SELECT CAST(started AS REAL), CAST(manifest AS TEXT), "
                f"substr(CAST(headers AS TEXT), 1, {RUN_HEADERS_MAX}), "
                "CAST(servers AS TEXT), CAST(chosen AS INTEGER), CAST(api AS TEXT), "
                "CAST(source AS TEXT), CAST(mac AS TEXT) FROM runs "
                "ORDER BY started LIMIT 1000").fetchall()

        key = row_key()
        records = []
        for started, manifest, headers, servers, chosen, api, source, mac in self._run(work):
            try:
                urls = json.loads(servers or "[]")
            except (ValueError, RecursionError):
                urls = []
            if not isinstance(urls, list):
                urls = []
            record = RunRecord(float(started or 0), manifest or "", headers or "",
                               tuple(u for u in urls if isinstance(u, str))[:8],
                               bool(chosen), api or "", source or "", journal=str(self.path))
            trusted = key is not None and isinstance(mac, str) and hmac.compare_digest(
                mac, record.mac(key))
            records.append(dataclasses.replace(record, trusted=trusted))
        return records

    def refused_message(self) -> str | None:
        """One warning naming this journal when rows read so far named folders outside
        the root; None when none did."""
        return refused_message(self.path, len(self.refused)) if self.refused else None

    def _inside(self, uid: str, relpath: object) -> bool:
        """The row's folder is inside the root (absent is fine: just not there)."""
        file = isinstance(uid, str) and is_file_uid(uid)  # a file item names its file
        if not row_relpath_ok(uid, relpath) or \
                self._folders.folder(relpath, file=file) is REFUSED:
            self.refused.add(uid)
            return False
        return True

    def completed(self) -> dict[str, str]:
        """uid -> relpath of every complete series whose folder is inside the root."""
        rows = self._run(lambda db: db.execute(
            "SELECT uid, relpath FROM series WHERE state = ?", (COMPLETE,)).fetchall())
        return {uid: relpath for uid, relpath in rows if self._inside(uid, relpath)}

    def completed_index(self) -> dict[str, CompleteRecord]:
        """uid -> :class:`CompleteRecord` of every complete series whose folder is inside
        the root, in one query and one look at each folder (:meth:`.rows.FolderCheck.stamps`);
        the file count is a column
        of its own, never parsed from the list. Types are forced in SQL: a planted row
        may hold anything in any column."""
        has_mtime = "checked" in self._columns
        has_nfiles = "nfiles" in self._columns
        has_mac = "mac" in self._columns
        key = row_key()

        def work(db: sqlite3.Connection) -> dict[str, CompleteRecord]:
            cols = ("uid, CASE WHEN typeof(relpath) = 'text' THEN relpath ELSE '' END, "
                    + ("CAST(nfiles AS INTEGER)" if has_nfiles else "files") + ", "
                    + ("CAST(folder_mtime AS INTEGER), CAST(checked AS REAL)" if has_mtime
                       else "0, 0.0") + ", " + ("mac" if has_mac else "''"))
            # The state as a literal: only then may SQLite use the partial index.
            rows = db.execute(f"SELECT {cols} FROM series WHERE state = '{COMPLETE}'")
            index: dict[str, CompleteRecord] = {}
            for uid, relpath, n, mtime, checked, mac in rows:  # streamed: no list of rows
                nfiles = n if has_nfiles else len(_files(n))
                trusted = signed(key, mac, uid, COMPLETE, relpath, nfiles, mtime, checked)
                index[uid] = CompleteRecord(relpath, nfiles, mtime, checked, trusted)
            return index

        index = self._run(work)
        # Where each folder is, all at once (in path order: each study folder opened
        # once); rows naming one outside the root are dropped and counted.
        # A row naming a file for a series, or a folder for a file item: refused too.
        refused: list[str] = []
        stamps = self._folders.stamps([record.relpath for record in index.values()])
        files = self._folders.files_seen
        doubted: list[str] = []
        for uid, record in index.items():
            stamp = stamps[record.relpath]
            if stamp is REFUSED:
                refused.append(uid)
                continue
            # A series row naming a file, or a file item's row a folder: refused too
            # (two cheap tests a row; the full rule only for the rare file rows).
            if ((files and record.relpath in files) or type(uid) is not str or ":" in uid) \
                    and not row_kind_ok(uid, record.relpath):
                refused.append(uid)
                continue
            if stamp is not None:
                record.stamp = int(stamp)
            if not record.trusted:
                doubted.append(uid)
        for uid in refused:
            del index[uid]
        self.refused.update(refused)
        if doubted:
            self._add_images(index, doubted)
        # A file item's file not proven unchanged by its signed stamp must have its
        # recorded size (a count of one file would prove nothing).
        sized = [uid for uid, record in index.items()
                 if record.stamp is not None and is_file_uid(uid)
                 and not record.unchanged(record.stamp)]
        if sized:
            self._check_sizes(index, sized)
        return index

    def _check_sizes(self, index: dict[str, CompleteRecord], uids: list[str]) -> None:
        """File items whose file's size is not the row's ``bytes``: taken as absent
        (``stamp`` None), so they are fetched again. The parents were just checked
        without following links (:meth:`.rows.FolderCheck.stamps`); the leaf is
        ``lstat``'d."""
        root = self._folders.root
        rows: list[tuple[str, int]] = []
        for start in range(0, len(uids), 500):  # by key: a few among many series
            block = uids[start:start + 500]
            rows += self._run(lambda db, block=block: db.execute(  # type: ignore[misc]
                "SELECT uid, CAST(bytes AS INTEGER) FROM series WHERE uid IN "
                f"({','.join('?' * len(block))})", block).fetchall())
        for uid, nbytes in rows:
            record = index[uid]
            try:
                size = os.lstat(root + record.relpath).st_size
            except OSError:
                size = -1
            if size != nbytes:
                record.stamp = None

    def _add_images(self, index: dict[str, CompleteRecord], uids: list[str]) -> None:
        """The image counts of rows not believed without a count, from their metadata
        (parsed only for them: a re-run of our own rows parses none), streamed."""
        wanted = set(uids)

        def work(db: sqlite3.Connection) -> None:
            for uid, metadata in db.execute(
                    "SELECT uid, metadata FROM series WHERE state = ?", (COMPLETE,)):
                if uid not in wanted:
                    continue
                info = info_from_json(metadata) if isinstance(metadata, str) else None
                images = info.image_count if info is not None else None
                if isinstance(images, int) and images > 0:
                    index[uid].images = images

        self._run(work)

    def get(self, uid: str) -> JournalEntry | None:
        row = self._run(lambda db: db.execute(
            f"SELECT {self._select()} FROM series WHERE uid = ?", (uid,)).fetchone())
        return self._entry(row) if row else None

    def entries(self, state: str | None = None) -> Iterator[JournalEntry]:
        query = f"SELECT {self._select()} FROM series"
        args: tuple[str, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            args = (state,)
        rows = self._run(lambda db: db.execute(query, args).fetchall())
        for row in rows:
            entry = self._entry(row)
            if state is None or entry.state == state:
                yield entry

    def _entry(self, row: tuple[Any, ...]) -> JournalEntry:
        """A row as an entry; one naming a folder outside the root comes out not done,
        without its folder (and is counted in :attr:`refused`)."""
        entry = _entry(row)
        if entry.relpath and not self._inside(entry.uid, entry.relpath):
            return dataclasses.replace(
                entry, state=SeriesState.NOT_STARTED.value, relpath="",
                last_error="its journal row named a folder outside the download root")
        return entry

    def _select(self) -> str:
        columns = _COLUMNS
        if "source" not in self._columns:  # a read-only look at an older journal
            columns = columns.replace("CAST(source AS TEXT)", "'nbia'")
        if "nfiles" in self._columns:
            return columns
        return columns.replace(" CAST(nfiles AS INTEGER), CAST(adopted AS INTEGER)", " 0, 0")

    def get_info(self, key: str) -> str | None:
        row = self._run(lambda db: db.execute(
            "SELECT value FROM info WHERE key = ?", (key,)).fetchone())
        return row[0] if row else None

    # -- writes -------------------------------------------------------------------------
    def record_run(self, record: RunRecord) -> None:
        """Add this run's record (once per run), signed with this user's key."""
        key = row_key(create=True)
        mac = record.mac(key) if key else ""
        self._run(lambda db: db.execute(
            "INSERT INTO runs (started, manifest, headers, servers, chosen, api, source, "
            "mac) VALUES (?,?,?,?,?,?,?,?)",
            (record.started, record.manifest, record.headers[:RUN_HEADERS_MAX],
             json.dumps(list(record.servers)), int(record.chosen), record.api,
             record.source, mac)), write=True)

    def set_info(self, key: str, value: str) -> None:
        self._run(lambda db: db.execute(
            "INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)", (key, value)), write=True)

    def ensure(self, uids: Iterable[str], state: str, *, wait: bool = True) -> None:
        """Add rows for series not yet in the journal (existing rows are left alone).

        In key order: inserting 200,000 rows sorted takes half the time of the manifest's
        order (the B-tree is walked, not jumped around). In blocks of
        :data:`_ENSURE_BLOCK`, a transaction each, so other writers get their turn.

        Without ``wait`` the blocks are written by a thread of their own while the caller
        goes on (planning a 1,000,000-series download fetches metadata meanwhile: SQLite
        works without the GIL); :meth:`wait` joins it and raises what it met. Any order
        of these rows and other writes gives the same journal: a row that exists is
        left alone.
        """
        ordered = sorted(uids)
        if not ordered:
            return
        now = time.time()

        def write() -> None:
            for start in range(0, len(ordered), _ENSURE_BLOCK):
                block = ordered[start:start + _ENSURE_BLOCK]
                self._run(functools.partial(self._ensure_block, block=block, state=state,
                                            now=now, source=self.source), write=True)

        self.wait()
        if wait:
            write()
            return

        def background() -> None:
            try:
                write()
            except JournalError as exc:
                self._ensure_error = exc
            except Exception as exc:  # never lost in a thread: wait() raises it
                self._ensure_error = JournalError(write_failed_message(self.path, exc))

        self._ensure_thread = threading.Thread(target=background, daemon=True,
                                               name="nbia-journal-rows")
        self._ensure_thread.start()

    def wait(self) -> None:
        """Wait for rows :meth:`ensure` is writing in the background; raise its error."""
        thread, self._ensure_thread = self._ensure_thread, None
        if thread is not None:
            thread.join()
        error, self._ensure_error = self._ensure_error, None
        if error is not None:
            raise error

    @staticmethod
    def _ensure_block(db: sqlite3.Connection, *, block: list[str], state: str,
                      now: float, source: str) -> None:
        db.execute("BEGIN")
        try:  # one parameter that SQLite walks in C: a third faster than executemany
            db.execute("INSERT OR IGNORE INTO series (uid, state, updated, source) "
                       "SELECT value, ?, ?, ? FROM json_each(?)",
                       (state, now, source, _json_strings(block)))
        except sqlite3.OperationalError as exc:
            if "json_each" not in str(exc):
                raise
            # An SQLite without JSON1 (older than 3.38 and built without it).
            db.executemany("INSERT OR IGNORE INTO series (uid, state, updated, source) "
                           "VALUES (?, ?, ?, ?)", ((uid, state, now, source) for uid in block))
        db.execute("COMMIT")

    def set_state(self, uid: str, state: str, *, error: str | None = None,
                  attempts: int | None = None, info: SeriesInfo | None = None) -> None:
        self.set_states([(uid, state, error, attempts, info)])

    def set_states(self, rows: Iterable[tuple[str, str, str | None, int | None,
                                              SeriesInfo | None]]) -> None:
        """Many state changes in one transaction: (uid, state, error, attempts, info)."""
        now = time.time()
        prepared = [
            (uid, state, now, "" if error is None else redact(error), error is not None,
             attempts or 0, attempts is not None,
             info_to_json(info) if info is not None else "", info is not None)
            for uid, state, error, attempts, info in rows
        ]
        if not prepared:
            return
        source, source_of = self.source, self.source_of

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO series (uid, state, updated, source) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(uid) DO UPDATE SET state = excluded.state,"
                " updated = excluded.updated, source = excluded.source",
                ((p[0], p[1], p[2], source if source_of is None else source_of(p[0]))
                 for p in prepared))
            db.executemany("UPDATE series SET last_error = ? WHERE uid = ?",
                           ((p[3], p[0]) for p in prepared if p[4]))
            db.executemany("UPDATE series SET attempts = ? WHERE uid = ?",
                           ((p[5], p[0]) for p in prepared if p[6]))
            db.executemany("UPDATE series SET metadata = ? WHERE uid = ?",
                           ((p[7], p[0]) for p in prepared if p[8]))
            db.execute("COMMIT")

        self._run(work, write=True)

    def mark_complete(self, uid: str, *, relpath: str, files: Iterable[FileRecord],
                      nbytes: int, attempts: int, info: SeriesInfo, folder_mtime: int = 0,
                      adopted: bool = False) -> None:
        self.mark_complete_many([(uid, relpath, tuple(files), nbytes, attempts, info,
                                  folder_mtime, adopted)])

    def mark_complete_many(self, rows: Iterable[tuple[str, str, tuple[FileRecord, ...], int,
                                                      int, SeriesInfo, int, bool]]) -> None:
        """Series published or adopted now; ``folder_mtime`` is the folder's stamp
        (:func:`~.rows.folder_stamp`). Each row is signed with this user's key."""
        now = time.time()
        key = row_key(create=True)
        source, source_of = self.source, self.source_of
        self._many(
            "INSERT OR REPLACE INTO series (uid, state, attempts, last_error, relpath,"
            " metadata, files, bytes, updated, completed, nfiles, folder_mtime, adopted,"
            " checked, mac, source) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            ((uid, COMPLETE, attempts, "", relpath, info_to_json(info),
              json.dumps([[f.name, f.size, f.md5] for f in files], separators=(",", ":")),
              nbytes, now, now, len(files), folder_mtime, int(adopted), now,
              sign(key, uid, COMPLETE, relpath, len(files), folder_mtime, now) if key else "",
              source if source_of is None else source_of(uid))
             for uid, relpath, files, nbytes, attempts, info, folder_mtime, adopted in rows))

    def set_folder_mtimes(self, rows: Iterable[tuple[str, str, int, int]]) -> None:
        """Folders seen complete now, (uid, relpath, nfiles, stamp), in one transaction:
        each row signed anew, with the number of files its folder was found to hold at
        least. A row changed meanwhile (another relpath, no longer Complete) is left
        alone."""
        now = time.time()
        key = row_key(create=True)
        self._many("UPDATE series SET folder_mtime = ?, checked = ?, nfiles = ?, mac = ?"
                   " WHERE uid = ? AND state = ? AND relpath = ?",
                   ((stamp, now, nfiles,
                     sign(key, uid, COMPLETE, relpath, nfiles, stamp, now) if key else "",
                     uid, COMPLETE, relpath) for uid, relpath, nfiles, stamp in rows))


#: The journal's ``info`` key of :func:`rows_mark`.
ROWS_MARK = "report_rows_mark"


def rows_mark(key: bytes | None, files: Iterable[Path], uids: Iterable[str]) -> str | None:
    """A MAC over the report files (``metadata.csv``, ``files.csv``: inode, size, mtime,
    ctime, or absent) and the set of complete series ``uids``, which a run stores in
    ``info`` once every one of those series has its report row: the next run computing
    the same mark knows so without reading the files (50,000 rows, a sixth of a no-op
    re-run). Any append, rewrite or other set of complete series changes it (a ctime
    cannot be set back), and only this user's key makes one (None without a key): a
    planted or stale mark only costs the full check, which re-adds missing rows."""
    if key is None:
        return None
    mac = hashlib.blake2b(key=key, digest_size=16)
    for path in files:
        try:
            st = os.stat(path, follow_symlinks=False)
            mac.update(f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\0"
                       .encode())
        except OSError:
            mac.update(b"-\0")
    mac.update("\n".join(sorted(uids)).encode("utf-8", "surrogatepass"))
    return mac.hexdigest()


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return (not isinstance(exc, sqlite3.OperationalError)
            or "malformed" in text or "not a database" in text or "corrupt" in text)


def _files(payload: str) -> tuple[FileRecord, ...]:
    if not payload:
        return ()
    try:
        return tuple(FileRecord(str(n), int(s), str(m)) for n, s, m in json.loads(payload))
    except (ValueError, TypeError, RecursionError):
        return ()


def _entry(row: tuple[Any, ...]) -> JournalEntry:
    uid, state, attempts, last_error, relpath, metadata, files, nbytes, completed, nfiles, \
        adopted, source = row
    records = _files(files)
    return JournalEntry(uid, _state(state), attempts, last_error, relpath, info_from_json(metadata),
                        records, nbytes, completed, int(nfiles or len(records)), bool(adopted),
                        source or "nbia")


def root_origin(root: Path) -> RunRecord | None:
    """Where the series of download root ``root`` came from: the newest run record of
    its journals (with the manifest of the newest run that read one: a ``verify
    --repair`` has none), or None when no journal has one (journals older than the
    record, or no journal). Read-only: nothing is created or changed.

    The record says ``trusted`` only if this user wrote it; otherwise its server is a
    claim of whoever could write the folder: show it and ask before using it, and never
    send a password there on its word (the caller's host policy decides). Records this
    user wrote win over newer ones of anyone else.
    """
    records: list[RunRecord] = []
    for path in journal_paths(Path(root)):
        try:
            with Journal(path, readonly=True) as journal:
                records.extend(journal.runs())
        except DestinationError:
            continue
    if not records:
        return None
    # This user's own records first: a row planted later by someone else must not
    # outrank them (it would name the server of its choosing).
    mine = [r for r in records if r.trusted]
    records = sorted(mine or records, key=lambda r: r.started)
    newest = records[-1]
    if not newest.manifest:
        with_manifest = [r for r in records if r.manifest]
        if with_manifest:
            last = with_manifest[-1]
            newest = dataclasses.replace(newest, manifest=last.manifest, headers=last.headers,
                                         trusted=newest.trusted and last.trusted)
    return newest
