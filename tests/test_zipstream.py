"""ZipStreamReader: streamed zips in any chunking read back exactly, damage never passes.

Zips come from two writers: Python's :mod:`zipfile` writing into an unseekable stream (which
makes it set flag bit 3 and write data descriptors, STORED entries included), and a small
hand-made writer below for the layouts zipfile cannot produce (descriptors without signature,
zip64 descriptors without a local zip64 extra as Go writes them, zip64 end records, hostile
headers).
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbia_retriever._zipstream import (
    PIECE_SIZE,
    EntryData,
    EntryEnd,
    EntryStart,
    ZipEvent,
    ZipStreamReader,
)
from nbia_retriever.errors import IntegrityError, NbiaError, UnsafeArchiveError

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# --------------------------------------------------------------------------- writers


class Unseekable:
    """A write-only sink without tell/seek: zipfile then streams with data descriptors."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()

    def write(self, data: bytes) -> int:
        return self._buf.write(data)

    def flush(self) -> None:
        pass

    def getvalue(self) -> bytes:
        return self._buf.getvalue()


@pytest.fixture(scope="module", autouse=True, params=["isal", "zlib"])
def inflate_library(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs with ISA-L (the default where installed) and with the stdlib zlib
    (the fallback): the two differ in how far they read past a deflate stream's end."""
    import nbia_retriever._zipstream as zs

    if request.param == "isal":
        pytest.importorskip("isal")
        assert zs.INFLATE_LIBRARY == "isal"
        yield "isal"
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zs, "_deflate", zlib)
        mp.setattr(zs, "_crc32", zlib.crc32)
        mp.setattr(zs, "_INFLATE_ERRORS", (zlib.error,))
        mp.setattr(zs, "_PARSE_ERRORS", (zlib.error, struct.error, ValueError, IndexError))
        yield "zlib"


def python_zip(
    entries: Sequence[tuple[str, bytes]],
    *,
    method: int = zipfile.ZIP_DEFLATED,
    force_zip64: bool = False,
) -> bytes:
    sink = Unseekable()
    with zipfile.ZipFile(sink, "w", compression=method) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = method  # zf.open() ignores the archive's default
            with zf.open(info, "w", force_zip64=force_zip64) as f:
                f.write(data)
    return sink.getvalue()


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def hand_zip(
    entries: Sequence[tuple[str | bytes, bytes]],
    *,
    method: int = 8,
    descriptor: bool = True,
    dd_sig: bool = True,
    dd64: bool = False,
    local_zip64: bool = False,
    cd_zip64: bool = False,
    z64_end: bool = False,
    flags: int = 0,
    utf8: bool = True,
    bad_crc: bool = False,
    cd_names: Sequence[bytes] | None = None,
    eocd_count: int | None = None,
    comment: bytes = b"",
) -> bytes:
    """Write a zip by hand, in the layout the keyword arguments ask for."""
    out = bytearray()
    central = bytearray()
    for i, (name, data) in enumerate(entries):
        raw = name if isinstance(name, bytes) else name.encode("utf-8" if utf8 else "cp437")
        payload = deflate(data) if method == 8 else data
        crc = zlib.crc32(data) ^ (1 if bad_crc else 0)
        csize, usize = len(payload), len(data)
        f = flags | (0x08 if descriptor else 0) | (0x800 if utf8 else 0)
        h_crc, h_c, h_u = (0, 0, 0) if descriptor else (crc, csize, usize)
        extra = b""
        if local_zip64:
            extra = struct.pack("<HHQQ", 1, 16, h_u, h_c)
            h_c = h_u = 0xFFFFFFFF
        offset = len(out)
        out += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 45, f, method, 0, 0, h_crc, h_c, h_u, len(raw), len(extra)
        )
        out += raw + extra + payload
        if descriptor:
            if dd_sig:
                out += b"PK\x07\x08"
            out += struct.pack("<IQQ" if dd64 else "<III", crc, csize, usize)
        cd_raw = cd_names[i] if cd_names is not None else raw
        cd_extra = b""
        c_c, c_u, c_off = csize, usize, offset
        if cd_zip64:
            cd_extra = struct.pack("<HHQQQ", 1, 24, usize, csize, offset)
            c_c = c_u = c_off = 0xFFFFFFFF
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, f, method, 0, 0, crc, c_c, c_u,
            len(cd_raw), len(cd_extra), 0, 0, 0, 0, c_off,
        )
        central += cd_raw + cd_extra
    n = len(entries) if eocd_count is None else eocd_count
    cd_offset = len(out)
    out += central
    if z64_end:
        z64_offset = len(out)
        out += struct.pack(
            "<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(central), cd_offset
        )
        out += struct.pack("<IIQI", 0x07064B50, 0, z64_offset, 1)
        out += struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, len(comment)
        )
    else:
        out += struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), cd_offset, len(comment)
        )
    return bytes(out + comment)


# --------------------------------------------------------------------------- reading


def split(blob: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(blob)})
    return [blob[a:b] for a, b in zip([0, *points], [*points, len(blob)], strict=True)]


def collect(events: Iterable[ZipEvent], state: dict[str, object]) -> None:
    """Check event grammar and that every EntryEnd's CRC/size describe the data handed out."""
    entries: list[tuple[str, bytes]] = state["entries"]  # type: ignore[assignment]
    for ev in events:
        if isinstance(ev, EntryStart):
            assert state.get("current") is None, "EntryStart inside an entry"
            state["current"] = (ev.name, bytearray())
        elif isinstance(ev, EntryData):
            assert state.get("current") is not None, "EntryData outside an entry"
            assert 0 < len(ev.data) <= PIECE_SIZE
            state["current"][1].extend(ev.data)  # type: ignore[index]
        else:
            assert isinstance(ev, EntryEnd)
            name, data = state.pop("current")  # type: ignore[misc]
            state["current"] = None
            assert ev.name == name
            assert ev.size == len(data)
            assert ev.crc32 == zlib.crc32(data)
            entries.append((name, bytes(data)))


def read_zip(chunks: Iterable[bytes], **limits: int | None) -> list[tuple[str, bytes]]:
    reader = ZipStreamReader(**limits)  # type: ignore[arg-type]
    state: dict[str, object] = {"entries": []}
    total = 0
    for chunk in chunks:
        total += len(chunk)
        collect(reader.feed(chunk), state)
    collect(reader.close(), state)
    assert reader.finished
    assert state["current"] is None if "current" in state else True
    entries: list[tuple[str, bytes]] = state["entries"]  # type: ignore[assignment]
    assert reader.bytes_in == total
    assert reader.bytes_out == sum(len(d) for _, d in entries)
    return entries


def read_all(blob: bytes, **limits: int | None) -> list[tuple[str, bytes]]:
    return read_zip([blob], **limits)


# --------------------------------------------------------------------------- strategies

names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/\\"),
    min_size=1,
    max_size=12,
)
payloads = st.one_of(
    st.binary(max_size=2000),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=16), st.integers(1, 400)),
)
entry_lists = st.lists(
    st.tuples(names, payloads), min_size=0, max_size=5, unique_by=lambda e: e[0]
)

SAMPLE = [
    ("LICENSE", b"Creative Commons " * 50),
    ("00000001.dcm", bytes(range(256)) * 40 + b"\0" * 3000),
    ("empty", b""),
    ("sig inside", b"xPK\x07\x08" * 200 + b"PK\x03\x04PK\x01\x02"),
    ("md5hashes.csv", b"Filename,MD5Hash\n00000001.dcm,0123456789abcdef\n"),
]

# --------------------------------------------------------------------------- round trips


@FAST
@given(
    entries=entry_lists,
    method=st.sampled_from([zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED]),
    force_zip64=st.booleans(),
    data=st.data(),
)
def test_python_zips_read_back_in_any_chunking(
    entries: list[tuple[str, bytes]], method: int, force_zip64: bool, data: st.DataObject
) -> None:
    blob = python_zip(entries, method=method, force_zip64=force_zip64)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=40))
    assert read_zip(split(blob, cuts)) == entries


@FAST
@given(
    entries=st.lists(st.tuples(names, payloads), max_size=4),
    method=st.sampled_from([0, 8]),
    descriptor=st.booleans(),
    dd_sig=st.booleans(),
    dd64=st.booleans(),
    local_zip64=st.booleans(),
    cd_zip64=st.booleans(),
    z64_end=st.booleans(),
    utf8=st.booleans(),
    data=st.data(),
)
def test_hand_made_layouts_read_back_in_any_chunking(
    entries: list[tuple[str, bytes]],
    method: int,
    descriptor: bool,
    dd_sig: bool,
    dd64: bool,
    local_zip64: bool,
    cd_zip64: bool,
    z64_end: bool,
    utf8: bool,
    data: st.DataObject,
) -> None:
    if method == 0 and descriptor:
        dd_sig = True  # STORED + bit 3 is only findable through the descriptor signature
    if not utf8:
        entries = [(n.encode("utf-8").decode("cp437"), d) for n, d in entries]
    blob = hand_zip(
        entries, method=method, descriptor=descriptor, dd_sig=dd_sig, dd64=dd64,
        local_zip64=local_zip64, cd_zip64=cd_zip64, z64_end=z64_end, utf8=utf8,
    )
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=30))
    assert read_zip(split(blob, cuts)) == entries


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_one_byte_chunks(method: int) -> None:
    blob = python_zip(SAMPLE, method=method)
    assert read_zip([blob[i : i + 1] for i in range(len(blob))]) == SAMPLE


@pytest.mark.parametrize(
    ("dd_sig", "local_zip64"), [(True, False), (False, False), (True, True), (False, True)]
)
def test_zip64_descriptor_layout_is_deduced(dd_sig: bool, local_zip64: bool) -> None:
    """8-byte descriptor sizes with or without a local zip64 extra (Go writes them without)."""
    blob = hand_zip(SAMPLE, dd64=True, dd_sig=dd_sig, local_zip64=local_zip64)
    assert read_zip(split(blob, range(0, len(blob), 13))) == SAMPLE


def test_32bit_descriptor_despite_local_zip64_extra() -> None:
    blob = hand_zip(SAMPLE, dd64=False, local_zip64=True)
    assert read_all(blob) == SAMPLE


def test_empty_archive() -> None:
    blob = python_zip([])
    assert len(blob) == 22
    assert read_all(blob) == []


def test_directory_entries_and_known_sizes() -> None:
    """zipfile's mkdir writes a STORED entry without bit 3: sizes come from the header."""
    sink = Unseekable()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.mkdir("sub")
        zf.writestr("sub/x.dcm", b"abc" * 1000)
    assert read_all(sink.getvalue()) == [("sub/", b""), ("sub/x.dcm", b"abc" * 1000)]


def test_large_entry_is_cut_into_bounded_pieces() -> None:
    big = bytes(5 * PIECE_SIZE + 123)
    blob = python_zip([("big.dcm", big)])
    reader = ZipStreamReader()
    sizes = [len(ev.data) for ev in reader.feed(blob) if isinstance(ev, EntryData)]
    list(reader.close())
    assert sum(sizes) == len(big)
    assert max(sizes) <= PIECE_SIZE
    assert len(sizes) >= 6


def test_stored_data_is_passed_through_without_copy() -> None:
    blob = hand_zip([("a", b"hello world" * 10)], method=0, descriptor=False)
    reader = ZipStreamReader()
    pieces = [ev.data for ev in reader.feed(blob) if isinstance(ev, EntryData)]
    assert pieces and all(isinstance(p, memoryview) for p in pieces)


def test_names_are_passed_through_verbatim() -> None:
    """Sanitising is the engine's job: the reader must not hide what the server sent."""
    hostile = ["../../etc/passwd", "/abs/path.dcm", "a\\..\\b.dcm", "C:\\x", "dir/../../y", ""]
    entries = [(n, n.encode() * 3) for n in hostile]
    assert read_all(hand_zip(entries)) == entries


def test_name_encoding_follows_flag_bit_11() -> None:
    raw = "é.dcm".encode()
    assert read_all(hand_zip([(raw, b"x")], utf8=True))[0][0] == "é.dcm"
    assert read_all(hand_zip([(raw, b"x")], utf8=False))[0][0] == raw.decode("cp437")


# --------------------------------------------------------------------------- API behaviour


def test_memoryview_and_bytearray_input() -> None:
    blob = python_zip(SAMPLE)
    chunks = [memoryview(bytearray(blob[:100])), bytearray(blob[100:500]), blob[500:]]
    assert read_zip(chunks) == SAMPLE  # type: ignore[arg-type]


def test_feeding_twice_before_iterating_keeps_order() -> None:
    blob = python_zip(SAMPLE)
    reader = ZipStreamReader()
    first = reader.feed(blob[:700])
    second = reader.feed(blob[700:])
    state: dict[str, object] = {"entries": []}
    collect(second, state)  # drains both queued chunks, in order
    collect(first, state)  # nothing left
    collect(reader.close(), state)
    assert state["entries"] == SAMPLE


def test_close_processes_chunks_never_iterated() -> None:
    blob = python_zip(SAMPLE)
    reader = ZipStreamReader()
    reader.feed(blob)  # iterator dropped unused
    state: dict[str, object] = {"entries": []}
    collect(reader.close(), state)
    assert state["entries"] == SAMPLE
    assert reader.finished


def test_abandoned_iterator_leaves_a_consistent_reader() -> None:
    """The engine may stop consuming at any event (cancel); resuming must not lose bytes."""
    blob = python_zip(SAMPLE)
    reader = ZipStreamReader()
    state: dict[str, object] = {"entries": []}
    it = reader.feed(blob[:1500])
    resumed = 0
    while (ev := next(it, None)) is not None:
        collect([ev], state)
        del it  # closes the generator in the middle of the chunk
        it = reader.feed(b"")  # resume where it stopped
        resumed += 1
    assert resumed >= 4
    rest = reader.feed(blob[1500:])
    collect(rest, state)
    collect(reader.close(), state)
    assert state["entries"] == SAMPLE


def test_bare_close_call_still_detects_truncation() -> None:
    blob = python_zip(SAMPLE)
    reader = ZipStreamReader()
    list(reader.feed(blob[:-10]))
    with pytest.raises(IntegrityError, match="truncated"):
        reader.close()  # not iterated: the check must not depend on it


def test_errors_are_sticky_and_feed_after_close_is_refused() -> None:
    reader = ZipStreamReader()
    with pytest.raises(UnsafeArchiveError):
        list(reader.feed(b"GARBAGE!" * 10))
    with pytest.raises(UnsafeArchiveError):
        reader.feed(b"more")
    done = ZipStreamReader()
    list(done.feed(python_zip([])))
    list(done.close())
    with pytest.raises(RuntimeError):
        done.feed(b"x")


def test_empty_stream_is_an_error() -> None:
    reader = ZipStreamReader()
    with pytest.raises(IntegrityError, match="empty"):
        reader.close()


# --------------------------------------------------------------------------- damage


def test_every_truncation_is_detected() -> None:
    for method in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED):
        blob = python_zip(SAMPLE[:2] + SAMPLE[3:4], method=method)
        for cut in range(len(blob)):
            with pytest.raises(IntegrityError):
                read_zip([blob[:cut]])


@FAST
@given(entries=entry_lists, data=st.data())
def test_truncation_anywhere_raises(entries: list[tuple[str, bytes]], data: st.DataObject) -> None:
    blob = hand_zip(entries, dd64=data.draw(st.booleans()), z64_end=data.draw(st.booleans()))
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(IntegrityError):
        read_zip(split(blob[:cut], data.draw(st.lists(st.integers(0, cut), max_size=5))))


def _flip_outcome(blob: bytes, pos: int, bit: int) -> list[tuple[str, bytes]] | None:
    damaged = bytearray(blob)
    damaged[pos] ^= 1 << bit
    try:
        return read_all(bytes(damaged))
    except NbiaError:
        return None  # any other exception type fails the test


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from([zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED]),
    force_zip64=st.booleans(),
    data=st.data(),
)
def test_bit_flip_never_yields_unverified_data(
    method: int, force_zip64: bool, data: st.DataObject
) -> None:
    blob = python_zip(SAMPLE, method=method, force_zip64=force_zip64)
    pos = data.draw(st.integers(0, len(blob) - 1))
    outcome = _flip_outcome(blob, pos, data.draw(st.integers(0, 7)))
    if outcome is not None:
        # Only names may change (a flipped name or UTF-8 flag); the bytes must be the originals.
        assert [d for _, d in outcome] == [d for _, d in SAMPLE]


def _data_ranges(blob: bytes) -> list[tuple[int, int, int]]:
    """(start, end, method) of each entry's data, from the (undamaged) zip's directory."""
    ranges = []
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        for info in zf.infolist():
            nlen, xlen = struct.unpack_from("<HH", blob, info.header_offset + 26)
            start = info.header_offset + 30 + nlen + xlen
            ranges.append((start, start + info.compress_size, info.compress_type))
    return ranges


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_flipped_data_bytes_raise(method: int) -> None:
    entries = [("a.dcm", bytes(range(256)) * 3), ("b.dcm", b"hello " * 30)]
    blob = python_zip(entries, method=method)
    raised = silent = 0
    for start, end, _ in _data_ranges(blob):
        for pos in range(start, end):
            for bit in (0, 3, 7):
                outcome = _flip_outcome(blob, pos, bit)
                if outcome is None:
                    raised += 1
                else:
                    # Deflate ignores the padding bits after its final block: harmless.
                    assert method == zipfile.ZIP_DEFLATED and outcome == entries
                    silent += 1
    assert raised > 0 and silent <= 8


def test_crc_mismatch_names_the_entry() -> None:
    for descriptor in (True, False):
        for method in (0, 8):
            blob = hand_zip([("ok", b"1"), ("bad.dcm", b"payload")], method=method,
                            descriptor=descriptor, bad_crc=True)
            with pytest.raises(IntegrityError, match=r"CRC mismatch.*'ok'"):
                read_all(blob)


def test_descriptor_sizes_that_do_not_match_raise() -> None:
    blob = bytearray(hand_zip([("x.dcm", b"abc" * 100)]))
    sizes_at = blob.index(b"PK\x07\x08") + 8  # compressed size field
    blob[sizes_at] ^= 1
    with pytest.raises(IntegrityError, match="descriptor"):
        read_all(bytes(blob))


def test_central_directory_must_match_the_stream() -> None:
    entries = [("a", b"1"), ("b", b"2")]
    with pytest.raises(IntegrityError, match="disagrees"):
        read_all(hand_zip(entries, cd_names=[b"a", b"c"]))
    with pytest.raises(IntegrityError, match="counts 3"):
        read_all(hand_zip(entries, eocd_count=3))


def test_central_directory_missing_an_entry_raises() -> None:
    good = hand_zip([("a", b"1"), ("b", b"2")])
    one = hand_zip([("a", b"1")])
    # Stream both entries, then the directory of a one-entry archive.
    local_end = good.index(b"PK\x01\x02")
    with pytest.raises(IntegrityError, match="lists 1 entries"):
        read_all(good[:local_end] + one[one.index(b"PK\x01\x02") :])


def test_data_after_the_end_record_is_refused() -> None:
    blob = python_zip(SAMPLE)
    with pytest.raises(UnsafeArchiveError, match="after the end"):
        read_all(blob + b"\0")
    with pytest.raises(UnsafeArchiveError, match="after the end"):
        read_zip([blob, b"PK\x03\x04"])


def test_unknown_signature_is_refused() -> None:
    with pytest.raises(UnsafeArchiveError, match="signature"):
        read_all(b"PK\x05\x05" + bytes(100))
    blob = python_zip(SAMPLE)
    cd = blob.index(b"PK\x01\x02")
    nlen, xlen, clen = struct.unpack_from("<HHH", blob, cd + 28)
    first_record_end = cd + 46 + nlen + xlen + clen
    # A local header after the central directory has started is out of order.
    with pytest.raises(UnsafeArchiveError, match="out of order"):
        read_all(blob[:first_record_end] + blob[:30])


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize("flag", [0x0001, 0x0040, 0x2000])
def test_encrypted_entries_are_refused(flag: int) -> None:
    with pytest.raises(UnsafeArchiveError, match=r"'secret\.dcm'"):
        read_all(hand_zip([("secret.dcm", b"x" * 100)], flags=flag))


def test_unknown_method_is_refused() -> None:
    with pytest.raises(UnsafeArchiveError, match="method 12"):
        read_all(hand_zip([("a.bz2", b"x")], method=12, descriptor=False))


def test_name_length_and_entry_count_caps() -> None:
    with pytest.raises(UnsafeArchiveError, match="name of 20 bytes"):
        read_all(hand_zip([("n" * 20, b"")]), max_name_length=19)
    assert read_all(hand_zip([("n" * 20, b"")]), max_name_length=20)[0][0] == "n" * 20
    entries = [(str(i), b"") for i in range(4)]
    with pytest.raises(UnsafeArchiveError, match="more than 3 entries"):
        read_all(hand_zip(entries), max_entries=3)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """32 MiB of zeros deflated to ~32 KiB, streamed with a descriptor."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(1 << 20)
    comp = b"".join(c.compress(block) for _ in range(32)) + c.flush()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 8, 8, 0, 0, 0, 0, 0, 8, 0)
    return local + b"bomb.dcm" + comp + b"PK\x07\x08" + bytes(12) + b"PK\x01\x02" + bytes(60)


def test_zip_bomb_is_stopped_without_inflating_it(bomb: bytes) -> None:
    limit = 1 << 20
    reader = ZipStreamReader(max_entry_size=limit)
    handed_out = 0
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeArchiveError, match=r"'bomb\.dcm' inflates beyond"):
            for i in range(0, len(bomb), 4096):
                for ev in reader.feed(bomb[i : i + 4096]):
                    if isinstance(ev, EntryData):
                        handed_out += len(ev.data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert handed_out <= limit
    assert peak < 4 * PIECE_SIZE  # nowhere near the 32 MiB the entry would inflate to


def test_total_size_cap() -> None:
    entries = [("a", b"a" * 600_000), ("b", b"b" * 600_000)]
    blob = python_zip(entries)
    with pytest.raises(UnsafeArchiveError, match="archive inflates beyond"):
        read_all(blob, max_total_size=1_000_000)
    assert read_all(blob, max_total_size=1_200_000) == entries


def test_declared_size_over_the_cap_is_refused_up_front() -> None:
    blob = hand_zip([("big", b"z" * 5000)], descriptor=False)
    reader = ZipStreamReader(max_entry_size=4096)
    with pytest.raises(UnsafeArchiveError, match="declares 5000 bytes"):
        list(reader.feed(blob))
    assert reader.bytes_out == 0


def test_stored_with_descriptor_but_no_signature_fails_loudly() -> None:
    """Undetectable end of data: must end in an error, never in invented entries."""
    blob = hand_zip([("a", b"data" * 10)], method=0, dd_sig=False)
    with pytest.raises(IntegrityError, match="truncated inside entry 'a'"):
        read_all(blob)


def _events(blob: bytes) -> Iterator[ZipEvent]:
    reader = ZipStreamReader()
    yield from reader.feed(blob)
    yield from reader.close()


def test_entry_start_reports_compression() -> None:
    stored = [ev for ev in _events(hand_zip([("s", b"x")], method=0)) if isinstance(ev, EntryStart)]
    deflated = [ev for ev in _events(hand_zip([("d", b"x")])) if isinstance(ev, EntryStart)]
    assert stored == [EntryStart("s", False)]
    assert deflated == [EntryStart("d", True)]
    end = next(ev for ev in _events(hand_zip([("d", b"xyz")])) if isinstance(ev, EntryEnd))
    assert end == EntryEnd("d", zlib.crc32(b"xyz"), 3, len(deflate(b"xyz")))
