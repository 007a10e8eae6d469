"""A streaming zip writer shaped like the NBIA server's ``ZipOutputStream`` output.

Every entry is DEFLATED with general-purpose flag bit 3: the local header carries zero
CRC and sizes and a data descriptor (with its signature) follows the data, because the
real server writes the zip on the fly and cannot seek back. The central directory comes
last. Zip64 fields appear only when a size or offset needs them, as in Java. A STORED
entry (``method=0``; what Java's ZipOutputStream writes when told to store) carries its
CRC and sizes in the local header and has no descriptor.

The compressed bytes come pre-made (the index caches a DEFLATE blob per image), so a
series streams as plain file reads in ~64 KiB chunks and memory stays flat whatever the
series size: only the small central-directory records are kept.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..ondisk import open_regular

CHUNK = 64 * 1024
_ZIP64_LIMIT = 0xFFFFFFFF
_COUNT_LIMIT = 0xFFFF
_FLAGS = 0x0008  # bit 3: sizes and CRC in a data descriptor after the data
_DEFLATED = 8
# 2024-01-01 00:00:00 in MS-DOS format: a fixed stamp keeps the bytes reproducible.
_DOS_TIME = 0
_DOS_DATE = ((2024 - 1980) << 9) | (1 << 5) | 1


@dataclass(frozen=True)
class ZipEntry:
    """One entry: its name, CRC and sizes, and where its DEFLATE bytes come from."""

    name: str
    crc32: int
    compressed_size: int
    size: int
    blob: Path | None = None  # a raw DEFLATE file (the file itself when stored) ...
    data: bytes | None = None  # ... or the compressed bytes themselves
    method: int = _DEFLATED  # 8 DEFLATED (with a descriptor) or 0 STORED
    #: Opens ``blob`` (a cache blob: :meth:`~.index.ArchiveIndex.open_blob`, which
    #: follows no link below the cache), instead of opening it by its path.
    opener: Callable[[], int] | None = None

    @property
    def descriptor(self) -> bool:
        return self.method == _DEFLATED

    @property
    def zip64(self) -> bool:
        return self.size >= _ZIP64_LIMIT or self.compressed_size >= _ZIP64_LIMIT

    def chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        if self.blob is None:
            return
        remaining = self.compressed_size
        # A cache blob (DEFLATED) is opened without following a link, and only if it is
        # a regular file: the index checked it, this closes the gap since. A STORED entry
        # is the archive's own image, which may be a link the archive's owner made.
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
        if self.opener is not None:
            fd = self.opener()
        else:
            fd = (open_regular(self.blob, flags) if self.method == _DEFLATED
                  else os.open(self.blob, flags))
        with os.fdopen(fd, "rb") as handle:
            while remaining > 0:
                block = handle.read(min(CHUNK, remaining))
                if not block:
                    raise OSError(f"{self.blob}: cache blob shorter than indexed")
                remaining -= len(block)
                yield block


def stored_entry(name: str, path: Path, size: int, crc32: int) -> ZipEntry:
    """An image sent as it is stored (no compression)."""
    return ZipEntry(name, crc32, size, size, blob=path, method=0)


def deflated_entry(name: str, payload: bytes, level: int = 6) -> ZipEntry:
    """An entry made in memory (LICENSE, md5hashes.csv, a deliberately corrupted image)."""
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
    data = deflate.compress(payload) + deflate.flush()
    return ZipEntry(name, zlib.crc32(payload), len(data), len(payload), data=data)


def _flags(entry: ZipEntry) -> int:
    return (_FLAGS if entry.descriptor else 0) | (0x0800 if not entry.name.isascii() else 0)


def _local_header(entry: ZipEntry) -> bytes:
    name = entry.name.encode("utf-8")
    version = 45 if entry.zip64 else 20
    if not entry.descriptor:  # STORED: CRC and sizes known up front
        extra = struct.pack("<HHQQ", 0x0001, 16, entry.size, entry.compressed_size) \
            if entry.zip64 else b""
        size = _ZIP64_LIMIT if entry.zip64 else entry.size
        csize = _ZIP64_LIMIT if entry.zip64 else entry.compressed_size
        return struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, version, _flags(entry), entry.method, _DOS_TIME,
            _DOS_DATE, entry.crc32, csize, size, len(name), len(extra),
        ) + name + extra
    extra = struct.pack("<HHQQ", 0x0001, 16, 0, 0) if entry.zip64 else b""
    # Sizes are unknown "at write time" (bit 3): zero, or 0xFFFFFFFF pointing at the zip64
    # extra (itself zero), as Python's zipfile writes a streamed zip64 entry.
    size = _ZIP64_LIMIT if entry.zip64 else 0
    return struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, version, _flags(entry), _DEFLATED, _DOS_TIME, _DOS_DATE,
        0, size, size, len(name), len(extra),
    ) + name + extra


def _descriptor(entry: ZipEntry) -> bytes:
    if not entry.descriptor:
        return b""
    if entry.zip64:
        return struct.pack("<IIQQ", 0x08074B50, entry.crc32, entry.compressed_size, entry.size)
    return struct.pack("<IIII", 0x08074B50, entry.crc32, entry.compressed_size, entry.size)


def _central_record(entry: ZipEntry, offset: int) -> bytes:
    name = entry.name.encode("utf-8")
    extra_values: list[int] = []
    size = entry.size
    csize = entry.compressed_size
    if size >= _ZIP64_LIMIT:
        extra_values.append(size)
        size = _ZIP64_LIMIT
    if csize >= _ZIP64_LIMIT:
        extra_values.append(csize)
        csize = _ZIP64_LIMIT
    if offset >= _ZIP64_LIMIT:
        extra_values.append(offset)
        offset = _ZIP64_LIMIT
    extra = b""
    if extra_values:
        extra = struct.pack(f"<HH{len(extra_values)}Q", 0x0001, 8 * len(extra_values),
                            *extra_values)
    version = 45 if extra_values or entry.zip64 else 20
    return struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, 0x0300 | version, version, _flags(entry),
        entry.method,
        _DOS_TIME, _DOS_DATE, entry.crc32, csize, size, len(name), len(extra), 0, 0, 0,
        0o100644 << 16, offset,
    ) + name + extra


def _end_records(count: int, cd_offset: int, cd_size: int) -> bytes:
    tail = b""
    if count >= _COUNT_LIMIT or cd_offset >= _ZIP64_LIMIT or cd_size >= _ZIP64_LIMIT:
        zip64_end = cd_offset + cd_size
        tail += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count,
                            cd_size, cd_offset)
        tail += struct.pack("<IIQI", 0x07064B50, 0, zip64_end, 1)
    tail += struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, min(count, _COUNT_LIMIT), min(count, _COUNT_LIMIT),
        min(cd_size, _ZIP64_LIMIT), min(cd_offset, _ZIP64_LIMIT), 0,
    )
    return tail


def zip_size(entries: Iterable[ZipEntry]) -> int:
    """The exact byte length :func:`stream_zip` will produce (used to place faults)."""
    offset = 0
    cd_size = 0
    count = 0
    for entry in entries:
        record = _central_record(entry, offset)
        offset += len(_local_header(entry)) + entry.compressed_size + len(_descriptor(entry))
        cd_size += len(record)
        count += 1
    return offset + cd_size + len(_end_records(count, offset, cd_size))


def stream_zip(
    entries: Iterable[ZipEntry],
    *,
    chunk: int = CHUNK,
    on_entry: Callable[[ZipEntry], None] | None = None,
) -> Iterator[bytes]:
    """Yield the zip as byte chunks of about ``chunk`` bytes (headers are coalesced)."""
    offset = 0
    central: list[bytes] = []
    pending = bytearray()
    for entry in entries:
        if on_entry is not None:
            on_entry(entry)
        header = _local_header(entry)
        central.append(_central_record(entry, offset))
        pending += header
        for block in entry.chunks():
            if not pending and len(block) >= chunk:
                yield block
                continue
            pending += block
            if len(pending) >= chunk:
                yield bytes(pending)
                pending.clear()
        pending += _descriptor(entry)
        offset += len(header) + entry.compressed_size + len(_descriptor(entry))
    directory = b"".join(central)
    pending += directory
    pending += _end_records(len(central), offset, len(directory))
    yield bytes(pending)
