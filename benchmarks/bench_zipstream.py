"""Micro benchmark: how close does ZipStreamReader get to raw zlib (and to `unzip`)?

The engine's throughput target is ~0.9x curl+unzip, and inflate is most of the CPU a download
costs, so the reader's overhead over plain zlib is the number that matters. Builds a ~200 MB
(decompressed) zip shaped like an NBIA series (DEFLATED, data descriptors, one entry per
image) and reports MB/s of decompressed output for:

* zlib one-shot: ``zlib.decompress`` of each entry's whole payload (upper bound, no CRC);
* zlib streamed: 64 KiB chunks through a ``decompressobj`` plus ``crc32`` (unzip's work);
* reader: ``ZipStreamReader`` fed 64 KiB chunks, events consumed (CRC checked inside);
* reader+md5: the same plus MD5 of every piece, as the engine does;
* unzip -p: the Info-ZIP binary writing to /dev/null, when installed (wall clock).

Usage: ``python benchmarks/bench_zipstream.py [--mb 200] [--chunk 65536] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from nbia_retriever._zipstream import EntryData, ZipStreamReader

ENTRY_SIZE = 512 * 1024  # a typical 512x512x16-bit CT slice
NIBBLE = bytes(b & 0x0F for b in range(256))


def make_payloads(total: int) -> list[bytes]:
    """Image-like entries: a text-ish header, low-entropy pixels and runs of zeros (air)."""
    base = os.urandom(8 << 20).translate(NIBBLE)
    header = b"DICM" + b"0008,0060 CT  0010,0010 ANON^PATIENT " * 40
    out: list[bytes] = []
    i = 0
    while sum(map(len, out)) < total:
        start = (i * 7919 * 64) % (len(base) - ENTRY_SIZE)
        pixels = bytearray(base[start : start + ENTRY_SIZE - len(header)])
        pixels[: len(pixels) // 4] = bytes(len(pixels) // 4)
        out.append(header + bytes(pixels))
        i += 1
    return out


def build_zip(payloads: list[bytes]) -> tuple[bytes, list[bytes]]:
    """A zip as NBIA's Java ZipOutputStream writes it: bit 3, signed 32-bit descriptors."""
    parts: list[bytes] = []
    central: list[bytes] = []
    compressed: list[bytes] = []
    offset = 0
    for n, data in enumerate(payloads):
        name = f"{n + 1:08d}.dcm".encode()
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        comp = c.compress(data) + c.flush()
        compressed.append(comp)
        crc = zlib.crc32(data)
        local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 8, 8, 0, 0, 0, 0, 0, len(name), 0)
        desc = struct.pack("<IIII", 0x08074B50, crc, len(comp), len(data))
        central.append(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50, 20, 20, 8, 8, 0, 0, crc, len(comp), len(data),
                len(name), 0, 0, 0, 0, 0, offset,
            )
            + name
        )
        piece = local + name + comp + desc
        parts.append(piece)
        offset += len(piece)
    cd = b"".join(central)
    n = len(payloads)
    parts.append(cd)
    parts.append(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(cd), offset, 0))
    return b"".join(parts), compressed


def best(fn: Callable[[], int], repeat: int) -> tuple[float, int]:
    times = []
    out = 0
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="decompressed size in MB")
    ap.add_argument("--chunk", type=int, default=64 * 1024, help="feed size in bytes")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    t = time.perf_counter()
    payloads = make_payloads(args.mb * 1_000_000)
    blob, compressed = build_zip(payloads)
    total = sum(map(len, payloads))
    del payloads
    print(
        f"built {len(compressed)} entries, {total / 1e6:.0f} MB -> {len(blob) / 1e6:.0f} MB zip"
        f" in {time.perf_counter() - t:.1f} s; chunk {args.chunk} B, best of {args.repeat}"
    )
    view = memoryview(blob)
    chunk = args.chunk

    def zlib_oneshot() -> int:
        return sum(len(zlib.decompress(c, -15)) for c in compressed)

    def zlib_streamed() -> int:
        n = 0
        for c in compressed:
            d = zlib.decompressobj(-15)
            crc = 0
            cv = memoryview(c)
            for i in range(0, len(cv), chunk):
                out = d.decompress(cv[i : i + chunk])
                crc = zlib.crc32(out, crc)
                n += len(out)
        return n

    def reader(md5: bool) -> Callable[[], int]:
        def run() -> int:
            r = ZipStreamReader()
            h = hashlib.md5()
            for i in range(0, len(view), chunk):
                for ev in r.feed(view[i : i + chunk]):
                    if md5 and type(ev) is EntryData:
                        h.update(ev.data)
            list(r.close())
            assert r.finished
            return r.bytes_out

        return run

    results: list[tuple[str, float]] = []
    base = 0.0
    for label, fn in (
        ("zlib one-shot", zlib_oneshot),
        ("zlib streamed+crc", zlib_streamed),
        ("reader", reader(False)),
        ("reader+md5", reader(True)),
    ):
        secs, n = best(fn, args.repeat)
        assert n == total, (label, n, total)
        rate = total / secs / 1e6
        base = base or rate
        results.append((label, rate))
        print(f"{label:20s} {rate:8.0f} MB/s  ({rate / base:.2f}x one-shot)")

    unzip = shutil.which("unzip")
    if unzip:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "series.zip"
            path.write_bytes(blob)

            def run_unzip() -> int:
                with open(os.devnull, "wb") as sink:
                    subprocess.run([unzip, "-p", str(path)], stdout=sink, check=True)
                return total

            secs, _ = best(run_unzip, args.repeat)
            rate = total / secs / 1e6
            print(f"{'unzip -p':20s} {rate:8.0f} MB/s  ({rate / base:.2f}x one-shot)")
            reader_rate = dict(results)["reader+md5"]
            print(f"reader+md5 / unzip -p = {reader_rate / rate:.2f}")


if __name__ == "__main__":
    main()
