"""Ctrl-C in the middle of a slide, then the same command again (issue 24, Deliver 2): the
second run asks for the rest with ``Range`` and the server sends only the rest.

The CLI runs as a real process against our PathDB server, paced so that the slide takes a
few seconds; the test waits for the part file in ``.nbia/files/`` to hold some bytes (a
condition, polled with a deadline: no sleep stands in for synchronisation), sends SIGINT,
and reads the server's request log.
"""

from __future__ import annotations

import csv
import hashlib
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nbia_retriever.server.gen3 import Gen3Faults, Gen3Server
from reliability_helpers import CLI, run_cli

if TYPE_CHECKING:
    from gen3_fixtures import Gen3Archive


def slide_sheet(path: Path, server: Gen3Server, archive: Gen3Archive) -> Path:
    slide = archive.slides[0]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["collectionName", "subjectId", "imageUrl"])
        writer.writerow([slide.collection, slide.patient_id,
                         f"{server.pathdb_url}/system/files/{slide.url_path}"])
    return path


def part_bytes(root: Path) -> int:
    folder = root / ".nbia" / "files"
    return sum(p.stat().st_size for p in folder.glob("*.part")) if folder.is_dir() else 0


def test_ctrl_c_mid_slide_then_the_next_run_fetches_only_the_rest(
        tmp_path: Path, gen3_archive: Gen3Archive,
        gen3_serve: Callable[..., Gen3Server]) -> None:
    slide = gen3_archive.slides[0]
    # 192 KiB at 32 KiB/s: six seconds, time enough to be interrupted part-way.
    server = gen3_serve(faults=Gen3Faults.parse("rate=32KB"))
    sheet = slide_sheet(tmp_path / "slides.csv", server, gen3_archive)
    root = tmp_path / "out" / "slides"
    args = ["download", str(sheet), "-d", str(tmp_path / "out"), "--timeout", "30"]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while part_bytes(root) < 40_000:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no part file grew"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert not (root / slide.collection / slide.patient_id / slide.name).exists()
    kept = part_bytes(root)
    assert 0 < kept < slide.size, err

    server.set_faults(None)
    server.clear_requests()
    again = run_cli(args)
    assert again.returncode == 0, again.stdout + again.stderr
    got = root / slide.collection / slide.patient_id / slide.name
    assert got.read_bytes() == slide.path.read_bytes()
    gets = [r for r in server.requests if r.method == "GET" and r.origin == "pathdb"]
    # (the first run's cut request may be logged late, when the server notices the cut)
    ranged = [r for r in gets if r.range is not None]
    assert len(ranged) == 1 and ranged[0].range == f"bytes={kept}-", gets
    assert ranged[0].status == 206
    assert ranged[0].bytes_sent == slide.size - kept
    assert not [r for r in gets if r.range is None and r.bytes_sent >= slide.size], gets


def test_a_drs_series_zip_transfer_stops_at_the_engines_pause_point(
        tmp_path: Path, gen3_archive: Gen3Archive, gen3_server: Gen3Server,
        gen3_creds: Path) -> None:
    """A series zip is fetched before its first chunk reaches staging: the engine hands
    its pause/cancel point and its progress to the stream (``watch``), so a pause stops
    the transfer part-way (its part kept) and progress is seen while it runs; the next
    attempt asks only for the rest. (Before, the transfer ran to its end unwatched.)"""
    from nbia_retriever.files.gen3 import Gen3Credentials
    from nbia_retriever.files.source import FileSource, SpooledZip
    from nbia_retriever.models import FileItem

    obj = gen3_archive.zips[0]
    host = gen3_server.url.split("://", 1)[1]
    item = FileItem("drs", f"drs://{host}/{obj.object_id}", obj.name.removesuffix(".zip"),
                    obj.name, collection=obj.collection, patient_id=obj.patient_id,
                    size=obj.size, md5=obj.md5)
    source = FileSource([item], creds=Gen3Credentials.load(gen3_creds),
                        endpoint=gen3_server.url, policy=None, timeout=30)
    source.bind_run(tmp_path / "root" / ".nbia" / "pieces", None)
    gen3_server.set_faults(Gen3Faults.parse("drop_after=100000"))  # a first part on disk

    class Paused(Exception):
        pass

    seen: list[int] = []

    def pause_once_some_bytes_are_in() -> None:
        if seen and seen[-1] > 0:
            raise Paused

    try:
        with source.open(FileSource.info(item)) as stream:
            assert isinstance(stream, SpooledZip)
            stream.watch(pause_once_some_bytes_are_in, seen.append)
            with pytest.raises(Paused):
                for _ in stream.chunks():
                    pass
        assert seen and 0 < seen[-1] < obj.size
        with source.open(FileSource.info(item)) as stream:
            data = b"".join(stream.chunks())
        assert hashlib.md5(data).hexdigest() == obj.md5
    finally:
        source.close()
    ranged = [r for r in gen3_server.requests if r.origin == "files" and r.range]
    assert ranged and int(ranged[-1].range[6:-1]) > 0, gen3_server.requests
