"""Incremental reader for a zip archive that arrives as a stream of byte chunks.

Why this exists: an NBIA server builds each series zip on the fly (chunked transfer, no
Content-Length, DEFLATED entries with data descriptors, i.e. flag bit 3 and zero CRC/sizes in
the local header, sometimes zip64). :mod:`zipfile` needs a seekable file, so using it would
mean spooling the whole series to disk first and reading it twice. This reader is fed the
chunks as they come off the socket and reports each entry's decompressed bytes at once, so the
engine can write and hash them while the download is still running, with memory flat in the
size of the series: no entry and no archive is ever held whole.

Why not the ``stream-unzip`` package: we need hard caps tuned to our threat model (per entry,
per archive, entry count, name length, central directory size), a CRC32 verified *before* an
entry is reported complete, a cross-check of the central directory against what was streamed,
the freedom to abort at any event without unwinding a chain of nested generators, and no
per-chunk overhead beyond one ``inflate`` call. Adapting a dependency's API to all of that costs
more than owning a few hundred lines that we fuzz ourselves.

Format decisions (all documented here because a streaming reader has to guess where a seeking
one would look things up):

* Methods: STORED (0) and DEFLATED (8). Anything else, encryption (flag bits 0 and 6) and
  masked local headers (bit 13) raise :class:`UnsafeArchiveError`.
* DEFLATED + bit 3: deflate is self-terminating, so ``decompressobj.eof`` marks the end of the
  data exactly and the data descriptor starts right after it.
* The data descriptor is: optional signature ``PK\\x07\\x08``, CRC32, then compressed and
  uncompressed sizes as 4+4 or (zip64) 8+8 bytes. Writers disagree on when zip64 sizes are used
  (the spec says "when the local header has a zip64 extra field"; Go's writer uses them whenever
  a size exceeds 4 GiB without any local extra), so the layout is *deduced*: we know the real
  CRC and both sizes by then, and accept the first layout, in the order (signature present?
  first with, then without) x (zip64 extra present? 8 then 4 bytes, else 4 then 8), whose sizes
  equal what was actually read *and* which is followed by a valid next record signature (local
  header, central directory header, zip64 end record or end record). A layout whose sizes fit
  but whose CRC differs is a CRC mismatch (:class:`IntegrityError` naming the entry).
* STORED + bit 3 (NBIA never sends it, Python's :mod:`zipfile` does on unseekable output):
  the only end marker is the descriptor itself, so the data is scanned for its *signature* and a
  candidate is accepted only if the CRC and sizes that follow equal the data before it and a
  valid record signature follows. A descriptor without signature cannot be found; such a
  stream ends in an error at :meth:`ZipStreamReader.close`, never in wrong data.
* Entries without bit 3 take CRC and sizes from the local header (or its zip64 extra).
* After the entries: central directory records, optional zip64 end record and locator, then
  the end record and its comment. Each record is parsed and dropped (the directory as a whole is
  capped at 64 MiB + 1 KiB per entry). The directory must list exactly the streamed entries
  (count, and an order-independent digest of name, CRC and sizes) and the end record's count
  must agree, else :class:`IntegrityError`. Bytes after the end record are refused.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import IntegrityError, NbiaError, UnsafeArchiveError

# Inflate and CRC-32 come from ISA-L (the ``isal`` package) where it is installed: on the
# bench's series it inflates in 1.8 s/GB against zlib's 4.4, and its CRC-32 costs 0.08
# s/GB against 0.48 (BENCHMARKS.md), both with the GIL released. Inflating is two thirds
# of a download's CPU on a fast link, so this is the largest single saving there is. The
# formats are the standard ones: stdlib zlib does the same work where isal is missing.
try:
    from isal import isal_zlib as _deflate
except ImportError:  # pragma: no cover - isal has wheels for every platform we build
    _deflate = zlib  # type: ignore[misc,assignment,unused-ignore]
#: The library that inflates ("isal" or "zlib"), for BENCHMARKS.md and bug reports.
INFLATE_LIBRARY = "isal" if _deflate is not zlib else "zlib"
_crc32 = _deflate.crc32
_INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, getattr(_deflate, "error", zlib.error))
_PARSE_ERRORS: tuple[type[Exception], ...] = (*_INFLATE_ERRORS, struct.error, ValueError,
                                              IndexError)

__all__ = [
    "EntryData",
    "EntryEnd",
    "EntryStart",
    "ZipEvent",
    "ZipStreamReader",
]


@dataclass(frozen=True, slots=True)
class EntryStart:
    """A new entry begins.

    ``name`` is raw (unsanitised, maybe ``../x``): making it a safe path is the engine's job.
    """

    name: str
    compressed: bool


@dataclass(frozen=True, slots=True)
class EntryData:
    """Decompressed bytes of the current entry, in order, at most :data:`PIECE_SIZE` at a time.

    ``data`` may be a memoryview into the chunk given to :meth:`ZipStreamReader.feed` (STORED
    entries are passed through without copying): consume it before feeding the next chunk.
    """

    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class EntryEnd:
    """The current entry is complete and its CRC32 and sizes were verified."""

    name: str
    crc32: int
    size: int
    compressed_size: int


ZipEvent = EntryStart | EntryData | EntryEnd

#: Largest piece of decompressed data handed out at once (bounds memory under zip bombs).
PIECE_SIZE = 256 << 10
# Largest slice of compressed input given to one inflate call: keeps zlib's copy of its
# unconsumed tail small when the caller feeds huge chunks.
_SLICE = 256 << 10
# Bytes past the end of a deflate stream an inflater may take before it knows the stream
# ended (ISA-L reads ahead a word or so; they are given back at the end).
_READ_AHEAD = 64

_LOCAL_SIG = 0x04034B50
_CENTRAL_SIG = 0x02014B50
_DD_SIG = 0x08074B50
_Z64_EOCD_SIG = 0x06064B50
_Z64_LOC_SIG = 0x07064B50
_EOCD_SIG = 0x06054B50
_DD_SIG_BYTES = b"PK\x07\x08"
# What may legitimately follow a data descriptor.
_AFTER_DESCRIPTOR = frozenset({_LOCAL_SIG, _CENTRAL_SIG, _Z64_EOCD_SIG, _EOCD_SIG})
# Order in which record kinds may appear; only local and central headers repeat.
_RANK = {_LOCAL_SIG: 0, _CENTRAL_SIG: 1, _Z64_EOCD_SIG: 2, _Z64_LOC_SIG: 3, _EOCD_SIG: 4}

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_Z64_EOCD_HEAD = struct.Struct("<IQ")  # 12 bytes, then the record's declared size
_Z64_EOCD_MIN = 44  # declared size of a zip64 end record without extensible data
_Z64_EOCD_MAX = 1 << 20
_Z64_LOC_SIZE = 20
_EOCD = struct.Struct("<IHHHHIIH")  # 22 bytes
_U32 = struct.Struct("<I")
_DD32 = struct.Struct("<III")
_DD64 = struct.Struct("<IQQ")
_SIZES = struct.Struct("<IQQ")
_DESCRIPTOR_LOOKAHEAD = 4 + 4 + 16 + 4  # signature, CRC, zip64 sizes, next signature

_FLAG_ENCRYPTED = 0x0001
_FLAG_DESCRIPTOR = 0x0008
_FLAG_STRONG_ENCRYPTION = 0x0040
_FLAG_UTF8 = 0x0800
_FLAG_MASKED_HEADER = 0x2000
_STORED = 0
_DEFLATED = 8
_ZIP64_EXTRA = 0x0001
_MAX32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_CD_BASE_CAP = 64 << 20
_CD_PER_ENTRY = 1 << 10

# Parser states.
_S_SIG = 0  # next 4 bytes are a record signature
_S_LOCAL = 1
_S_CENTRAL = 2
_S_Z64_EOCD = 3
_S_Z64_LOC = 4
_S_EOCD = 5
_S_DESCRIPTOR = 6
_S_INFLATE = 7
_S_STORED = 8  # size known from the header
_S_SCAN = 9  # STORED + bit 3: look for the descriptor signature
_S_DONE = 10
_S_CHECK = 11  # data of an entry with header sizes read: verify it
_HEADER_STATES = {
    _S_SIG,
    _S_LOCAL,
    _S_CENTRAL,
    _S_Z64_EOCD,
    _S_Z64_LOC,
    _S_EOCD,
    _S_DESCRIPTOR,
    _S_CHECK,
}

_EMPTY = memoryview(b"")


def _entry_digest(raw_name: bytes, crc: int, csize: int, usize: int) -> int:
    """Order-independent fingerprint term: the directory's sum must equal the stream's."""
    h = hashlib.blake2b(raw_name, digest_size=8)
    h.update(_SIZES.pack(crc, csize, usize))
    return int.from_bytes(h.digest(), "little")


def _zip64_extra(extra: bytes | bytearray | memoryview) -> bytes | None:
    """Body of the zip64 extended-information field, or None. Malformed tails are ignored."""
    pos, end = 0, len(extra)
    while pos + 4 <= end:
        tag, size = struct.unpack_from("<HH", extra, pos)
        pos += 4
        if pos + size > end:
            return None
        if tag == _ZIP64_EXTRA:
            return bytes(extra[pos : pos + size])
        pos += size
    return None


class ZipStreamReader:
    """Parse a zip archive pushed in arbitrary chunks; see the module docstring for the rules.

    Not thread-safe: one reader per download. ``feed`` returns a lazy iterator; it must be run
    to the end (or dropped) before the next ``feed`` is iterated. Chunks are queued in order, so
    feeding twice before iterating is harmless. After an error the reader re-raises it forever.
    """

    def __init__(
        self,
        *,
        max_entry_size: int = 4 * 1024**3,
        max_total_size: int | None = None,
        max_entries: int = 1_000_000,
        max_name_length: int = 1024,
    ) -> None:
        self.max_entry_size = max_entry_size
        self.max_total_size = max_total_size
        self.max_entries = max_entries
        self.max_name_length = max_name_length
        # Deflate can expand incompressible data a little; anything beyond this is stalling.
        self._max_compressed = max_entry_size + (max_entry_size >> 6) + (1 << 20)
        #: Bytes of the stream taken in so far (headers included), for progress.
        self.bytes_in = 0
        #: Decompressed entry bytes handed out so far.
        self.bytes_out = 0
        self._queue: deque[memoryview] = deque()
        self._chunk: memoryview = _EMPTY  # unparsed remainder of the current input chunk
        self._buf = bytearray()  # bytes of the record being assembled (headers only)
        self._state = _S_SIG
        self._rank = 0
        self._busy = False
        self._closed = False
        self._error: NbiaError | None = None
        # Current entry.
        self._name = ""
        self._raw_name = b""
        self._flags = 0
        self._zip64 = False
        self._crc = 0
        self._size = 0
        self._csize = 0
        self._exp_crc = 0
        self._exp_size = 0
        self._exp_csize = 0
        self._csize_limit = 0
        self._remaining = 0
        self._scan_ready = False
        self._inflater: Any = None
        # Archive-level bookkeeping.
        self._entries = 0
        self._local_digest = 0
        self._cd_entries = 0
        self._cd_digest = 0
        self._cd_bytes = 0
        self._z64_total: int | None = None

    # -- public API -------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True once the end of central directory record (and its comment) was read."""
        return self._state == _S_DONE

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[ZipEvent]:
        """Queue a chunk and return an iterator over the events it completes."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError("ZipStreamReader.feed() after close()")
        if data:
            view = memoryview(data)
            if view.ndim != 1 or view.format not in ("B", "b", "c"):
                view = view.cast("B")
            self._queue.append(view)
        return self._drain()

    def close(self) -> Iterator[ZipEvent]:
        """Declare the end of the stream; raise if the archive is incomplete.

        The check is eager when nothing is pending (the normal case), so a bare ``close()`` call
        cannot skip it; if fed chunks were never iterated, the returned iterator processes them
        first and raises at its end.
        """
        if self._error is not None:
            raise self._error
        if self._busy:
            raise RuntimeError("ZipStreamReader.close() while a feed() iterator is running")
        self._closed = True
        if self._queue:
            return self._drain_then_check()
        self._check_complete()
        return iter(())

    # -- driver -----------------------------------------------------------------------------

    def _drain_then_check(self) -> Iterator[ZipEvent]:
        yield from self._drain()
        self._check_complete()

    def _check_complete(self) -> None:
        state = self._state
        if state == _S_DONE:
            return
        if state in (_S_INFLATE, _S_STORED, _S_SCAN, _S_DESCRIPTOR):
            err = IntegrityError(
                f"zip stream truncated inside entry {self._name!r} after {self._size} bytes of data"
            )
        elif self.bytes_in == 0:
            err = IntegrityError("zip stream is empty")
        else:
            err = IntegrityError(
                f"zip stream truncated after {self.bytes_in} bytes: no end of central directory"
            )
        self._error = err
        raise err

    def _drain(self) -> Iterator[ZipEvent]:
        if self._busy:
            raise RuntimeError("ZipStreamReader: previous feed() iterator not exhausted")
        self._busy = True
        try:
            while True:
                state = self._state
                if state in _HEADER_STATES:
                    event = self._header_step(state)
                    if event is None:
                        continue
                    if event is not _MORE:
                        yield event  # type: ignore[misc]
                        continue
                elif self._chunk or self._scan_ready:
                    if state == _S_INFLATE:
                        yield from self._inflate()
                    elif state == _S_STORED:
                        yield from self._stored()
                    elif state == _S_SCAN:
                        yield from self._scan()
                    else:  # _S_DONE
                        raise UnsafeArchiveError("unexpected data after the end of the zip archive")
                    if self._chunk or self._state != state:
                        continue
                # The current chunk is used up: take the next one, or wait for feed().
                if not self._queue:
                    return
                chunk = self._queue.popleft()
                self.bytes_in += len(chunk)
                self._chunk = chunk
        except NbiaError as exc:
            self._error = exc
            raise
        except _PARSE_ERRORS as exc:
            # Defensive: a parser bug must still surface as a one-line integrity error.
            err = IntegrityError(f"malformed zip stream near entry {self._name!r}: {exc}")
            self._error = err
            raise err from exc
        finally:
            self._busy = False

    def _fill(self, n: int) -> bool:
        """Move bytes from the current chunk into the header buffer until it holds ``n``."""
        buf = self._buf
        missing = n - len(buf)
        if missing <= 0:
            return True
        chunk = self._chunk
        if len(chunk) >= missing:
            buf += chunk[:missing]
            self._chunk = chunk[missing:]
            return True
        buf += chunk
        self._chunk = _EMPTY
        return False

    # -- headers ----------------------------------------------------------------------------

    def _header_step(self, state: int) -> object:
        """Advance one header state: returns an event, None (progress, no event) or _MORE."""
        if state == _S_SIG:
            if not self._fill(4):
                return _MORE
            sig = _U32.unpack_from(self._buf)[0]
            rank = _RANK.get(sig)
            if rank is None:
                raise UnsafeArchiveError(
                    f"unknown zip record signature 0x{sig:08x} at entry #{self._entries + 1}"
                )
            if rank < self._rank or (rank == self._rank and rank > 1):
                raise UnsafeArchiveError(f"zip record 0x{sig:08x} out of order")
            self._rank = rank
            self._state = {
                _LOCAL_SIG: _S_LOCAL,
                _CENTRAL_SIG: _S_CENTRAL,
                _Z64_EOCD_SIG: _S_Z64_EOCD,
                _Z64_LOC_SIG: _S_Z64_LOC,
                _EOCD_SIG: _S_EOCD,
            }[sig]
            return None
        if state == _S_LOCAL:
            return self._local_header()
        if state == _S_CHECK:
            return self._finish_known()
        if state == _S_DESCRIPTOR:
            if not self._fill(_DESCRIPTOR_LOOKAHEAD):
                return _MORE
            used = self._match_descriptor(self._buf, 0)
            del self._buf[:used]
            return self._end_entry()
        if state == _S_CENTRAL:
            return self._central_header()
        if state == _S_Z64_EOCD:
            return self._zip64_end()
        if state == _S_Z64_LOC:
            if not self._fill(_Z64_LOC_SIZE):
                return _MORE
            self._count_cd_bytes(_Z64_LOC_SIZE)
            del self._buf[:_Z64_LOC_SIZE]
            self._state = _S_SIG
            return None
        return self._end_record()

    def _local_header(self) -> object:
        buf = self._buf
        if not self._fill(_LOCAL.size):
            return _MORE
        (_sig, _ver, flags, method, _t, _d, crc, csize, usize, nlen, xlen) = _LOCAL.unpack_from(buf)
        number = self._entries + 1
        if nlen > self.max_name_length:
            raise UnsafeArchiveError(
                f"zip entry #{number}: name of {nlen} bytes exceeds {self.max_name_length}"
            )
        if number > self.max_entries:
            raise UnsafeArchiveError(f"zip archive has more than {self.max_entries} entries")
        total = _LOCAL.size + nlen + xlen
        if not self._fill(total):
            return _MORE
        raw = bytes(buf[_LOCAL.size : _LOCAL.size + nlen])
        extra = buf[_LOCAL.size + nlen : total]
        if flags & _FLAG_UTF8:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UnsafeArchiveError(
                    f"zip entry #{number}: name is flagged UTF-8 but is not"
                ) from None
        else:
            name = raw.decode("cp437")
        z64 = _zip64_extra(extra)
        del buf[:total]
        if flags & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION):
            raise UnsafeArchiveError(f"zip entry {name!r} is encrypted")
        if flags & _FLAG_MASKED_HEADER:
            raise UnsafeArchiveError(f"zip entry {name!r} has a masked (encrypted) header")
        if method not in (_STORED, _DEFLATED):
            raise UnsafeArchiveError(f"zip entry {name!r} uses unsupported method {method}")
        self._entries = number
        self._name = name
        self._raw_name = raw
        self._flags = flags
        self._zip64 = z64 is not None
        self._crc = self._size = self._csize = 0
        if flags & _FLAG_DESCRIPTOR:
            self._csize_limit = self._max_compressed
        else:
            if _MAX32 in (usize, csize):
                fields = iter(
                    struct.unpack_from(f"<{len(z64) // 8}Q", z64) if z64 is not None else ()
                )
                try:
                    if usize == _MAX32:
                        usize = next(fields)
                    if csize == _MAX32:
                        csize = next(fields)
                except StopIteration:
                    raise IntegrityError(
                        f"zip entry {name!r}: zip64 sizes announced but missing"
                    ) from None
            if usize > self.max_entry_size:
                raise UnsafeArchiveError(
                    f"zip entry {name!r} declares {usize} bytes, over the {self.max_entry_size}"
                    " byte limit"
                )
            if csize > self._max_compressed:
                raise UnsafeArchiveError(f"zip entry {name!r} declares {csize} compressed bytes")
            if method == _STORED and csize != usize:
                raise IntegrityError(f"zip entry {name!r}: stored sizes differ ({csize}/{usize})")
            self._exp_crc, self._exp_size, self._exp_csize = crc, usize, csize
            self._csize_limit = csize
        if method == _DEFLATED:
            self._inflater = _deflate.decompressobj(-15)
            self._state = _S_INFLATE
        elif flags & _FLAG_DESCRIPTOR:
            self._state = _S_SCAN
            self._scan_ready = bool(buf)
        else:
            self._remaining = csize
            self._state = _S_STORED if csize else _S_CHECK
        if buf and self._state != _S_SCAN:
            # Entry data read ahead together with the header (after a descriptor): put it back.
            self._chunk = memoryview(bytes(buf) + bytes(self._chunk))
            buf.clear()
        return EntryStart(name, method == _DEFLATED)

    def _central_header(self) -> object:
        buf = self._buf
        if not self._fill(_CENTRAL.size):
            return _MORE
        fields = _CENTRAL.unpack_from(buf)
        crc, csize, usize, nlen, xlen, clen = fields[7:13]
        total = _CENTRAL.size + nlen + xlen + clen
        if not self._fill(total):
            return _MORE
        self._count_cd_bytes(total)
        self._cd_entries += 1
        if self._cd_entries > self.max_entries:
            raise UnsafeArchiveError(
                f"zip central directory has more than {self.max_entries} entries"
            )
        raw = bytes(buf[_CENTRAL.size : _CENTRAL.size + nlen])
        if _MAX32 in (usize, csize):
            z64 = _zip64_extra(buf[_CENTRAL.size + nlen : _CENTRAL.size + nlen + xlen])
            values = struct.unpack_from(f"<{len(z64) // 8}Q", z64) if z64 is not None else ()
            wanted = (usize == _MAX32) + (csize == _MAX32)
            if len(values) < wanted:
                raise IntegrityError(
                    f"zip central directory entry {raw.decode('cp437')!r}: zip64 sizes missing"
                )
            pos = 0
            if usize == _MAX32:
                usize, pos = values[0], 1
            if csize == _MAX32:
                csize = values[pos]
        del buf[:total]
        self._cd_digest = (self._cd_digest + _entry_digest(raw, crc, csize, usize)) & _MASK64
        self._state = _S_SIG
        return None

    def _count_cd_bytes(self, n: int) -> None:
        self._cd_bytes += n
        cap = _CD_BASE_CAP + _CD_PER_ENTRY * max(self._entries, self._cd_entries)
        if self._cd_bytes > cap:
            raise UnsafeArchiveError(f"zip central directory exceeds {cap} bytes")

    def _zip64_end(self) -> object:
        buf = self._buf
        if not self._fill(_Z64_EOCD_HEAD.size):
            return _MORE
        size = _Z64_EOCD_HEAD.unpack_from(buf)[1]
        if not _Z64_EOCD_MIN <= size <= _Z64_EOCD_MAX:
            raise UnsafeArchiveError(f"zip64 end of central directory has bad size {size}")
        total = _Z64_EOCD_HEAD.size + size
        if not self._fill(total):
            return _MORE
        self._count_cd_bytes(total)
        self._z64_total = struct.unpack_from("<Q", buf, 32)[0]
        del buf[:total]
        self._state = _S_SIG
        return None

    def _end_record(self) -> object:
        buf = self._buf
        if not self._fill(_EOCD.size):
            return _MORE
        fields = _EOCD.unpack_from(buf)
        total_entries, clen = fields[4], fields[7]
        total = _EOCD.size + clen
        if not self._fill(total):
            return _MORE
        del buf[:total]
        if total_entries == 0xFFFF and self._z64_total is not None:
            total_entries = self._z64_total
        if self._cd_entries != self._entries:
            raise IntegrityError(
                f"zip central directory lists {self._cd_entries} entries,"
                f" the stream carried {self._entries}"
            )
        if total_entries != self._cd_entries:
            raise IntegrityError(
                f"zip end record counts {total_entries} entries,"
                f" the central directory has {self._cd_entries}"
            )
        if self._cd_digest != self._local_digest:
            raise IntegrityError("zip central directory disagrees with the streamed entries")
        self._state = _S_DONE
        if buf:
            raise UnsafeArchiveError("unexpected data after the end of the zip archive")
        return None

    # -- entry data -------------------------------------------------------------------------

    def _account(self, n: int) -> None:
        """Apply the size caps before ``n`` more output bytes are handed out."""
        size = self._size + n
        if size > self.max_entry_size:
            raise UnsafeArchiveError(
                f"zip entry {self._name!r} inflates beyond {self.max_entry_size} bytes"
            )
        out = self.bytes_out + n
        if self.max_total_size is not None and out > self.max_total_size:
            raise UnsafeArchiveError(f"zip archive inflates beyond {self.max_total_size} bytes")
        self._size = size
        self.bytes_out = out

    def _inflate(self) -> Iterator[ZipEvent]:
        d = self._inflater
        assert d is not None
        chunk = self._chunk
        crc32 = _crc32
        while chunk:
            piece = chunk[:_SLICE] if len(chunk) > _SLICE else chunk
            try:
                out = d.decompress(piece, PIECE_SIZE)
            except _INFLATE_ERRORS as exc:
                raise IntegrityError(
                    f"zip entry {self._name!r}: corrupt deflate data ({exc})"
                ) from None
            eof = d.eof
            if not eof:
                used = len(piece) - len(d.unconsumed_tail)
                chunk = chunk[used:]
            else:
                # What follows the deflate stream. ISA-L may have read a few bytes of it
                # with an earlier piece (zlib never does): then it is longer than this
                # piece, and those bytes come back here, ahead of the rest of the chunk.
                unused = d.unused_data
                used = len(piece) - len(unused)
                chunk = chunk[used:] if used >= 0 else unused + chunk[len(piece):]
            self._chunk = chunk
            self._csize += used
            if self._csize > self._csize_limit + (0 if eof else _READ_AHEAD):
                if self._flags & _FLAG_DESCRIPTOR:
                    raise UnsafeArchiveError(
                        f"zip entry {self._name!r}: compressed data exceeds"
                        f" {self._csize_limit} bytes"
                    )
                raise IntegrityError(
                    f"zip entry {self._name!r}: compressed data longer than its header says"
                )
            if eof:
                # Switch state before yielding: the caller may abandon us at the yield.
                self._inflater = None
                self._state = _S_DESCRIPTOR if self._flags & _FLAG_DESCRIPTOR else _S_CHECK
            elif not used and not out:
                raise IntegrityError(f"zip entry {self._name!r}: deflate stream stalled")
            if out:
                self._account(len(out))
                self._crc = crc32(out, self._crc)
                yield EntryData(out)
            if eof:
                return

    def _stored(self) -> Iterator[ZipEvent]:
        chunk = self._chunk
        crc32 = _crc32
        while self._remaining and chunk:
            n = min(self._remaining, len(chunk), PIECE_SIZE)
            piece = chunk[:n]
            chunk = chunk[n:]
            self._chunk = chunk
            self._remaining -= n
            self._csize += n
            self._account(n)
            self._crc = crc32(piece, self._crc)
            if not self._remaining:
                self._state = _S_CHECK
            yield EntryData(piece)

    def _scan(self) -> Iterator[ZipEvent]:
        """STORED + bit 3: everything up to a verified descriptor signature is data."""
        buf = self._buf
        buf += self._chunk
        self._chunk = _EMPTY
        crc32 = _crc32
        # If the caller abandons us at a yield, buf still holds bytes to look at.
        self._scan_ready = True
        while True:
            found = buf.find(_DD_SIG_BYTES)
            # Without a signature, all but the last 3 bytes (a possible signature prefix) are data.
            n = found if found >= 0 else max(len(buf) - 3, 0)
            while n:
                take = min(n, PIECE_SIZE)
                piece = bytes(buf[:take])
                del buf[:take]
                n -= take
                self._csize += take
                if self._csize > self._csize_limit:
                    raise UnsafeArchiveError(
                        f"zip entry {self._name!r}: stored data exceeds {self._csize_limit} bytes"
                    )
                self._account(take)
                self._crc = crc32(piece, self._crc)
                yield EntryData(piece)
            if found < 0 or len(buf) < _DESCRIPTOR_LOOKAHEAD:
                self._scan_ready = False
                return  # need more bytes to decide
            used = self._match_descriptor(buf, 4, lenient=True)
            if used:
                rest = bytes(buf[used:])
                buf.clear()
                self._chunk = memoryview(rest)
                self._scan_ready = False
                yield self._end_entry()
                return
            # A coincidental signature inside the data: its first byte is data.
            self._csize += 1
            self._account(1)
            piece = bytes(buf[:1])
            del buf[:1]
            self._crc = crc32(piece, self._crc)
            yield EntryData(piece)

    def _match_descriptor(self, buf: bytearray, min_sig: int = 0, *, lenient: bool = False) -> int:
        """Length of the data descriptor at the start of ``buf`` (see the module docstring).

        ``min_sig=4`` only tries layouts that start with the signature. With ``lenient`` a
        candidate whose sizes do not fit returns 0 instead of raising (a signature that occurs
        by chance inside scanned STORED data); a fitting one with the wrong CRC still raises.
        """
        has_sig = _U32.unpack_from(buf)[0] == _DD_SIG
        starts = (4, 0) if has_sig else (0,)
        layouts = (_DD64, _DD32) if self._zip64 else (_DD32, _DD64)
        crc_mismatch: int | None = None
        for start in starts:
            if start < min_sig:
                continue
            for layout in layouts:
                crc, csize, usize = layout.unpack_from(buf, start)
                end = start + layout.size
                if (
                    csize == self._csize
                    and usize == self._size
                    and _U32.unpack_from(buf, end)[0] in _AFTER_DESCRIPTOR
                ):
                    if crc == self._crc:
                        self._exp_crc, self._exp_csize, self._exp_size = crc, csize, usize
                        return end
                    crc_mismatch = crc
        if crc_mismatch is None and lenient:
            return 0
        if crc_mismatch is not None:
            raise IntegrityError(
                f"CRC mismatch in zip entry {self._name!r}: recorded {crc_mismatch:08x},"
                f" computed {self._crc:08x}"
            )
        raise IntegrityError(
            f"zip entry {self._name!r}: data descriptor does not match the data"
            f" ({self._csize} compressed, {self._size} bytes)"
        )

    def _finish_known(self) -> EntryEnd:
        """End of an entry whose CRC and sizes came from its local header."""
        if self._csize != self._exp_csize or self._size != self._exp_size:
            raise IntegrityError(
                f"zip entry {self._name!r}: size mismatch (header {self._exp_csize}/"
                f"{self._exp_size}, read {self._csize}/{self._size})"
            )
        if self._crc != self._exp_crc:
            raise IntegrityError(
                f"CRC mismatch in zip entry {self._name!r}: recorded {self._exp_crc:08x},"
                f" computed {self._crc:08x}"
            )
        return self._end_entry()

    def _end_entry(self) -> EntryEnd:
        self._local_digest = (
            self._local_digest + _entry_digest(self._raw_name, self._crc, self._csize, self._size)
        ) & _MASK64
        self._state = _S_SIG
        return EntryEnd(self._name, self._crc, self._size, self._csize)


_MORE = object()  # sentinel: a header state needs more input
