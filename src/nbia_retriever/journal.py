"""The download journal: what happened to every series, durable across crashes.

A SQLite file in ``<root>/.nbia/`` records each series' state, attempts, last error,
where it was published and the MD5 of every file. It is what makes a re-run resume
(skip verified series in milliseconds, retry the rest), what ``--only-failed`` reads,
and what ``verify`` checks the files against. SQLite gives atomic commits for free, so a
SIGKILL at any moment leaves either the old or the new row, never half of one.

The journal never stores credentials: it has no column that could hold one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .models import SeriesInfo

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
    completed REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

COMPLETE = "Complete"


@dataclass(frozen=True)
class FileRecord:
    """One published file: its name inside the series folder, size and MD5."""

    name: str
    size: int
    md5: str


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


def info_to_json(info: SeriesInfo) -> str:
    data = asdict(info)
    data["extra"] = dict(info.extra)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def info_from_json(text: str) -> SeriesInfo | None:
    if not text:
        return None
    try:
        data = json.loads(text)
        return SeriesInfo(**data)
    except (ValueError, TypeError):
        return None


class Journal:
    """Thread-safe access to one journal file (one connection, one lock, WAL mode)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads --------------------------------------------------------------------------
    def states(self) -> dict[str, str]:
        """uid -> state for every series, in one query (the fast path of a no-op re-run)."""
        with self._lock:
            return dict(self._db.execute("SELECT uid, state FROM series"))

    def completed(self) -> dict[str, str]:
        """uid -> relpath of every complete series."""
        with self._lock:
            rows = self._db.execute("SELECT uid, relpath FROM series WHERE state = ?", (COMPLETE,))
            return dict(rows)

    def completed_files(self) -> dict[str, tuple[str, int]]:
        """uid -> (relpath, number of files) of every complete series, in one query."""
        with self._lock:
            rows = self._db.execute(
                "SELECT uid, relpath, files FROM series WHERE state = ?", (COMPLETE,)
            ).fetchall()
        return {uid: (relpath, files.count("],[") + 1 if files.startswith("[[") else 0)
                for uid, relpath, files in rows}

    def get(self, uid: str) -> JournalEntry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT uid, state, attempts, last_error, relpath, metadata, files, bytes,"
                " completed FROM series WHERE uid = ?", (uid,)
            ).fetchone()
        return _entry(row) if row else None

    def entries(self, state: str | None = None) -> Iterator[JournalEntry]:
        query = ("SELECT uid, state, attempts, last_error, relpath, metadata, files, bytes,"
                 " completed FROM series")
        args: tuple[str, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            args = (state,)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        for row in rows:
            yield _entry(row)

    def get_info(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # -- writes -------------------------------------------------------------------------
    def set_info(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)", (key, value))

    def ensure(self, uids: Iterable[str], state: str) -> None:
        """Add rows for series not yet in the journal (existing rows are left alone)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO series (uid, state, updated) VALUES (?, ?, ?)",
                ((uid, state, now) for uid in uids),
            )
            self._db.execute("COMMIT")

    def set_state(self, uid: str, state: str, *, error: str | None = None,
                  attempts: int | None = None, info: SeriesInfo | None = None) -> None:
        sets = ["state = ?", "updated = ?"]
        args: list[object] = [state, time.time()]
        if error is not None:
            sets.append("last_error = ?")
            args.append(error)
        if attempts is not None:
            sets.append("attempts = ?")
            args.append(attempts)
        if info is not None:
            sets.append("metadata = ?")
            args.append(info_to_json(info))
        args.append(uid)
        with self._lock:
            cur = self._db.execute(f"UPDATE series SET {', '.join(sets)} WHERE uid = ?", args)
            if cur.rowcount == 0:
                self._db.execute(
                    "INSERT INTO series (uid, state, updated) VALUES (?, ?, ?)",
                    (uid, state, time.time()),
                )
                self._db.execute(f"UPDATE series SET {', '.join(sets)} WHERE uid = ?", args)

    def set_infos(self, infos: Iterable[SeriesInfo]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE series SET metadata = ? WHERE uid = ?",
                ((info_to_json(i), i.series_uid) for i in infos),
            )
            self._db.execute("COMMIT")

    def mark_complete(self, uid: str, *, relpath: str, files: Iterable[FileRecord],
                      nbytes: int, attempts: int, info: SeriesInfo) -> None:
        now = time.time()
        payload = json.dumps([[f.name, f.size, f.md5] for f in files], separators=(",", ":"))
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO series (uid, state, attempts, last_error, relpath,"
                " metadata, files, bytes, updated, completed) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (uid, COMPLETE, attempts, "", relpath, info_to_json(info), payload, nbytes,
                 now, now),
            )


def _entry(row: tuple) -> JournalEntry:
    uid, state, attempts, last_error, relpath, metadata, files, nbytes, completed = row
    records: tuple[FileRecord, ...] = ()
    if files:
        try:
            records = tuple(FileRecord(str(n), int(s), str(m)) for n, s, m in json.loads(files))
        except (ValueError, TypeError):
            records = ()
    return JournalEntry(uid, state, attempts, last_error, relpath, info_from_json(metadata),
                        records, nbytes, completed)
