"""The on-disk contract of a download root, in one place.

Everything that names a file or folder the tool writes below the destination lives
here, used by the engine, ``verify`` and ``merge-reports`` alike::

    <dest>/<databasketId minus .tcia>/          the download root
        metadata.csv                            one row per completed series
        <Collection>/LICENSE                    one per collection
        <Collection>/<Patient>/<Study>/<Series>/ 1-01.dcm ... (published by one rename)
        .nbia/root.json                         the layout the root was made with
        .nbia/journal.sqlite                    journal-K-of-N.sqlite per shard
        .nbia/staging/<run>/<uid>/              an attempt in progress (one run's own)
        .nbia/staging/<run>/.lock               held while that run lives
        .nbia/locks/<uid>.lock                  held while a run downloads that series

The destination may be shared (a lab share, a cluster scratch space), so nothing below
the root is trusted to be what it seems: :func:`open_dir` walks a path one component at
a time with ``O_NOFOLLOW`` and refuses a symbolic link anywhere (someone could plant
``Collection -> /home/victim``); files are opened with ``O_NOFOLLOW`` too. The root's
parent, the destination the user typed, may itself be a link: that was their choice.

Two runs may share a root (shards of a job array, a TUI beside a CLI): each keeps its
staging in a folder of its own, and a series is downloaded only under its lock
(:class:`SeriesLock`), so no series is fetched twice at once and no row written twice.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import DestinationError

STATE_DIR = ".nbia"
JOURNAL_NAME = "journal.sqlite"
METADATA_CSV = "metadata.csv"
LICENSE_FILE = "LICENSE"
ROOT_INFO = "root.json"
STAGING_DIR = "staging"
LOCKS_DIR = "locks"
_JOURNAL_RE = re.compile(r"^journal(?:-(\d+)-of-(\d+))?\.sqlite$")
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOCTTY = getattr(os, "O_NOCTTY", 0)
#: Bytes of ``.nbia/root.json`` read at most: it holds a few settings.
ROOT_INFO_MAX = 1 << 16
_FD_OK = os.mkdir in os.supports_dir_fd and os.open in os.supports_dir_fd and bool(_NOFOLLOW)


def journal_name(shard: tuple[int, int] | None) -> str:
    """``journal.sqlite``, or ``journal-K-of-N.sqlite`` for shard K of N."""
    if shard is None:
        return JOURNAL_NAME
    k, n = shard
    return f"journal-{k}-of-{n}.sqlite"


def parse_journal_name(name: str) -> tuple[int, int] | bool | None:
    """``(k, n)`` for a shard journal, ``None`` for the plain one, ``False`` otherwise."""
    match = _JOURNAL_RE.match(name)
    if match is None:
        return False
    if match.group(1):
        return int(match.group(1)), int(match.group(2))
    return None



def atomic_write_text(path: Path, text: str, *, newline: str | None = None) -> Path:
    """The one way a whole file is written: a new temp file in the target folder, then
    one rename, so readers (and a crash) never see half a file.

    The temp file is created with ``O_EXCL`` under a random name (``mkstemp``): a link
    planted in a shared folder is never followed. ``newline`` as for :func:`open`
    (``""`` for text the csv module already terminated). Raises :class:`OSError`;
    callers turn it into their own one-line error.
    """
    import tempfile  # not at start-up of a worker process (which imports ondisk): writers only

    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

def journal_paths(root: Path) -> list[Path]:
    """Every journal of a root (plain and shards), in name order."""
    state = root / STATE_DIR
    try:
        names = sorted(e.name for e in os.scandir(state) if e.is_file(follow_symlinks=False))
    except FileNotFoundError:
        return []
    return [state / n for n in names if parse_journal_name(n) is not False]


# ----------------------------------------------------------------------------- no-follow


def _refuse(path: Path | str, what: str = "is a symbolic link") -> DestinationError:
    if "symbolic link" not in what:
        return DestinationError(f"{path} {what}: refusing to use it (planted inside the "
                                "download root?); remove it and re-run")
    return DestinationError(f"{path} {what}: refusing to follow it (someone else's link "
                            "inside the download root?); remove it and re-run")


def file_kind(mode: int) -> str:
    """What an ``st_mode`` is, for messages: ``"a FIFO"``, ``"a socket"``, ..."""
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def _not_a_file(path: Path | str, mode: int) -> DestinationError:
    return _refuse(path, f"is {file_kind(mode)}, not a file")


def _mode_unless_link(path: Path) -> int | None:
    """``path``'s own ``st_mode`` (``None`` when it is absent); a symbolic link there
    (not in its parents) raises :class:`DestinationError`."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        raise _refuse(path)
    return mode


def check_regular(path: Path) -> None:
    """Raise :class:`DestinationError` unless ``path`` is absent or a regular file (a
    symbolic link, a FIFO, a socket, a device or a folder is refused).

    For files opened by name elsewhere (SQLite): a FIFO planted as the journal would
    block its opener forever, a device would be read (or written) as a database.
    """
    mode = _mode_unless_link(path)
    if mode is not None and not stat.S_ISREG(mode):
        raise _not_a_file(path, mode)


def check_database(path: Path) -> None:
    """:func:`check_regular` for an SQLite file and the companions SQLite opens beside it
    (``-wal``, ``-shm``, ``-journal``), before SQLite sees the path."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        check_regular(path.with_name(path.name + suffix))


def open_dir(base: Path, parts: Sequence[str], *, create: bool = True) -> int:
    """A file descriptor of ``base/parts...``, walked without following any link.

    ``base`` itself is opened normally (it is the user's own choice or already checked).
    Missing components are created when ``create``. Raises :class:`DestinationError`
    naming the component when one is a symbolic link or not a folder, and
    ``FileNotFoundError`` when one is missing and ``create`` is false. The caller closes
    the descriptor.
    """
    fd = os.open(base, _DIR_FLAGS)
    path = base
    try:
        for part in parts:
            path = path / part
            if create:
                with contextlib.suppress(FileExistsError):
                    if _FD_OK:
                        os.mkdir(part, 0o777, dir_fd=fd)
                    else:  # pragma: no cover - Windows: best effort with lstat
                        os.mkdir(path, 0o777)
            try:
                if _FD_OK:
                    child = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
                else:  # pragma: no cover
                    if path.is_symlink():
                        raise _refuse(path)
                    child = os.open(path, _DIR_FLAGS)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EMLINK):
                    raise _refuse(path) from None
                if exc.errno == errno.ENOTDIR:
                    try:
                        mode: int | None = os.lstat(path).st_mode
                    except OSError:
                        mode = None
                    if mode is not None and stat.S_ISLNK(mode):
                        raise _refuse(path) from None
                    raise _refuse(path, "is not a folder" if mode is None
                                  else f"is {file_kind(mode)}, not a folder") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_dir(base: Path, parts: Sequence[str]) -> Path:
    """``base/parts...`` created as needed, with no symbolic link anywhere below base."""
    os.close(open_dir(base, parts))
    return base.joinpath(*parts)


def check_no_link(path: Path) -> None:
    """Raise :class:`DestinationError` if ``path`` (not its parents) is a symbolic link."""
    _mode_unless_link(path)


def open_nofollow(path: Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that refuses a symbolic link at the last component."""
    try:
        return os.open(path, flags | _NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise _refuse(path) from None
        raise


def open_regular(path: Path, flags: int, mode: int = 0o666) -> int:
    """:func:`open_nofollow` for a regular file only: anything else someone planted under
    that name (a FIFO, a socket, a device, a folder) is a :class:`DestinationError`
    naming the path and what it is, at once.

    The type is checked before opening (opening a device can act on it) and again on the
    descriptor (the name may change in between). The open itself is non-blocking, so a
    FIFO that appears meanwhile cannot hang it; the descriptor returned is blocking, as
    from :func:`os.open`.
    """
    check_regular(path)
    try:
        fd = open_nofollow(path, flags | _NONBLOCK | _NOCTTY, mode)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENODEV, errno.EISDIR):  # not a file after all
            check_regular(path)
        raise
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            raise _not_a_file(path, kind)
        if _NONBLOCK and not flags & _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def entry_kind(dir_fd: int, name: str) -> str | None:
    """``"dir"``, ``"link"``, ``"file"`` or ``None`` (absent) for ``name`` in a folder."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "link"
    return "dir" if stat.S_ISDIR(mode) else "file"


def free_bytes(path: Path) -> int | None:
    """Bytes available to this user on the file system holding ``path`` (None: unknown)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return usage.free


# ----------------------------------------------------------------------------- the root


class DownloadRoot:
    """Paths of one download root and the state shared by the runs that use it."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root)
        self.state_dir = self.path / STATE_DIR
        self.staging_dir = self.state_dir / STAGING_DIR
        self.locks_dir = self.state_dir / LOCKS_DIR
        self.metadata_csv = self.path / METADATA_CSV

    def __repr__(self) -> str:
        return f"DownloadRoot({str(self.path)!r})"

    def create(self) -> None:
        """The root and ``.nbia/`` (with staging and locks), refusing planted links.

        The destination (the root's parent) is created normally: it is the user's path.
        Raises :class:`DestinationError` with the reason in one line.
        """
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise DestinationError(f"{parent} exists and is not a folder") from None
        except OSError as exc:
            raise DestinationError(f"cannot create {parent}: {exc.strerror or exc}") from None
        try:
            ensure_dir(parent, [self.path.name, STATE_DIR, STAGING_DIR])
            ensure_dir(self.state_dir, [LOCKS_DIR])
        except DestinationError:
            raise
        except OSError as exc:
            raise DestinationError(f"cannot create {self.path}: {exc.strerror or exc}") from None
        for name in (METADATA_CSV,):  # refused before any download, not after the first
            check_regular(self.path / name)

    def exists(self) -> bool:
        return (self.state_dir).is_dir()

    def journal_path(self, shard: tuple[int, int] | None) -> Path:
        return self.state_dir / journal_name(shard)

    def journal_paths(self) -> list[Path]:
        return journal_paths(self.path)

    # -- what the root was made with ----------------------------------------------------
    def read_info(self) -> dict[str, Any]:
        """The settings in ``.nbia/root.json``; ``{}`` when absent or unreadable as JSON.

        Raises :class:`DestinationError` when the name is a link, a FIFO, a socket or a
        device (planted: a FIFO would block the read forever, ``/dev/zero`` never end
        it). A file larger than :data:`ROOT_INFO_MAX` is not read whole: not JSON.
        """
        path = self.state_dir / ROOT_INFO
        try:
            with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as handle:
                raw = handle.read(ROOT_INFO_MAX + 1)
            data = json.loads(raw) if len(raw) <= ROOT_INFO_MAX else None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_info(self, **values: Any) -> None:
        data = {**self.read_info(), **values}
        atomic_write_text(self.state_dir / ROOT_INFO, json.dumps(data))

    # -- per-run staging ------------------------------------------------------------------
    def new_run_staging(self) -> RunStaging:
        """A staging folder of this run's own, locked while the run lives; staging left by
        runs that are gone is cleared first."""
        self.clear_dead_staging()
        return RunStaging(self.staging_dir)

    def clear_dead_staging(self) -> None:
        try:
            entries = list(os.scandir(self.staging_dir))
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    if entry.is_symlink() or entry.name.startswith("."):
                        os.unlink(entry.path)
                continue
            lock = Path(entry.path) / ".lock"
            if not lock.exists():
                # A folder of an older version (one per series) or a run that died before
                # taking its lock: nobody holds it.
                shutil.rmtree(entry.path, ignore_errors=True)
                continue
            with contextlib.suppress(OSError), _try_flock(lock) as held:
                if held:
                    shutil.rmtree(entry.path, ignore_errors=True)


class RunStaging:
    """``.nbia/staging/<run>/``: where this run assembles series before publishing."""

    def __init__(self, staging_dir: Path) -> None:
        run = f"{_host_tag()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.path = ensure_dir(staging_dir, [run])
        self._lock_fd: int | None = open_regular(self.path / ".lock",
                                                 os.O_RDWR | os.O_CREAT, 0o644)
        _flock(self._lock_fd, blocking=True)

    def series_dir(self, name: str) -> Path:
        return self.path / name

    def close(self, *, remove: bool = True) -> None:
        if self._lock_fd is None:
            return
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
        self._lock_fd = None


def _host_tag() -> str:
    name = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16]
    return name or "host"


# ----------------------------------------------------------------------------- locks


def _flock(fd: int, *, blocking: bool) -> bool:
    try:
        import fcntl  # POSIX only (Windows: no lock)
    except ImportError:  # pragma: no cover - Windows: one run per root there
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP):  # a file system without locks
            return True
        raise
    return True


@contextlib.contextmanager
def _try_flock(path: Path) -> Iterator[bool]:
    fd = open_regular(path, os.O_RDWR)
    try:
        yield _flock(fd, blocking=False)
    finally:
        os.close(fd)


def lock_file(handle: IO[Any] | int) -> None:
    """Exclusive advisory lock (blocking) on an open file; a no-op where unsupported."""
    fd = handle if isinstance(handle, int) else handle.fileno()
    _flock(fd, blocking=True)


def unlock_file(handle: IO[Any] | int) -> None:
    try:
        import fcntl  # POSIX only (Windows: no lock)
    except ImportError:  # pragma: no cover
        return
    fd = handle if isinstance(handle, int) else handle.fileno()
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)


class SeriesLock:
    """``.nbia/locks/<name>.lock``, held while this run downloads and publishes one series.

    ``acquire()`` never blocks: a series another run holds is skipped for now and tried
    again later (by then it is usually complete in that run's journal). The lock file is
    removed once the series is done; a run that opened the file just before that checks,
    after locking, that the path still names the file it locked, so two runs can never
    both believe they hold one series.
    """

    def __init__(self, locks_dir: Path, name: str) -> None:
        self.path = locks_dir / f"{name}.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        while True:
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _flock(fd, blocking=False):
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # removed by its holder meanwhile: lock the new one

    def release(self, *, remove: bool = False) -> None:
        if self._fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
