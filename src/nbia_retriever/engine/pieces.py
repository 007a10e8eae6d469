"""A huge NBIA series fetched one image at a time, several images at once.

One series zip is one HTTP stream, and on TCIA's link one stream gets about 80 Mbit/s
whatever the client does: a 1 to 2 GB series (digital breast tomosynthesis) takes
minutes while the rest of the connection budget idles. The v4 API also lists a series'
images (``getSOPInstanceUIDs``), serves one image (``getSingleImage``) and the MD5 the
server recorded for it (``getMD5HashForImage``): docs/NBIA-SOURCE-FACTS.md section 8,
read in the server's ``V4_getSOPInstanceUIDs.java``, ``V4_getSingleImage.java`` and
``V4_getMD5HashForImage.java``. So a series whose metadata ``File Size`` is above
:data:`PIECES_ABOVE` is fetched as images, several at once, and staged exactly like a
zip: :class:`PiecesStream` is a :class:`~.source.ByteStream` with a ``reader()`` (the
shape of IDC's :class:`~nbia_retriever.idc.stream.IdcStream`), whose
:class:`PieceReader` cuts the bytes back into the images and adds a synthetic
``md5hashes.csv`` of the server's MD5s, so the engine's own MD5 check, naming and single
rename publish the series as they publish a zip. Nothing else in the engine changes.

**The connection budget.** A run holds at most ``limit`` connections for images (the
:class:`~.scheduler.ConcurrencyLimiter`'s, found by exploring or ``--workers``). Each
series streaming holds one; a series in pieces uses its own for one image and
*borrows* a free one for each further image in flight (:class:`ConnectionBudget`): a
borrow is granted only while the series streaming plus the borrowed connections stay
below the limit and no series waits to start, and is given back when that image ends.
A series about to stream waits for borrowed connections to come back first. So a huge
series alone takes the whole budget, and the next series takes its connection back
within one image.

**Each image verified.** The fetcher asks the image's MD5, writes the bytes into
``<root>/.nbia/pieces/<series>.pieces/`` hashing them, and keeps the file only under a
name holding that MD5 once they match; a wrong byte fails the attempt at once and names
the image. The engine hashes the bytes again as it stages them.

**Resume.** The images fetched whole stay there when an attempt fails or the run is
stopped: the next attempt, in this run or a later one, fetches only the others. Only the
run holding the series' lock (``ondisk.SeriesLock``, taken for every attempt) touches the
folder, so two runs on one root never share it. A kept image is used again only if the
server still gives the MD5 its name holds, and only once its bytes hash to it again
(whatever happened to the file meanwhile, a bad one is fetched anew). The folder goes
once the series streamed whole.

Memory stays flat: fetchers write to disk as they read, the stream reads each image
back in :data:`READ_BYTES` pieces. Disk: a series in pieces needs its size twice while
it stages (the images, then the staged series), a few GB at most.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._zipstream import EntryData, EntryEnd, EntryStart, ZipEvent
from ..errors import IntegrityError, NbiaError, NetworkError, UnsafeArchiveError
from ..naming import MD5_ENTRY
from ..untrusted import quote

if TYPE_CHECKING:
    from ..api import NbiaClient
    from ..api.http import Response
    from ..idc.stream import Fetchers

__all__ = ["MOST_PIECES", "PIECES_ABOVE", "PIECES_DIR", "PIECES_FAST", "ConnectionBudget",
           "PieceReader", "PiecesStream"]

#: Series whose metadata ``File Size`` is above this are fetched in pieces (a few hundred
#: MB: below it the run's other series fill the link, and a zip is one request).
PIECES_ABOVE = 300 * 1000 * 1000
#: Images of one series in flight at most (the budget decides how many below that).
MOST_PIECES = 16
#: Pieces pay where one connection is slow (a per-connection cap, a long round trip):
#: a series' first image, fetched alone, arriving faster than this (bytes per second)
#: says one zip stream keeps up, and costs less CPU (2,000 requests for a 1 GB series of
#: 512 KiB images: on loopback pieces ran at 0.6x one stream, at 80 Mbit/s 12x).
PIECES_FAST = 25e6
#: Bytes read back from an image file at a time (and the largest EntryData).
READ_BYTES = 256 << 10
#: The folder of ``.nbia/`` that keeps the images of series in pieces (module docstring).
PIECES_DIR = "pieces"
#: How often a waiting thread looks again at a budget that may have grown (the limiter
#: raises its limit without telling the budget).
LOOK_AGAIN = 0.25


class ConnectionBudget:
    """Connections for images the run may hold at once: one per series streaming, plus
    those borrowed by series in pieces (module docstring). Thread-safe."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._cond = threading.Condition()
        self.streaming = 0
        self.borrowed = 0
        self.waiting = 0

    @contextlib.contextmanager
    def stream(self, cancelled: threading.Event) -> Iterator[None]:
        """Hold one connection for a series: wait while borrowed ones fill the budget
        (they come back within an image); cancel ends the wait (the caller checks it)."""
        with self._cond:
            self.waiting += 1
            try:
                while self.borrowed and self.streaming + self.borrowed >= self._limit() \
                        and not cancelled.is_set():
                    self._cond.wait(LOOK_AGAIN)
            finally:
                self.waiting -= 1
            self.streaming += 1
        try:
            yield
        finally:
            with self._cond:
                self.streaming -= 1
                self._cond.notify_all()

    def borrow(self) -> bool:
        """One more connection for an image, if the budget has one nobody waits for."""
        with self._cond:
            if self.waiting or self.streaming + self.borrowed >= self._limit():
                return False
            self.borrowed += 1
            return True

    def give_back(self) -> None:
        with self._cond:
            self.borrowed -= 1
            self._cond.notify_all()


class _Piece:
    """One image: its UID, its entry name, and once fetched its file, size and MD5."""

    __slots__ = ("done", "md5", "name", "path", "size", "sop")

    def __init__(self, sop: str, name: str) -> None:
        self.sop = sop
        self.name = name
        self.path: Path | None = None
        self.size: int | None = None
        self.md5: str | None = None
        self.done = False


class PiecesStream:
    """A series' images, fetched several at once, as one ordered byte stream (module
    docstring). ``budget`` None: no borrowing, one image at a time."""

    def __init__(self, client: NbiaClient, fetchers: Fetchers, uid: str, sops: Sequence[str],
                 spool: Path, *, budget: ConnectionBudget | None = None,
                 most: int = MOST_PIECES) -> None:
        self.client = client
        self.uid = uid
        self.what = f"series {uid} (in pieces)"
        self.pieces = [_Piece(sop, f"{i:08d}.dcm") for i, sop in enumerate(sops, start=1)]
        self.spool = spool
        self.most = max(1, most)
        self.reused = 0  # images a previous attempt left whole
        #: Images in flight at most at once (what the budget granted), for reports.
        self.peak = 0
        self._fetchers = fetchers
        self._budget = budget
        self._cond = threading.Condition()
        self._next = 0
        self._inflight = 0
        self._own_busy = False
        self._live: set[Response] = set()
        self._error: NbiaError | None = None
        self._aborted = False
        self._received = 0
        self._started = False
        self._tag = secrets.token_hex(4)

    # -- the ByteStream --------------------------------------------------------------------
    @property
    def bytes_received(self) -> int:
        return self._received

    def reader(self, *, max_total_size: int | None = None,
               max_entries: int = 1_000_000) -> PieceReader:
        return PieceReader(self.pieces, what=self.what, max_total_size=max_total_size,
                           max_entries=max_entries)

    def chunks(self) -> Iterator[bytes]:
        """The images' bytes in listing order, each read back from its verified file."""
        if self._started:
            raise RuntimeError("PiecesStream.chunks() twice")
        self._started = True
        try:
            os.mkdir(self.spool, 0o755)
        except FileExistsError:
            if self.spool.is_symlink() or not self.spool.is_dir():
                raise IntegrityError(f"{self.what}: {self.spool} is not this run's "
                                     "folder") from None
        for piece in self.pieces:
            while True:
                self._fill()
                with self._cond:
                    if self._error is not None:
                        raise self._error
                    if self._aborted:
                        raise NetworkError(f"{self.what}: stopped (cancelled)")
                    if piece.done:
                        break
                    self._cond.wait(LOOK_AGAIN)
            assert piece.path is not None
            fd = os.open(piece.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as handle:
                while data := handle.read(READ_BYTES):
                    yield data
        # streamed whole: the images are in the engine's staging now
        shutil.rmtree(self.spool, ignore_errors=True)

    def abort(self) -> None:
        """From another thread: a blocked :meth:`chunks` ends, every image's socket is
        shut down."""
        self._stop(None)

    def close(self) -> None:
        self._stop(None)

    def _stop(self, error: NbiaError | None) -> None:
        with self._cond:
            if error is None:
                self._aborted = True
            elif self._error is None and not self._aborted:
                self._error = error
            for response in self._live:
                response.abort()
            self._live.clear()
            self._cond.notify_all()

    # -- fetching --------------------------------------------------------------------------
    def _fill(self) -> None:
        """Start images while the budget allows: one on the series' own connection,
        each further one on a borrowed connection (module docstring)."""
        with self._cond:
            while self._next < len(self.pieces) and not self._aborted and self._error is None:
                own = not self._own_busy
                if not own and (self._budget is None or self._inflight >= self.most
                                or not self._budget.borrow()):
                    return
                piece = self.pieces[self._next]
                self._next += 1
                self._inflight += 1
                self.peak = max(self.peak, self._inflight)
                if own:
                    self._own_busy = True
                self._fetchers.submit(functools.partial(self._fetch, piece, own), self._stop)

    def _fetch(self, piece: _Piece, own: bool) -> None:
        try:
            self._fetch_one(piece)
        except NbiaError as exc:
            self._stop(exc)
        except OSError as exc:
            self._stop(NbiaError(f"{self.what}: image {quote(piece.sop, 80)}: "
                                 f"{exc.strerror or exc}"))
        except BaseException as exc:  # a bug: still end the consumer's wait, and say so
            self._stop(NbiaError(f"{self.what}: {type(exc).__name__}: {exc}"))
        finally:
            with self._cond:
                self._inflight -= 1
                if own:
                    self._own_busy = False
                elif self._budget is not None:
                    self._budget.give_back()
                self._cond.notify_all()

    def _fetch_one(self, piece: _Piece) -> None:
        with self._cond:
            if self._aborted or self._error is not None:
                return
        md5 = self.client.image_md5(piece.sop)
        if md5 is None:
            raise IntegrityError(f"{self.what}: the server gives no MD5 for image "
                                 f"{quote(piece.sop, 80)}")
        # Names from our own hash of the UID (server text never becomes a path) and the
        # MD5 the bytes matched (32 hex digits, checked by the client).
        key = hashlib.sha1(piece.sop.encode(), usedforsecurity=False).hexdigest()[:24]
        final = self.spool / f"{key}-{md5}.dcm"
        size = self._kept(final, md5)
        if size is not None:  # an earlier attempt fetched it whole
            with self._cond:
                self.reused += 1
        else:
            # a part file of this stream's own: a fetcher of an attempt that failed may
            # still be writing the same image's (its result is as good: same MD5)
            size = self._download(piece, self.spool / f"{key}.{self._tag}.part", final, md5)
        with self._cond:
            piece.path, piece.size, piece.md5, piece.done = final, size, md5, True
            self._cond.notify_all()

    def _kept(self, final: Path, md5: str) -> int | None:
        """The size of ``final`` if it is a regular file whose bytes hash to ``md5``;
        anything else there is removed (fetched anew)."""
        try:
            fd = os.open(final, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError:  # a link someone planted: not ours
            with contextlib.suppress(OSError):
                os.unlink(final)
            return None
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None
            while data := handle.read(1 << 20):
                digest.update(data)
                size += len(data)
        if digest.hexdigest() == md5:
            return size
        with contextlib.suppress(OSError):
            os.unlink(final)
        return None

    def _download(self, piece: _Piece, part: Path, final: Path, md5: str) -> int:
        what = f"image {quote(piece.sop, 80)} of series {self.uid}"
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb", closefd=True) as out, \
                    self.client.open_image(self.uid, piece.sop) as response:
                with self._cond:
                    if self._aborted or self._error is not None:
                        raise NetworkError(f"{what}: stopped")
                    self._live.add(response)
                try:
                    for chunk in response.chunks():
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                        with self._cond:
                            self._received += len(chunk)
                finally:
                    with self._cond:
                        self._live.discard(response)
            got = digest.hexdigest()
            if got != md5:
                raise IntegrityError(f"{what}: MD5 mismatch (the {size:,} bytes hash to "
                                     f"{got}, the server recorded {md5})")
            os.replace(part, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
        return size


class CutReader:
    """What :class:`PieceReader` and IDC's
    :class:`~nbia_retriever.idc.stream.ObjectReader` share: an error raised while
    cutting is kept (and re-raised by every later call), and the ``md5hashes.csv`` tail."""

    _error: NbiaError | None

    def _cut(self, view: memoryview) -> Iterator[ZipEvent]:
        raise NotImplementedError

    def _events(self, view: memoryview) -> Iterator[ZipEvent]:
        try:
            yield from self._cut(view)
        except NbiaError as exc:
            self._error = exc
            raise


def md5_listing(tail: list[ZipEvent],
                hashes: Iterable[tuple[str, str | None]]) -> Iterator[ZipEvent]:
    """``tail``, then ``md5hashes.csv`` with each named MD5 (those known)."""
    rows = "".join(f"{name},{md5}\r\n" for name, md5 in hashes if md5)
    listing = ("Filename,MD5Hash\r\n" + rows).encode()
    return iter([*tail, EntryStart(MD5_ENTRY, False), EntryData(listing),
                 EntryEnd(MD5_ENTRY, 0, len(listing), len(listing))])


class PieceReader(CutReader):
    """The images' concatenated bytes cut back into entries by their sizes (each known
    before its first byte is read back), with
    :class:`~nbia_retriever._zipstream.ZipStreamReader`'s interface and caps; at
    :meth:`close`, ``md5hashes.csv`` with the server's MD5 of every image (as IDC's
    :class:`~nbia_retriever.idc.stream.ObjectReader`). One reader per attempt."""

    def __init__(self, pieces: Sequence[_Piece], *, what: str,
                 max_total_size: int | None = None, max_entries: int = 1_000_000) -> None:
        self._pieces = pieces
        self._what = what
        self.max_total_size = max_total_size
        self.max_entries = max_entries
        self.bytes_in = 0
        self.bytes_out = 0
        self._index = 0
        self._left: int | None = None  # bytes of the current image still due
        self._total = 0
        self._closed = False
        self._done = False
        self._error: NbiaError | None = None
        if len(pieces) + 1 > max_entries:
            self._error = UnsafeArchiveError(f"{what}: {len(pieces)} images, more than the "
                                             f"{max_entries - 1} allowed")

    @property
    def finished(self) -> bool:
        return self._done

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[ZipEvent]:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError("PieceReader.feed() after close()")
        view = memoryview(data).cast("B")
        self.bytes_in += len(view)
        return self._events(view)

    def _cut(self, view: memoryview) -> Iterator[ZipEvent]:
        pieces, pos, end = self._pieces, 0, len(view)
        while self._index < len(pieces):
            piece = pieces[self._index]
            if self._left is None:
                if piece.size is None:  # not read back yet: no byte may be here
                    break
                self._total += piece.size
                if self.max_total_size is not None and self._total > self.max_total_size:
                    raise UnsafeArchiveError(f"{self._what}: the images add up to more than "
                                             f"the {self.max_total_size:,} bytes allowed")
                self._left = piece.size
                yield EntryStart(piece.name, False)
            if self._left == 0:
                yield EntryEnd(piece.name, 0, piece.size or 0, piece.size or 0)
                self._index += 1
                self._left = None
                continue
            if pos >= end:
                return
            take = min(self._left, end - pos, READ_BYTES)
            self._left -= take
            self.bytes_out += take
            yield EntryData(view[pos:pos + take])
            pos += take
        if pos < end:
            raise IntegrityError(f"{self._what}: {end - pos} bytes more than the images hold")

    def close(self) -> Iterator[ZipEvent]:
        """The images still due (empty ones), then the MD5 list; :class:`IntegrityError`
        when the stream ended before its last image."""
        if self._error is not None:
            raise self._error
        self._closed = True
        tail = list(self._events(memoryview(b"")))
        if self._index < len(self._pieces):
            self._error = IntegrityError(
                f"{self._what}: the stream ended at image {self._index + 1} of "
                f"{len(self._pieces)}")
            raise self._error
        self._done = True
        return md5_listing(tail, ((p.name, p.md5) for p in self._pieces))
