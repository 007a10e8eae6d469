"""Issue 26: full speed from the first second, and the first re-run as fast as the next.

* The run starts at the streams the floor opens (8) and says so first thing in --json
  (the limiter's own steps are driven window by window in test_scheduler.py).
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
from pathlib import Path

import pytest

from enginehelpers import write_manifest
from nbia_retriever import download
from nbia_retriever.engine.journal import RACY_SECONDS, Journal
from nbia_retriever.engine.scheduler import INITIAL_STREAMS
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
