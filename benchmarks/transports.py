"""Which HTTP stack for the series zips: the measurement behind ``api/http.py``.

Run by ``run.py`` (the ``transports`` scenario) or alone::

    python benchmarks/transports.py SERVICES_V1_URL UID_FILE [--repeat 3]

Each candidate streams every series of the LAN archive with N concurrent streams (N =
2, 8, 16) and does exactly the client's per-byte work with each chunk: the streaming zip
reader (inflate + CRC), MD5, and a file write per entry. Only the way bytes come off the
socket differs:

* ``httpx``: ``Client.stream().iter_raw()``, the client's stack until this benchmark;
* ``http.client``: ``HTTPResponse.read(256 KiB)`` (what ``api/http.py`` now does);
* ``pycurl``: libcurl in C, ``perform()`` per stream with a write callback;
* ``processes``: ``http.client`` again, but one process per stream (no shared GIL).

Threads share one GIL, so what matters is how much Python runs per byte: the figure to
read is how N = 16 compares with N = 2. Every run is a fresh process, best of
``--repeat``; the client's CPU and peak RSS are its process tree's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

CANDIDATES = ("httpx", "http.client", "pycurl", "processes")
POINTS = (2, 8, 16)
READ = 256 << 10


class Consumer:
    """The client's per-byte work for one series: inflate/CRC (zip reader), MD5, write."""

    def __init__(self, uid: str, out: Path) -> None:
        from nbia_retriever._zipstream import ZipStreamReader

        self.uid = uid
        self.reader = ZipStreamReader()
        self.folder = out / uid
        self.folder.mkdir()
        self.handle: object = None
        self.digest: object = None
        self.count = 0

    def feed(self, chunk: bytes) -> None:
        from nbia_retriever._zipstream import EntryData, EntryStart

        for event in self.reader.feed(chunk):
            if type(event) is EntryData:
                if self.handle is not None:
                    self.handle.write(event.data)  # type: ignore[attr-defined]
                    self.digest.update(event.data)  # type: ignore[attr-defined]
            elif type(event) is EntryStart:
                self.count += 1
                self.handle = open(self.folder / f"{self.count:08d}", "wb")  # noqa: SIM115
                self.digest = hashlib.md5(usedforsecurity=False)
            elif self.handle is not None:
                self.handle.close()  # type: ignore[attr-defined]
                self.handle = None

    def close(self) -> None:
        for _ in self.reader.close():
            pass
        if not self.reader.finished:
            raise RuntimeError(f"{self.uid}: incomplete zip")


def consume(uid: str, chunks: Iterable[bytes], out: Path) -> None:
    consumer = Consumer(uid, out)
    for chunk in chunks:
        consumer.feed(chunk)
    consumer.close()


def _httpx(base: str, queue: list[str], out: Path) -> None:
    import httpx

    with httpx.Client(timeout=60) as client:
        while queue:
            try:
                uid = queue.pop()
            except IndexError:
                return
            with client.stream("GET", f"{base}getImage",
                               params={"SeriesInstanceUID": uid}) as response:
                consume(uid, response.iter_raw(), out)


def _http_client(base: str, queue: list[str], out: Path) -> None:
    import http.client

    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    while queue:
        try:
            uid = queue.pop()
        except IndexError:
            return
        conn.request("GET", f"{parts.path}getImage?SeriesInstanceUID={uid}")
        response = conn.getresponse()

        def chunks(response: http.client.HTTPResponse = response) -> Iterable[bytes]:
            while data := response.read(READ):
                yield data

        consume(uid, chunks(), out)


def _pycurl(base: str, queue: list[str], out: Path) -> None:
    import pycurl

    curl = pycurl.Curl()
    curl.setopt(pycurl.BUFFERSIZE, READ)
    while queue:
        try:
            uid = queue.pop()
        except IndexError:
            return
        consumer = Consumer(uid, out)
        curl.setopt(pycurl.URL, f"{base}getImage?SeriesInstanceUID={uid}")
        curl.setopt(pycurl.WRITEFUNCTION, consumer.feed)  # libcurl calls back per chunk
        curl.perform()
        consumer.close()


RUNNERS: dict[str, Callable[[str, list[str], Path], None]] = {
    "httpx": _httpx, "http.client": _http_client, "pycurl": _pycurl,
}


def _worker_process(base: str, uids: list[str], out: str) -> None:
    queue = list(uids)
    _http_client(base, queue, Path(out))


def run_once(candidate: str, streams: int, base: str, uids: list[str], out: Path) -> None:
    """One measured run (inside a fresh process: see :func:`measure`)."""
    if candidate == "processes":
        import multiprocessing

        context = multiprocessing.get_context("fork")
        procs = [context.Process(target=_worker_process,
                                 args=(base, uids[i::streams], str(out)))
                 for i in range(streams)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                raise RuntimeError(f"a worker process failed ({proc.exitcode})")
        return
    queue = list(uids)
    runner = RUNNERS[candidate]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            runner(base, queue, out)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def measure(candidate: str, streams: int, base: str, uid_file: Path, repeat: int,
            nbytes: int) -> dict[str, object]:
    """Best of ``repeat`` fresh processes: wall, CPU of the tree, peak RSS."""
    best: dict[str, object] | None = None
    for _ in range(repeat):
        out = Path(tempfile.mkdtemp(prefix="transport-"))
        try:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--one", candidate, str(streams),
                                   base, str(uid_file), str(out)], capture_output=True,
                                  text=True, timeout=600)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if done.returncode != 0:
            return {"candidate": candidate, "streams": streams, "error":
                    (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
        rss = json.loads(done.stdout.strip().splitlines()[-1])["rss"]
        result = {"candidate": candidate, "streams": streams, "wall": wall,
                  "mb_s": nbytes / 1e6 / wall,
                  "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
                  "rss_mb": rss}
        if best is None or wall < float(best["wall"]):  # type: ignore[arg-type]
            best = result
    assert best is not None
    return best


def compare(base: str, uid_file: Path, nbytes: int, repeat: int = 3) -> list[dict[str, object]]:
    results = []
    for streams in POINTS:
        for candidate in CANDIDATES:
            if candidate == "pycurl":
                try:
                    import pycurl  # noqa: F401
                except ImportError:
                    results.append({"candidate": candidate, "streams": streams,
                                    "error": "pycurl not installed"})
                    continue
            result = measure(candidate, streams, base, uid_file, repeat, nbytes)
            results.append(result)
            print(f"  transports {candidate:12s} {streams:2d} streams: "
                  + (f"{result['wall']:.2f} s {result['mb_s']:.0f} MB/s cpu "
                     f"{result['cpu']:.2f} s rss {result['rss_mb']} MB"
                     if "wall" in result else str(result["error"])), flush=True)
    return results


def table(results: list[dict[str, object]]) -> list[str]:
    lines = ["| stack | " + " | ".join(f"{n} streams" for n in POINTS) + " | 16 vs 2 |",
             "|---|" + "---:|" * (len(POINTS) + 1)]
    for candidate in CANDIDATES:
        row = [r for r in results if r["candidate"] == candidate]
        cells = []
        rate = {}
        for n in POINTS:
            found = next((r for r in row if r["streams"] == n), None)
            if found is None or "wall" not in found:
                cells.append(str(found["error"]) if found else "-")
                continue
            rate[n] = float(found["mb_s"])  # type: ignore[arg-type]
            cells.append(f"{found['mb_s']:.0f} MB/s, {found['cpu']:.2f} CPU s, "
                         f"{found['rss_mb']} MB")
        ratio = f"{rate[16] / rate[2]:.2f}x" if 2 in rate and 16 in rate else "-"
        lines.append(f"| {candidate} | " + " | ".join(cells) + f" | {ratio} |")
    return lines


def inflate_comparison(files: Iterable[Path], limit: int = 64 << 20) -> list[str]:
    """Inflate and CRC-32 of the archive's images with each library the zip reader can
    use: CPU seconds per GB of output, one thread, and the wall time of the same work on
    two threads at once against one (1.00: the GIL is released, the cores add up)."""
    import zlib

    libraries: list[tuple[str, object]] = [("zlib (stdlib)", zlib)]
    try:
        from isal import isal_zlib

        libraries.append(("ISA-L (isal)", isal_zlib))
    except ImportError:
        pass
    data: list[bytes] = []
    total = 0
    for path in files:
        blob = path.read_bytes()
        data.append(blob)
        total += len(blob)
        if total >= limit:
            break
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    packed = [packer.compress(d) + packer.flush(zlib.Z_FULL_FLUSH) for d in data]

    def inflate(lib: object) -> None:
        for blob in packed:
            d = lib.decompressobj(-15)  # type: ignore[attr-defined]
            view = memoryview(blob)
            pos = 0
            while pos < len(view):
                piece = view[pos:pos + READ]
                d.decompress(piece, READ)
                pos += len(piece) - len(d.unconsumed_tail)

    def crc(lib: object) -> None:
        for blob in data:
            lib.crc32(blob)  # type: ignore[attr-defined]

    def timed(work: Callable[[], None]) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        work()
        return time.process_time() - cpu, time.perf_counter() - wall

    def two(work: Callable[[], None]) -> float:
        threads = [threading.Thread(target=work) for _ in range(2)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start

    lines = ["| library | inflate CPU s/GB | CRC-32 CPU s/GB | 2 threads vs 1 (inflate) |",
             "|---|---:|---:|---:|"]
    for name, lib in libraries:
        inflate_cpu, inflate_wall = min(timed(lambda lib=lib: inflate(lib)) for _ in range(2))
        crc_cpu, _ = min(timed(lambda lib=lib: crc(lib)) for _ in range(2))
        both = two(lambda lib=lib: inflate(lib))
        lines.append(f"| {name} | {inflate_cpu / total * 1e9:.2f} | {crc_cpu / total * 1e9:.2f} "
                     f"| {both / inflate_wall:.2f} |")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        candidate, streams, base, uid_file, out = sys.argv[2:7]
        uids = Path(uid_file).read_text().split()
        run_once(candidate, int(streams), base, uids, Path(out))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        if candidate == "processes":
            rss += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024 * int(streams)
        print(json.dumps({"rss": rss}))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("base", help="services v1 URL, ending in /")
    parser.add_argument("uid_file")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=0, help="DICOM bytes, for MB/s")
    args = parser.parse_args()
    results = compare(args.base, Path(args.uid_file), args.bytes, args.repeat)
    print("\n".join(table(results)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
