"""Ctrl-C in the middle of a slide, then the same command again (issue 24, Deliver 2): the
second run asks for the rest with ``Range`` and the server sends only the rest.

The CLI runs as a real process against our PathDB server, paced so that the slide takes a
few seconds; the test waits for the part file in ``.nbia/files/`` to hold some bytes (a
condition, polled with a deadline: no sleep stands in for synchronisation), sends SIGINT,
and reads the server's request log.
"""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

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
