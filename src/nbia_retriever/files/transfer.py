"""A resumable, verified download of one file into the run's spool folder.

TCIA's Go retriever writes a DRS object or a PathDB slide to ``.tmp`` with ``O_TRUNC``
on every attempt: a 2.5 GB slide cut at 2 GB (its 10-minute client timeout, a reset, an
expired signed URL) starts again from zero. Here the bytes written stay, and only the
rest is asked for (``Range: bytes=N-``), in the same attempt when the signed URL
expired, in the engine's next attempt after a reset, and in the next run after a crash
or Ctrl-C:

* The file grows in ``<spool>/<hash of key>.part``. Beside it, a sidecar
  ``<hash>.json`` says what the part holds: the item's URI, the size and MD5 expected,
  the server's ETag and length, and the offset and MD5 of the prefix ``[0, offset)``
  written so far. It is rewritten every :data:`CHECKPOINT_BYTES` and whenever the
  transfer stops for any reason (an exception, a pause, a cancel), after the part's
  bytes were flushed. The sidecar is signed with this user's journal-row key
  (:func:`~nbia_retriever.engine.rows.row_key`, blake2b keyed as the rows are): a
  download root may be a group folder, and a planted part must not be taken as ours.
* To resume, a sidecar that is signed, names this item and matches the expected size
  and MD5 is believed for its offset only: the part is cut to that offset and the prefix
  hashed again from disk (the one re-read; MD5 state cannot be saved), and its digest
  must equal the one recorded. Anything else starts from zero.
* The server answers 206 with the ``Content-Range`` asked for: the body is appended.
  200 (it ignores ranges, or the object changed: ``If-Range`` carries the ETag) starts
  again cleanly from zero. 416 at the expected size: the part is whole already.
* A signed URL that expired (S3's 403/400 "Request has expired" / ``AccessDenied``, or
  a 401 from the storage host) is replaced by asking ``url_for()`` again, once per
  failure, and the transfer goes on from where it is, within the same attempt.
* Verified while written, in one pass: the size must reach what the manifest, DRS or
  Content-Length says, the MD5 must match the manifest's or DRS's, else a plain-MD5
  ETag. A mismatch deletes part and sidecar (:class:`IntegrityError`: the engine tries
  again from zero). A whole file becomes ``<hash>.done`` (:class:`FetchedFile`), which
  the engine publishes by one rename.

Memory stays flat: 1 MiB reads written straight to the file. Free space is checked
against what remains before the first byte and every few MiB as
:class:`~nbia_retriever.engine.staging.SpaceGuard` does for a series.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api.client import parse_retry_after
from ..api.http import Origin, Response, Transport
from ..engine.rows import row_key
from ..engine.staging import SPACE_CHECK_BYTES, SpaceGuard, disk_full
from ..errors import ApiError, DestinationError, IntegrityError, NbiaError, NetworkError
from ..models import SeriesInfo
from ..untrusted import quote

__all__ = ["CHECKPOINT_BYTES", "READ_BYTES", "FetchedFile", "Transfer", "fetch_to_spool",
           "part_paths"]

#: Bytes per read of the body (and per write).
READ_BYTES = 1 << 20
#: The sidecar is rewritten after this many bytes (and on every stop): what a crash
#: (no chance to write it) costs at most.
CHECKPOINT_BYTES = 64 << 20
_SIDECAR_VERSION = 1
_MD5 = re.compile(r"[0-9a-f]{32}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
#: What an expired or used-up signed URL answers (S3's XML, GCS's, Fence's own).
_EXPIRED = re.compile(r"expired|accessdenied|request has expired|signature", re.I)
_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


@dataclass(frozen=True)
class FetchedFile:
    """A complete, verified file in the spool (same file system as the root): the
    engine publishes it by one rename. ``name`` is the file's name as the manifest or
    DRS gives it (untrusted: the engine makes it safe)."""

    path: Path
    name: str
    size: int
    md5: str


def part_paths(spool: Path, key: str) -> tuple[Path, Path, Path]:
    """The part, its sidecar and the finished file of ``key`` in ``spool``: named by a
    hash of the key, so no manifest text becomes a path."""
    stem = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return spool / f"{stem}.part", spool / f"{stem}.json", spool / f"{stem}.done"


def _mac(key: bytes, fields: dict[str, Any]) -> str:
    """The sidecar's MAC: keyed blake2b over its canonical JSON, as
    :func:`~nbia_retriever.engine.rows.sign` signs a journal row (another domain)."""
    message = "nbia-part\0" + json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(message.encode("utf-8", "surrogatepass"), key=key,
                           digest_size=16).hexdigest()


def plain_md5(etag: str | None) -> str | None:
    """An ETag that is an object's MD5 (one S3 PUT: 32 hex digits in quotes; not a
    multipart upload's ``-N`` form, not a weak one); None otherwise."""
    if not etag:
        return None
    text = etag.strip().strip('"').lower()
    return text if _MD5.fullmatch(text) else None


class Transfer:
    """The live state of one :func:`fetch_to_spool`: the bytes received, and
    :meth:`abort` from another thread (cancel during a stall: the blocked read ends,
    the part and its sidecar stay for the next attempt)."""

    def __init__(self) -> None:
        self.bytes_received = 0
        self.resumed_from = 0
        self.aborted = False
        self._response: Response | None = None
        self._lock = threading.Lock()

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            response = self._response
        if response is not None:
            response.abort()

    def _watch(self, response: Response | None) -> None:
        with self._lock:
            self._response = response
            aborted = self.aborted
        if aborted and response is not None:
            response.abort()


class _Part:
    """The part file, its MD5 so far, and its sidecar."""

    def __init__(self, spool: Path, key: str, expected_size: int | None,
                 expected_md5: str | None) -> None:
        self.path, self.sidecar, self.done = part_paths(spool, key)
        self.key = key
        self.expected_size = expected_size
        self.expected_md5 = expected_md5
        self.etag: str | None = None
        self.length: int | None = None  # the whole object's size as the server says
        self.offset = 0
        self.md5 = hashlib.md5()
        self.fd = _open_part(self.path)
        self.saved = -1
        self.written = -1  # where the file's position is (-1: unknown)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def _fields(self, digest: str) -> dict[str, Any]:
        return {"v": _SIDECAR_VERSION, "uri": self.key, "size": self.expected_size,
                "md5": self.expected_md5, "etag": self.etag, "length": self.length,
                "offset": self.offset, "prefix_md5": digest}

    def resume(self) -> None:
        """Take up the part where its sidecar says, if it can be believed (module
        docstring); else start from zero."""
        key = row_key(create=False)
        offset = 0
        try:
            raw = json.loads(_read_small(self.sidecar)) if key else None
        except (OSError, ValueError, RecursionError):
            raw = None
        if isinstance(raw, dict) and key is not None:
            mac = raw.pop("mac", None)
            fields = self._fields(str(raw.get("prefix_md5")))
            fields.update(offset=raw.get("offset"), etag=raw.get("etag"),
                          length=raw.get("length"))
            good = (isinstance(mac, str) and raw == fields
                    and hmac.compare_digest(mac, _mac(key, fields))
                    and isinstance(fields["offset"], int) and fields["offset"] >= 0
                    and (self.expected_size is None or fields["offset"] <= self.expected_size)
                    and os.fstat(self.fd).st_size >= fields["offset"])
            if good:
                offset = fields["offset"]
                self.etag = fields["etag"] if isinstance(fields["etag"], str) else None
                self.length = fields["length"] if isinstance(fields["length"], int) else None
                if self._rehash(offset) != fields["prefix_md5"]:
                    offset = 0
        if not offset:
            self.restart()
        else:
            self.offset = offset

    def _rehash(self, offset: int) -> str:
        os.ftruncate(self.fd, offset)
        md5 = hashlib.md5()
        buffer = bytearray(READ_BYTES)
        view = memoryview(buffer)
        done = 0
        with open(self.path, "rb", buffering=0) as handle:
            while done < offset:
                n = handle.readinto(view[:min(READ_BYTES, offset - done)])
                if not n:
                    break
                md5.update(view[:n])
                done += n
        self.md5 = md5
        return md5.hexdigest() if done == offset else ""

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        self.offset = 0
        self.md5 = hashlib.md5()
        self.etag = self.length = None
        with contextlib.suppress(FileNotFoundError):
            self.sidecar.unlink()

    def write(self, chunk: bytes) -> None:
        if self.written != self.offset:  # first write, or after a cut or a restart
            os.lseek(self.fd, self.offset, os.SEEK_SET)
        view = memoryview(chunk)
        while view:
            n = os.write(self.fd, view)
            self.md5.update(view[:n])
            self.offset += n
            view = view[n:]
        self.written = self.offset

    def save(self) -> None:
        """Record what the part holds (after its bytes are on their way to disk)."""
        if self.saved == self.offset:
            return
        key = row_key(create=True)
        if key is None:
            return  # no key, no resume: the next attempt starts from zero
        fields = self._fields(self.md5.hexdigest())
        fields["mac"] = _mac(key, fields)
        tmp = self.sidecar.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            os.fdatasync(self.fd) if hasattr(os, "fdatasync") else os.fsync(self.fd)
            # A fresh file, never an entry found there: a link planted at the temp
            # name (a shared root) would have us write through it, outside the root.
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(fields))
            os.replace(tmp, self.sidecar)
            self.saved = self.offset

    def discard(self) -> None:
        self.close()
        for path in (self.path, self.sidecar):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _open_part(path: Path) -> int:
    """The part file, opened for writing: ours, a regular file. Anything else at its
    name in the run's own spool (a link planted to a file outside the root, a FIFO) is
    removed, never written through, and a fresh part made; a folder there is a
    :class:`DestinationError` naming it."""
    for _ in range(2):
        try:
            fd = os.open(path, _FLAGS | getattr(os, "O_NONBLOCK", 0), 0o600)
        except IsADirectoryError:
            break
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EOPNOTSUPP):
                raise
        else:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    raise DestinationError(f"{path}: not a file this download made (a folder?); remove it "
                           "and re-run")


def _read_small(path: Path, limit: int = 1 << 16) -> bytes:
    """The first ``limit`` bytes of a regular file, opened without following a link and
    without blocking: a planted FIFO or a link to ``/dev/zero`` at the sidecar's name
    must neither hang the run nor fill its memory (OSError: not believed)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        return handle.read(limit)


def fetch_to_spool(url_for: Callable[[], str], spool: Path, key: str, *,
                   expected_size: int | None, expected_md5: str | None,
                   transport: Transport, checkpoint: Callable[[], None],
                   on_progress: Callable[[int], None], etag_check: bool = True,
                   name: str = "", what: str | None = None,
                   state: Transfer | None = None) -> FetchedFile:
    """Download ``key``'s file (from the URL ``url_for()`` gives, asked again when it
    expires) into ``spool``, resuming what an earlier attempt or run left, verified as
    the module docstring says. ``checkpoint()`` is called between reads and raises to
    stop (pause, cancel: the part stays); ``on_progress(total)`` gets the part's size.
    Errors: :class:`NetworkError`/:class:`ApiError` (their status for the retry table),
    :class:`IntegrityError` (part deleted), :class:`DiskFullError`/:class:`NoRoomError`."""
    what = what or f"file {quote(name or key, 120)}"
    state = state or Transfer()
    expected_md5 = expected_md5.lower() if expected_md5 else None
    spool.mkdir(parents=True, exist_ok=True)
    if spool.is_symlink() or not spool.is_dir():  # a planted link: never written through
        raise DestinationError(f"{spool} is not a folder of this download root (a link?); "
                               "remove it and re-run")
    part = _Part(spool, key, expected_size, expected_md5)
    with contextlib.suppress(FileNotFoundError):
        part.done.unlink()  # a finished file no run published: its check is gone with it
    try:
        part.resume()
        state.resumed_from = part.offset
        remaining = (expected_size - part.offset) if expected_size is not None else 0
        guard = SpaceGuard.start(spool, key, SeriesInfo(key, file_size=remaining or None))
        _download(part, url_for, transport, checkpoint, on_progress, guard, what, state)
    except BaseException as exc:
        if isinstance(exc, IntegrityError) or part.offset == 0:
            part.discard()  # nothing worth keeping (a 404, a refused URL, a bad body)
        else:
            part.save()
            part.close()
        if isinstance(exc, OSError) and (full := disk_full(spool, exc)) is not None:
            raise full from None
        raise
    part.close()
    try:
        digest = _verify(part, what, etag_check)
    except IntegrityError:
        part.discard()
        raise
    os.replace(part.path, part.done)
    with contextlib.suppress(FileNotFoundError):
        part.sidecar.unlink()
    return FetchedFile(part.done, name, part.offset, digest)


def _download(part: _Part, url_for: Callable[[], str], transport: Transport,
              checkpoint: Callable[[], None], on_progress: Callable[[int], None],
              guard: SpaceGuard | None, what: str, state: Transfer) -> None:
    """Requests until the part is whole (or an error ends the attempt)."""
    url = url_for()
    renewed = False  # a new URL was asked for since the last byte arrived
    restarts = 0  # answers that made us start from zero within this attempt
    since_save = since_look = 0
    while True:
        checkpoint()
        headers: dict[str, str] = {}
        if part.offset:
            headers["Range"] = f"bytes={part.offset}-"
            if part.etag:
                headers["If-Range"] = part.etag
        host = Origin.of(url).label
        with transport.open("GET", url, what=f"{what} from {host}", headers=headers) as answer:
            state._watch(answer)
            try:
                status = answer.status
                if status in (400, 401, 403) and _expired(answer):
                    if renewed:
                        raise ApiError(f"{what}: {host} refused the download URL (HTTP "
                                       f"{status}) even when fetched again", status=status)
                    renewed = True
                    url = url_for()
                    continue
                if status == 416 and part.offset:
                    if _whole_at(answer, part):
                        return
                    restarts += 1
                    if restarts > 2:
                        raise ApiError(f"{what}: {host} refuses every range (HTTP 416)",
                                       status=416)
                    part.restart()
                    continue
                if status == 200:
                    if part.offset:
                        part.restart()  # the whole body: from zero, cleanly
                    part.length = end = _int(answer.header("Content-Length"))
                elif status == 206 and part.offset:
                    end = _check_range(answer, part, what, host)
                else:
                    raise _status_error(answer, what, host)
                coding = (answer.header("Content-Encoding") or "identity").strip().lower()
                if coding != "identity" and part.expected_md5 is None:
                    # We asked for identity: an encoded body with no MD5 to prove it is
                    # the object as stored would be saved as, say, a gzip "slide.svs".
                    raise ApiError(f"{what}: {host} sent the file {quote(coding, 20)}-"
                                   "encoded (asked for it as stored); not saved",
                                   status=None)
                etag = answer.header("ETag")
                if part.etag and etag and etag != part.etag:
                    part.restart()  # another object under the same URL: from zero
                    restarts += 1
                    if restarts > 2:
                        raise ApiError(f"{what}: {host} keeps changing the file's ETag")
                    continue
                part.etag = etag or part.etag
                limit = part.expected_size if part.expected_size is not None else part.length
                for chunk in answer.chunks(READ_BYTES, partial=True):
                    part.write(chunk)
                    state.bytes_received += len(chunk)
                    renewed = False
                    if limit is not None and part.offset > limit:
                        raise IntegrityError(f"{what}: {host} sent more than the "
                                             f"{limit:,} bytes expected")
                    since_save += len(chunk)
                    since_look += len(chunk)
                    if since_save >= CHECKPOINT_BYTES:
                        part.save()
                        since_save = 0
                    if guard is not None and since_look >= 64 * SPACE_CHECK_BYTES:
                        guard.look(part.offset)
                        since_look = 0
                    on_progress(part.offset)
                    checkpoint()
                if end is not None and part.offset < end:
                    # http.client ends a read at a FIN without a word, Content-Length
                    # or not: the bytes so far are good, the rest is for the next try.
                    raise NetworkError(f"{what}: the connection closed mid-body "
                                       f"({part.offset:,} of {end:,} bytes)")
                return
            finally:
                state._watch(None)


def _int(text: str | None) -> int | None:
    try:
        value = int(text or "")
    except ValueError:
        return None
    return value if value >= 0 else None


def _expired(answer: Response) -> bool:
    """A signed URL that no longer works: S3's XML says so; a 401 from a storage host
    can only mean the URL's own credentials."""
    if answer.status == 401:
        return True
    return bool(_EXPIRED.search(answer.read_text(4096)))


def _whole_at(answer: Response, part: _Part) -> bool:
    """A 416 to ``bytes=N-`` because N is the object's size: the part is whole."""
    found = re.fullmatch(r"bytes \*/(\d+)", (answer.header("Content-Range") or "").strip())
    total = int(found.group(1)) if found else part.expected_size
    return total is not None and total == part.offset and (
        part.expected_size is None or part.expected_size == total)


def _check_range(answer: Response, part: _Part, what: str, host: str) -> int:
    """The end (exclusive) of the range a 206 sends, checked against what was asked."""
    found = _CONTENT_RANGE.fullmatch((answer.header("Content-Range") or "").strip())
    if found is None or int(found.group(1)) != part.offset:
        raise ApiError(f"{what}: {host} answered a range that was not asked for "
                       f"(Content-Range {quote(answer.header('Content-Range') or '', 60)!r})")
    total = None if found.group(3) == "*" else int(found.group(3))
    if total is not None:
        if part.expected_size is not None and total != part.expected_size:
            raise IntegrityError(f"{what}: {host} says the file has {total:,} bytes, "
                                 f"not {part.expected_size:,}")
        part.length = total
    return int(found.group(2)) + 1


def _status_error(answer: Response, what: str, host: str) -> NbiaError:
    status = answer.status
    if status == 404:
        return ApiError(f"{what}: not found on {host}", status=404)
    if status in (401, 403):
        return ApiError(f"{what}: {host} refused the download (HTTP {status})", status=status)
    if status == 206:  # a range we did not ask for
        return ApiError(f"{what}: {host} answered 206 to a request for the whole file",
                        status=None)
    retry_after = parse_retry_after(answer.header("Retry-After"))
    if status >= 500 or status == 429:
        return ApiError(f"{what}: {host} answered HTTP {status}", status=status,
                        retry_after=retry_after)
    return ApiError(f"{what}: {host} answered HTTP {status}", status=status)


def _verify(part: _Part, what: str, etag_check: bool) -> str:
    """The part's MD5 after its size and digest were checked (module docstring)."""
    size = part.expected_size if part.expected_size is not None else part.length
    if size is not None and part.offset != size:
        raise IntegrityError(f"{what}: {part.offset:,} bytes arrived, {size:,} expected")
    digest = part.md5.hexdigest()
    wanted = part.expected_md5 or (plain_md5(part.etag) if etag_check else None)
    if wanted is not None and digest != wanted:
        said = "its MD5" if part.expected_md5 else "its ETag"
        raise IntegrityError(f"{what}: MD5 mismatch ({said} says {wanted}, the bytes "
                             f"{digest})")
    return digest

