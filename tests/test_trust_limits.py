"""Trust, round 2 (issue 21, items 4, 5 and 8): limits that do not trust the server.

A server decides how many bytes and entries a series zip inflates to, how fast it sends
them and what the entries are called. Here it lies about each: a bomb with no ``File
Size`` on a small file system, a 2-image series of 10,000 entries, a stream of 1,100
bytes a second, folder entries and empty names vouched for by ``md5hashes.csv``, and
names too long for the file system once made unique. Every test plays the server over
real HTTP on loopback (``hostile_server.py``); the disk tests use a real tmpfs.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from enginehelpers import start_workers, write_manifest
from hostile_server import (
    Crafted,
    HostileServer,
    endless_deflate,
    files_of,
    record,
    series_zip,
    trickle,
)
from nbia_retriever import download, make_engine
from nbia_retriever.api.http import FLOOR_RATE, READ_SIZE, ProgressFloor
from nbia_retriever.engine.staging import inflation_cap
from nbia_retriever.errors import NetworkError
from nbia_retriever.models import SeriesInfo, SeriesState
from reliability_helpers import run_cli, tmpfs

FAST = {"backoff_base": 0.01, "timeout": 5.0, "api": "v1"}
GiB = 1024**3
MiB = 1024**2


@pytest.fixture(scope="module")
def archive(archive_factory):
    return archive_factory(seed=93, collections=1, patients=1, studies=1, series=3, images=2,
                           rows=16, columns=16, restricted=False, awkward=False)


def cart(tmp_path: Path, server: HostileServer, uids: list[str], **kw: object) -> Path:
    return write_manifest(tmp_path / "cart.tcia", uids, server.download_url, **kw)  # type: ignore[arg-type]


def published(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".nbia" not in p.parts]


# ------------------------------------------------------------ 4. disk and inode limits


class LowestFree:
    """The least free space seen on a file system while a download runs, sampled by a
    thread (a measurement, not a synchronisation: with the limit in place the free space
    never drops below the reserve, so no sample can see it there)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lowest = shutil.disk_usage(path).free
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(0.002):
            self.lowest = min(self.lowest, shutil.disk_usage(self.path).free)

    def __enter__(self) -> LowestFree:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def ready_engine(manifest: Path, dest: Path, server: HostileServer, *, processes: int,
                 **options: object):
    """An engine whose worker process is up (attempts wait for none: they run on threads
    until one is ready, so a test that needs a worker waits for it first)."""
    engine = make_engine(manifest, dest, api_url=server.api_url, processes=processes,
                         workers=1, **{**FAST, **options})
    if processes:
        start_workers(engine)
    return engine


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize(("size", "processes"), [(None, 0), (50_000_000, 0), (None, 1)],
                         ids=["no-file-size", "lying-file-size", "in-a-worker"])
def test_an_inflating_bomb_leaves_the_reserve_free(tmp_path, archive, hostile, size,
                                                   processes):
    honest, bomb = archive.series[0], archive.series[1]
    hostile.series[bomb.series_uid] = Crafted(record(bomb, size=size), endless_deflate())
    # The honest series first: it proves the endpoint in this process, then the bomb
    # runs in the worker when there is one.
    manifest = cart(tmp_path, hostile, [honest.series_uid, bomb.series_uid], retries=0)
    with tmpfs(tmp_path / "mnt", "1200m") as mnt, LowestFree(mnt) as watch:
        engine = ready_engine(manifest, mnt / "dl", hostile, processes=processes)
        report = engine.run()
    print(f"lowest free: {watch.lowest / MiB:.0f} MiB")
    assert engine.stats().worker_attempts == processes
    # The reserve is the larger of 1 GiB and 5% of the free space: 1 GiB here.
    assert watch.lowest >= GiB, f"the bomb left only {watch.lowest / MiB:.0f} MiB free"
    result = report.results[bomb.series_uid]
    assert result.state == SeriesState.ERROR and "disk space" in result.error, result.error
    assert "\n" not in result.error
    # The series fails alone: the run goes on (other writers, our own included, had room).
    assert not report.fatal, report.fatal
    assert report.results[honest.series_uid].state == SeriesState.COMPLETE


def test_a_series_without_a_file_size_is_capped_by_its_images_or_small():
    # What the zip may inflate to at most, whatever the free space: from the image count
    # (2 GiB an image, the largest multi-frame objects being far smaller), else one
    # image's worth. (Free space is guarded on its own: the test above.)
    assert inflation_cap(SeriesInfo("1.2.3", image_count=2)) == 4 * GiB
    assert inflation_cap(SeriesInfo("1.2.3")) <= 2 * GiB
    assert inflation_cap(SeriesInfo("1.2.3", image_count=0)) <= 2 * GiB
    assert inflation_cap(SeriesInfo("1.2.3", file_size=10**6)) < GiB


def test_a_two_image_series_never_creates_thousands_of_files(tmp_path, archive, hostile):
    first = archive.series[0]
    padding = [(f"note{i:05d}.txt", b"x") for i in range(10_000)]
    hostile.series = {first.series_uid: Crafted(
        record(first), series_zip(files_of(first), unlisted=padding))}
    report = download(cart(tmp_path, hostile, [first.series_uid], retries=0),
                      tmp_path / "dl", **FAST)
    result = report.results[first.series_uid]
    assert result.state == SeriesState.ERROR, result.error
    # The attempt ends at a small multiple of the 2 images (plus LICENSE, md5hashes.csv and
    # a few annotations), long before the 10,000th file.
    assert "entries" in result.error and "2 images" in result.error, result.error
    limit = int(result.error.split("more than ")[1].split()[0])
    assert limit <= 100, result.error


def test_the_limits_hold_in_worker_processes(tmp_path, archive, hostile):
    honest, many, slow = archive.series
    padding = [(f"note{i:05d}.txt", b"x") for i in range(10_000)]
    hostile.series[many.series_uid] = Crafted(
        record(many), series_zip(files_of(many), unlisted=padding))
    hostile.series[slow.series_uid] = Crafted(
        record(slow), trickle(series_zip(files_of(slow)), every=0.1, step=110, head=110))
    manifest = cart(tmp_path, hostile, [honest.series_uid, many.series_uid,
                                        slow.series_uid], retries=0)
    engine = ready_engine(manifest, tmp_path / "dl", hostile, processes=1, timeout=1.0)
    report = engine.run()
    # The first series proves the endpoint in this process; the other two ran in a worker.
    assert engine.stats().worker_attempts == 2
    assert report.results[honest.series_uid].state == SeriesState.COMPLETE
    assert "more than" in report.results[many.series_uid].error
    assert "too slowly" in report.results[slow.series_uid].error


# --------------------------------------------------------------- 5. the progress floor


def feed(floor: ProgressFloor, clock: list[float], rate: float, seconds: float,
         *, step: float = 1.0) -> None:
    """``rate`` bytes a second for ``seconds``, one read every ``step`` seconds."""
    t = 0.0
    while t < seconds:
        clock[0] += step
        t += step
        floor.add(int(rate * step))


@pytest.mark.parametrize("window", [1.0, 60.0, 600.0, 3600.0])
def test_1100_bytes_a_second_never_passes_the_floor(window):
    clock = [0.0]
    floor = ProgressFloor(window, "series 1", clock=lambda: clock[0])
    with pytest.raises(NetworkError, match="too slowly"):
        feed(floor, clock, 1100, 10 * window, step=min(1.0, window / 4))


@pytest.mark.parametrize("window", [1.0, 60.0, 600.0])
def test_an_honest_link_never_meets_the_floor(window):
    clock = [0.0]
    # A real 80 Mbit/s link, read in 256 KiB pieces.
    fast = ProgressFloor(window, "series 1", clock=lambda: clock[0])
    feed(fast, clock, 10_000_000, 5 * window, step=(256 << 10) / 10_000_000)
    # A slow but honest server: it thinks for nearly the whole window before its first
    # byte (within the read timeout), then sends 50 KB/s with pauses under the timeout.
    slow = ProgressFloor(window, "series 1", clock=lambda: clock[0])
    clock[0] += window * 0.95
    for _ in range(5):
        feed(slow, clock, 50_000, window * 0.5)
        clock[0] += window * 0.9  # a pause (the read timeout would end a longer one)
        slow.add(100)


def test_1100_bytes_a_second_is_cut_over_http(tmp_path, archive, hostile):
    first = archive.series[0]
    body = series_zip(files_of(first))
    hostile.series = {first.series_uid: Crafted(
        record(first), trickle(body, every=0.1, step=110, head=110))}
    report = download(cart(tmp_path, hostile, [first.series_uid], retries=0),
                      tmp_path / "dl", **{**FAST, "timeout": 1.0})
    result = report.results[first.series_uid]
    assert result.state == SeriesState.ERROR and "too slowly" in result.error, result.error
    assert hostile.sent.get(first.series_uid, 0) < len(body)


def test_the_floor_is_stated_in_help():
    done = run_cli(["download", "--help"], timeout=60)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert f"{FLOOR_RATE // 1024} KiB/s" in text and FLOOR_RATE > 1100, text


# ------------------------------------------------------------------- 8. entry names


@pytest.mark.parametrize("name", ["00000001.dcm/", "00000001\\", "/", "", ".", "sub/.."])
def test_a_folder_entry_vouched_for_by_an_empty_name_is_never_an_image(tmp_path, archive,
                                                                        hostile, name):
    # A real image under a name that names a folder (or nothing); md5hashes.csv vouches
    # for it under that name's last part: "", "." or "..".
    first = archive.series[0]
    (_, one), two = files_of(first)
    body = series_zip([(name, one), two])
    hostile.series = {first.series_uid: Crafted(record(first), body)}
    report = download(cart(tmp_path, hostile, [first.series_uid], retries=0),
                      tmp_path / "dl", **FAST)
    result = report.results[first.series_uid]
    assert result.state == SeriesState.ERROR, "a folder entry was published as an image"
    assert "1 of 2 images" in result.error and "\n" not in result.error, result.error
    assert not [p for p in published(report.root) if p.suffix == ".dcm"]


def test_a_dcm_entry_that_is_not_dicom_is_never_an_image(tmp_path, archive, hostile):
    first = archive.series[0]
    files = files_of(first)
    page = b"<html><body>Internal error</body></html>"
    body = series_zip([*files, ("00000003.dcm", page)])
    hostile.series = {first.series_uid: Crafted(record(first), body)}
    report = download(cart(tmp_path, hostile, [first.series_uid], retries=0),
                      tmp_path / "dl", **FAST)
    result = report.results[first.series_uid]
    assert result.state == SeriesState.ERROR and "not a DICOM file" in result.error


def test_verify_flags_an_adopted_dcm_that_is_not_dicom(tmp_path, archive, hostile):
    first = archive.series[0]
    dest = tmp_path / "dl"
    report = download(cart(tmp_path, hostile, [first.series_uid]), dest, **FAST)
    assert report.ok, report.summary()
    root = report.root
    image = sorted((root / report.results[first.series_uid].relpath).glob("*.dcm"))[0]
    # A tree from another tool, without our journal, where one ".dcm" is an error page.
    shutil.rmtree(root / ".nbia")
    image.write_bytes(b"<html>Service Unavailable</html>")
    again = download(cart(tmp_path, hostile, [first.series_uid]), dest, **FAST)
    assert again.ok, again.summary()
    assert hostile.image_requests(first.series_uid) == 1, "the tree was not adopted"
    for quick in ([], ["--quick"]):  # the file was never hashed: --quick reads it too
        done = run_cli(["verify", str(root), *quick], timeout=60)
        assert done.returncode != 0, done.stdout + done.stderr
        assert f"not a DICOM file {again.results[first.series_uid].relpath}/{image.name}" \
            in done.stdout + done.stderr


def test_names_made_unique_stay_within_255_bytes(tmp_path, archive, hostile):
    first = archive.series[0]
    long = "x" * 300
    notes = [(f"a/{long}.xml", b"<a/>"), (f"b/{long}.xml", b"<a/>"), (f"c/{long}.xml", b"<a/>"),
             ("y" * 251 + ".dcm.", b"not an image"), ("é" * 200 + ".txt", b"t"),
             ("d/" + "é" * 200 + ".txt", b"t")]
    body = series_zip([*files_of(first), *notes])
    hostile.series = {first.series_uid: Crafted(record(first), body)}
    report = download(cart(tmp_path, hostile, [first.series_uid], retries=0),
                      tmp_path / "dl", **FAST)
    result = report.results[first.series_uid]
    assert result.state == SeriesState.COMPLETE, result.error
    names = [p.name for p in (report.root / result.relpath).iterdir()]
    assert len(names) == 2 + len(notes), names
    assert max(len(n.encode()) for n in names) <= 255
    assert not [n for n in names if n.endswith(".dcm") and not n[0].isdigit()], names


# ----------------------------------------- round 2 (review of items 4 and 5): the reserve


def figures(error: str) -> dict[str, float]:
    """The sizes a disk-space error states (MB): ``needs``, ``free`` and ``kept`` (the
    free space it keeps for other programs)."""
    import re

    found = {key: re.search(pattern, error) for key, pattern in (
        ("needs", r"needs ([\d,.]+) MB"), ("free", r"([\d,.]+) MB free"),
        ("kept", r"([\d,.]+) MB kept"))}
    assert found["free"] and found["kept"], error
    return {k: float(m[1].replace(",", "")) for k, m in found.items() if m}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("lie", ["all-but-64-MiB", "just-fits"])
def test_a_lying_file_size_never_fills_the_disk(tmp_path, archive, hostile, lie):
    # The metadata announces nearly all the free space (or just what fits beside the
    # reserve): the announced bytes must keep the reserve too, not only the extra ones.
    honest, bomb = archive.series[0], archive.series[1]
    with tmpfs(tmp_path / "mnt", "1200m") as mnt:
        free = shutil.disk_usage(mnt).free
        # The reserve on a disk with less than 2 GiB free: half of it.
        size = free - 64 * MiB if lie == "all-but-64-MiB" else free // 2 - 96 * MiB
        hostile.series[bomb.series_uid] = Crafted(record(bomb, size=size), endless_deflate())
        manifest = cart(tmp_path, hostile, [honest.series_uid, bomb.series_uid], retries=0)
        with LowestFree(mnt) as watch:
            report = ready_engine(manifest, mnt / "dl", hostile, processes=0).run()
    print(f"lowest free: {watch.lowest / MiB:.0f} MiB of {free / MiB:.0f}")
    assert watch.lowest >= free // 2 - MiB, \
        f"the bomb left only {watch.lowest / MiB:.0f} MiB of {free / MiB:.0f} free"
    result = report.results[bomb.series_uid]
    assert result.state == SeriesState.ERROR and "disk space" in result.error, result.error
    assert "\n" not in result.error
    said = figures(result.error)
    if lie == "all-but-64-MiB":  # refused before a byte is written, saying why
        assert watch.lowest >= free - 16 * MiB, result.error
        assert said["needs"] + said["kept"] > said["free"], result.error
    else:  # stopped on the way, at the line it states (a message that holds together)
        assert said["free"] < said["kept"], result.error
    assert not report.fatal, report.fatal
    assert report.results[honest.series_uid].state == SeriesState.COMPLETE


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("size", [None, "honest"], ids=["no-file-size", "file-size"])
def test_an_honest_series_completes_on_a_small_disk(tmp_path, archive, hostile, size):
    # 600 MiB free: less than the 1 GiB reserve, yet a 5 MB series fits with room to spare.
    first = archive.series[0]
    note = b"<a>" + b"x" * (5 * MiB) + b"</a>"
    body = series_zip([*files_of(first), ("notes.xml", note)])
    nbytes = None if size is None else first.nbytes + len(note)
    hostile.series = {first.series_uid: Crafted(record(first, size=nbytes), body)}
    manifest = cart(tmp_path, hostile, [first.series_uid], retries=0)
    with tmpfs(tmp_path / "mnt", "600m") as mnt:
        report = ready_engine(manifest, mnt / "dl", hostile, processes=0).run()
        result = report.results[first.series_uid]
        assert result.state == SeriesState.COMPLETE, result.error


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_bomb_without_file_size_keeps_half_of_a_small_disk(tmp_path, archive, hostile):
    honest, bomb = archive.series[0], archive.series[1]
    hostile.series[bomb.series_uid] = Crafted(record(bomb, size=None), endless_deflate())
    manifest = cart(tmp_path, hostile, [honest.series_uid, bomb.series_uid], retries=0)
    with tmpfs(tmp_path / "mnt", "600m") as mnt:
        free = shutil.disk_usage(mnt).free
        with LowestFree(mnt) as watch:
            report = ready_engine(manifest, mnt / "dl", hostile, processes=0).run()
    print(f"lowest free: {watch.lowest / MiB:.0f} MiB of {free / MiB:.0f}")
    assert watch.lowest >= free // 2 - MiB
    result = report.results[bomb.series_uid]
    assert result.state == SeriesState.ERROR and "disk space" in result.error, result.error
    said = figures(result.error)
    assert said["free"] < said["kept"], result.error
    assert report.results[honest.series_uid].state == SeriesState.COMPLETE


@pytest.mark.parametrize("count", [None, 0], ids=["no-image-count", "zero-images"])
@pytest.mark.parametrize("size", [None, "small"], ids=["no-file-size", "file-size"])
def test_a_series_without_an_image_count_never_creates_20000_files(tmp_path, archive, hostile,
                                                                    count, size):
    first = archive.series[0]
    padding = [(f"note{i:05d}.txt", b"x") for i in range(20_000)]
    hostile.series = {first.series_uid: Crafted(
        record(first, images=count, size=None if size is None else first.nbytes),
        series_zip(files_of(first), unlisted=padding))}
    report = download(cart(tmp_path, hostile, [first.series_uid], retries=0),
                      tmp_path / "dl", **FAST)
    result = report.results[first.series_uid]
    assert result.state == SeriesState.ERROR and "entries" in result.error, result.error
    limit = int(result.error.split("more than ")[1].split()[0])
    # A few thousand at most (real series without a count); none beyond the non-image
    # allowance when the metadata says there are no images.
    assert limit <= (100 if count == 0 or size else 10_000), result.error
    made = sum(1 for p in (tmp_path / "dl").rglob("*") if p.is_file())
    assert made <= limit + 10, made


# ------------------------------------------------ round 2: the floor and the engine's pause


class HeldServer(HostileServer):
    """Serves a body (:meth:`held`) in pieces and pauses the engine (``on_request``) in the
    middle of its first read (256 KiB), so the stream holds at the end of that read: all
    but the last 4 KiB of it at once, then a little more every fifth of a window (never a
    silence the read timeout would end; the pause comes with the first of these, once
    the reader is well inside the read), the rest of the read once more than a window
    has passed (so the floor's window starts again there, just before the hold), and
    the last KiB of the body once ``rest`` is set."""

    def __init__(self, window: float) -> None:
        super().__init__()
        self.window = window
        self.on_request: Callable[[], None] = lambda: None
        self.rest = threading.Event()

    def held(self, data: bytes) -> Callable[[], AsyncIterator[bytes]]:
        first, last = READ_SIZE - 4096, len(data) - 1024
        assert last > READ_SIZE

        async def body() -> AsyncIterator[bytes]:
            import asyncio

            loop = asyncio.get_running_loop()
            yield data[:first]
            began, sent = loop.time(), first
            for _ in range(6):  # six sleeps of a fifth: past the window by then
                await asyncio.sleep(self.window / 5)
                self.on_request()
                self.on_request = lambda: None  # once, on the first attempt
                if loop.time() - began >= 1.1 * self.window:
                    break
                yield data[sent:sent + 512]
                sent += 512
            yield data[sent:last]
            while not self.rest.is_set():
                await asyncio.sleep(0.01)
            yield data[last:]

        return body


def body_of_size(series, size: int) -> bytes:
    """The series zip with an incompressible annotation making it ``size`` bytes long."""
    import random

    note = size
    for _ in range(5):
        body = series_zip([*files_of(series),
                           ("notes.bin", random.Random(21).randbytes(note))])
        if len(body) == size:
            break
        note -= len(body) - size
    return body


@pytest.mark.parametrize("processes", [0, 1], ids=["in-process", "in-a-worker"])
def test_a_long_pause_is_not_the_servers_slowness(tmp_path, archive, processes):
    honest, held = archive.series[0], archive.series[1]
    window = 1.0
    body = body_of_size(held, READ_SIZE + 1536)
    with HeldServer(window) as server:
        server.series[honest.series_uid] = Crafted(record(honest),
                                                   series_zip(files_of(honest)))
        server.series[held.series_uid] = Crafted(record(held), server.held(body))
        manifest = cart(tmp_path, server, [honest.series_uid, held.series_uid], retries=0)
        engine = ready_engine(manifest, tmp_path / "dl", server, processes=processes,
                              timeout=window)
        server.on_request = engine.pause
        states: list[str] = []
        retries: list[str] = []
        engine.subscribe(lambda event: states.append(event.state)
                         if event.kind == "state" and event.uid == held.series_uid else None)
        engine.subscribe(lambda event: retries.append(event.message)
                         if event.kind == "retry" else None)
        engine.start()
        deadline = time.monotonic() + 60
        while SeriesState.PAUSED not in states:
            assert time.monotonic() < deadline, (states, engine.results[held.series_uid])
            engine.wait(0.01)
        # Held longer than the floor allows the bytes of the window it held in (at most
        # all those after the first piece), and than two windows: the stream was ours,
        # not the server's, while it waited.
        hold = max(2.5 * window, 1.5 * (len(body) - READ_SIZE + 4096) / FLOOR_RATE)
        held_since = time.monotonic()
        while time.monotonic() - held_since < hold:
            engine.wait(0.05)
        server.rest.set()
        engine.resume()
        report = engine.wait(60)
    assert engine.finished
    result = report.results[held.series_uid]
    assert result.state == SeriesState.COMPLETE, result.error
    assert retries == [] and result.attempts == 1 and states[-3:] == [
        SeriesState.PAUSED, SeriesState.DOWNLOADING, SeriesState.COMPLETE], states
    assert engine.stats().worker_attempts == processes
