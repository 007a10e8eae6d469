"""Issue 26: full speed from the first second, and the first re-run as fast as the next.

* The run starts at the streams the floor opens (8) and says so first thing in --json
  (the limiter's own steps are driven window by window in test_scheduler.py).
* A server that thinks before each zip's first byte (``--faults first_byte=S``) keeps the
  streams waiting on it, not on the link: the limiter, told how many streams waited a
  whole window, climbs to the cap and holds there instead of judging the bursty bytes.
* The report rows (metadata.csv) are checked against the complete series without
  reading the file when the last run's mark (journal.rows_mark: a MAC over the file's
  inode, size, times and the set of complete series) says nothing changed; any change to
  the file, or a mark not ours, and the file is read and a lost row re-added.
* A download re-signs the journal rows of its series once their folders' stamps are old
  enough to be believed alone (engine.plan.Planner.settle): the first no-op re-run then
  counts no folder and rewrites no row. The one series the server stalls (3 s, a server
  fault) keeps the others' stamps that long before the run ends, whatever the machine's
  speed: nothing here waits on a clock of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from enginehelpers import write_manifest
from nbia_retriever import download
from nbia_retriever.engine import DownloadOptions, Engine
from nbia_retriever.engine.journal import RACY_SECONDS, ROWS_MARK, Journal
from nbia_retriever.engine.scheduler import INITIAL_STREAMS, ConcurrencyLimiter
from nbia_retriever.manifest import read_manifest
from nbia_retriever.server import FaultPlan

FAST = {"backoff_base": 0.01, "timeout": 20.0}
STALL = 3.0  # > RACY_SECONDS: the other series' folders age past the rule meanwhile


@pytest.fixture(scope="module")
def archive(archive_factory):
    return archive_factory(seed=26, collections=1, patients=2, studies=1, series=3,
                           images=2, rows=16, columns=16)


def journal_rows(root: Path) -> dict[str, tuple[float, int]]:
    """uid -> (checked, folder stamp) of every finished row, and whether trusted."""
    with Journal(root / ".nbia" / "journal.sqlite", readonly=True) as journal:
        index = journal.completed_index()
    assert all(r.trusted for r in index.values())
    return {uid: (r.checked, r.folder_mtime) for uid, r in index.items()}


def test_a_download_signs_its_rows_once_their_stamps_can_be_believed(tmp_path, archive,
                                                                     serve):
    uids = [s.series_uid for s in archive.series]
    late = uids[-1]
    server = serve(archive.root)
    server.set_faults(FaultPlan(script={late: [f"stall:{STALL:g}"]}, stall_seconds=STALL))
    manifest = write_manifest(tmp_path / "cart.tcia", uids, server.download_url)
    report = download(manifest, tmp_path / "dl", **FAST)
    assert report.ok, report.summary()
    rows = journal_rows(report.root)
    assert set(rows) == set(uids)
    for uid in uids[:-1]:  # done seconds before the stalled one: believed by stamp alone
        checked, stamp = rows[uid]
        assert checked - stamp / 1e9 > RACY_SECONDS, uid
    # The first re-run skips everything and rewrites none of those rows.
    again = download(manifest, tmp_path / "dl", **FAST)
    assert again.ok and again.skipped == len(uids)
    after = journal_rows(report.root)
    assert {u: after[u] for u in uids[:-1]} == {u: rows[u] for u in uids[:-1]}


def test_a_changed_folder_is_not_signed_at_the_end_of_the_run(tmp_path, archive, serve):
    """The end-of-run signing believes nothing a re-run would not: a folder that lost a
    file meanwhile is downloaded again by the next run."""
    uids = [s.series_uid for s in archive.series][:2]
    server = serve(archive.root)
    manifest = write_manifest(tmp_path / "cart.tcia", uids, server.download_url)
    first = download(manifest, tmp_path / "dl", **FAST)
    assert first.ok
    folder = next(p.parent for p in sorted(first.root.rglob("*.dcm")))
    next(folder.glob("*.dcm")).unlink()
    again = download(manifest, tmp_path / "dl", **FAST)
    assert again.ok and again.skipped == 1 and len(again.completed) == 2


def test_json_says_where_the_streams_start(tmp_path, archive, serve):
    uids = [s.series_uid for s in archive.series]
    server = serve(archive.root)
    manifest = write_manifest(tmp_path / "cart.tcia", uids, server.download_url)
    done = subprocess.run([sys.executable, "-m", "nbia_retriever.cli", "download",
                           str(manifest), "-d", str(tmp_path / "dl"), "--json"],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ})
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    streams = [e for e in events if e["event"] == "concurrency"]
    assert streams[0]["count"] == INITIAL_STREAMS == 8


# -- a server that builds each zip before its first byte --------------------------------
def think_time_link(limiter: ConcurrencyLimiter, windows: int, *,
                    tell_waiting: bool) -> list[int]:
    """0.25 s windows on a server with 1 s before each zip's first byte: each stream's
    zip arrives in one burst every fourth window, the three before it wait. Returns the
    limit after each window."""
    total, seen = 0, []
    limiter.sample(0, 0.0, waiting=0)
    for k in range(1, windows + 1):
        n = limiter.limit
        burst = k % 4 == 1
        total += n * 256 * 1024 if burst else 0
        waiting = n if (tell_waiting and not burst) else 0
        limiter.active = n  # every slot holds a stream
        limiter.sample(total, k * 0.25, waiting=waiting)
        seen.append(limiter.limit)
    return seen


def test_streams_waiting_on_the_server_raise_the_count_to_the_cap_and_hold() -> None:
    limiter = ConcurrencyLimiter(16, explore=True)
    seen = think_time_link(limiter, 40, tell_waiting=True)
    assert seen[0] == 16 and seen == [16] * 40


def test_without_the_waiting_count_the_bursts_would_step_back() -> None:
    """What the count is for: judged by its bursty bytes alone, the same server makes
    the limiter step back below the cap."""
    limiter = ConcurrencyLimiter(16, explore=True)
    seen = think_time_link(limiter, 40, tell_waiting=False)
    assert min(seen[1:]) < 16


def test_waiting_streams_climb_past_the_start_to_a_higher_cap() -> None:
    limiter = ConcurrencyLimiter(64, explore=True)
    seen = think_time_link(limiter, 12, tell_waiting=True)
    assert seen[-1] == 64 and seen == sorted(seen)


def test_the_first_byte_knob_delays_zips_not_metadata(serve, archive) -> None:
    """``first_byte`` holds each zip download (at least that long) and answers metadata
    at once: with a minute's think-time a metadata answer within the client's 20 s
    timeout shows it is not held."""
    plan = FaultPlan.parse("first_byte=0.4")
    assert plan.first_byte == 0.4 and plan.active and "first_byte=0.4s" in plan.describe()
    server = serve(archive.root)
    uid = archive.series[0].series_uid
    with httpx.Client(timeout=20.0) as http:
        server.set_faults(plan)
        started = time.perf_counter()
        got = http.get(f"{server.api_url}/v1/getImage", params={"SeriesInstanceUID": uid})
        assert got.status_code == 200 and got.content[:2] == b"PK"
        assert time.perf_counter() - started >= 0.4
        server.set_faults(FaultPlan(first_byte=60.0))
        meta = http.get(f"{server.api_url}/v1/getSeries", params={"SeriesInstanceUID": uid})
        assert meta.status_code == 200


# -- the report rows' mark ----------------------------------------------------------------
def rerun(manifest: Path, dest: Path, server) -> tuple[Engine, object]:
    engine = Engine(read_manifest(manifest), dest, DownloadOptions(api_url=server.api_url, **FAST))
    report = engine.run()
    assert report.ok, report.summary()
    return engine, report


def stored_mark(root: Path) -> str | None:
    with Journal(root / ".nbia" / "journal.sqlite", readonly=True) as journal:
        return journal.get_info(ROWS_MARK)


def test_a_no_op_rerun_does_not_read_metadata_csv_that_the_mark_vouches_for(
        tmp_path, archive, serve):
    uids = [s.series_uid for s in archive.series]
    server = serve(archive.root)
    manifest = write_manifest(tmp_path / "cart.tcia", uids, server.download_url)
    first = download(manifest, tmp_path / "dl", **FAST)
    assert first.ok
    mark = stored_mark(first.root)
    assert mark
    engine, report = rerun(manifest, tmp_path / "dl", server)
    assert report.skipped == len(uids)
    assert engine._publisher is not None and not engine._publisher.csv.loaded
    assert stored_mark(first.root) == mark  # nothing read, nothing to re-mark


def test_a_lost_row_is_re_added_whatever_the_mark(tmp_path, archive, serve):
    """A crash between the journal and metadata.csv (here: the row cut out) changes
    the file, so the mark no longer holds: the file is read and the row comes back."""
    uids = [s.series_uid for s in archive.series]
    server = serve(archive.root)
    manifest = write_manifest(tmp_path / "cart.tcia", uids, server.download_url)
    first = download(manifest, tmp_path / "dl", **FAST)
    csv_path = first.root / "metadata.csv"
    lines = csv_path.read_text(encoding="utf-8").splitlines(keepends=True)
    lost = next(line for line in lines if uids[0] in line)
    csv_path.write_text("".join(line for line in lines if line != lost), encoding="utf-8")
    engine, report = rerun(manifest, tmp_path / "dl", server)
    assert report.skipped == len(uids) and engine._publisher is not None
    assert engine._publisher.csv.loaded
    assert uids[0] in csv_path.read_text(encoding="utf-8")
    # ... and the re-run leaves a mark for the repaired file.
    engine, _ = rerun(manifest, tmp_path / "dl", server)
    assert engine._publisher is not None and not engine._publisher.csv.loaded


def test_a_mark_this_user_did_not_make_is_not_believed(tmp_path, archive, serve):
    uids = [s.series_uid for s in archive.series]
    server = serve(archive.root)
    manifest = write_manifest(tmp_path / "cart.tcia", uids, server.download_url)
    first = download(manifest, tmp_path / "dl", **FAST)
    with Journal(first.root / ".nbia" / "journal.sqlite") as journal:
        journal.set_info(ROWS_MARK, "0" * 32)  # planted
    engine, _ = rerun(manifest, tmp_path / "dl", server)
    assert engine._publisher is not None and engine._publisher.csv.loaded


# -- finished folders are reserved only when a batch is planned ---------------------------
def test_a_new_series_never_takes_a_finished_series_folder(tmp_path: Path) -> None:
    """The folders of finished series are reserved when the first batch is planned (a
    no-op re-run plans none and skips the work): a new series whose Java folder is a
    finished one's still gets a name of its own."""
    from nbia_retriever.engine.journal import FileRecord
    from nbia_retriever.engine.rows import folder_stamp
    from nbia_retriever.layout import series_relpath
    from nbia_retriever.manifest import Manifest
    from test_scale import BatchedSource, _info

    done, new = "1.2.826.0.1.2.77777", "1.2.826.0.1.9.77777"
    infos = {done: _info(done, "1"), new: _info(new, "1")}
    java = str(series_relpath(infos[done]))
    assert java == str(series_relpath(infos[new]))  # the clash is real
    root = tmp_path / "b"
    folder = root / java
    folder.mkdir(parents=True)
    (folder / "1-1.dcm").write_bytes(b"x" * 10)
    (root / ".nbia").mkdir()
    with Journal(root / ".nbia" / "journal.sqlite") as journal:
        journal.mark_complete(done, relpath=java, files=[FileRecord("1-1.dcm", 10, "")],
                              nbytes=10, attempts=1, info=infos[done],
                              folder_mtime=folder_stamp(folder.stat()))
    manifest = Manifest(series_uids=(done, new), headers={"databasketId": "b.tcia"},
                        source=None, duplicates_dropped=0)
    engine = Engine(manifest, tmp_path, DownloadOptions(),
                    source=BatchedSource({new: infos[new]}, [1], False))  # type: ignore[arg-type]
    engine.prepare()
    try:
        assert engine.folder_of(done) == java
        assert engine.folder_of(new) != java and engine.folder_of(new).endswith(new)
    finally:
        engine.close()
