"""End-to-end tests of the download engine over real HTTP against the reference server.

Every test compares what the client wrote with what the archive holds, byte for byte,
and checks names and folders against the rules, because a downloader that finishes
without error but loses or misnames files is the failure users suffer most from.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from enginehelpers import downloaded_series, expected_series, series_folders, write_manifest
from nbia_retriever import AuthError, download, make_engine
from nbia_retriever.engine import shard_of
from nbia_retriever.engine.journal import Journal
from nbia_retriever.models import SeriesState
from nbia_retriever.report import METADATA_HEADER
from nbia_retriever.server import FaultPlan

FAST = {"backoff_base": 0.01, "timeout": 5.0}


@pytest.fixture(scope="module")
def archive(archive_factory):
    return archive_factory(seed=11, collections=2, patients=1, studies=1, series=2,
                           images=5, rows=32, columns=32)


@pytest.fixture(scope="module")
def expected(archive) -> dict[str, dict[str, str]]:
    return expected_series(archive.root)


@pytest.fixture()
def public_uids(archive) -> list[str]:
    return [s.series_uid for s in archive.series if not s.restricted]


@pytest.fixture()
def server(archive, serve):
    return serve(archive.root)


def manifest_for(tmp_path: Path, server, uids, **kw) -> Path:
    return write_manifest(tmp_path / "cart.tcia", list(uids), server.download_url, **kw)


def assert_identical(root: Path, expected: dict[str, dict[str, str]], uids) -> None:
    got = downloaded_series(root)
    assert set(got) == set(uids)
    for uid in uids:
        assert got[uid] == expected[uid], f"series {uid} differs from the archive"


def test_clean_download_is_byte_identical_named_and_placed(tmp_path, server, public_uids,
                                                           expected, archive):
    report = download(manifest_for(tmp_path, server, public_uids), tmp_path / "dl", **FAST)
    assert report.ok, report.summary()
    root = tmp_path / "dl" / "manifest-1700000000000"
    assert report.root == root
    assert_identical(root, expected, public_uids)
    # Folder layout: Collection/Patient/Study/Series, descriptive names from the rules.
    from nbia_retriever.layout import series_relpath

    for uid, folder in series_folders(root).items():
        info = report.results[uid].info
        assert folder.relative_to(root).as_posix() == series_relpath(info).as_posix()
        assert len(folder.relative_to(root).parts) == 4
        # no staging leftovers, no stray files: only the named images
        assert all(p.suffix == ".dcm" for p in folder.iterdir())
    # metadata.csv: the Java header, one row per series, File Location relative.
    rows = list(csv.reader((root / "metadata.csv").open(encoding="utf-8")))
    assert tuple(rows[0]) == METADATA_HEADER
    assert sorted(r[0] for r in rows[1:]) == sorted(public_uids)
    for r in rows[1:]:
        assert r[15].startswith("./") and (root / r[15]).is_dir()
        assert int(r[13]) == len(expected[r[0]])
    # LICENSE per collection
    collections = {s.collection for s in archive.series if not s.restricted}
    for collection in collections:
        assert (root / collection / "LICENSE").read_text(encoding="utf-8").strip()
    assert len(list(root.glob("*/LICENSE"))) == len(collections)
    assert not any((root / ".nbia" / "staging").iterdir())


def test_rerun_is_a_noop_and_adds_no_rows(tmp_path, server, public_uids):
    manifest = manifest_for(tmp_path, server, public_uids)
    first = download(manifest, tmp_path / "dl", **FAST)
    assert first.ok
    image_requests = sum(1 for r in server.requests if "getImage" in r.path)
    second = download(manifest, tmp_path / "dl", **FAST)
    assert second.ok and second.skipped == len(public_uids)
    assert sum(1 for r in server.requests if "getImage" in r.path) == image_requests
    rows = (first.root / "metadata.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + len(public_uids)


@pytest.mark.parametrize("fault", ["reset", "short", "corrupt", "http500", "http503",
                                   "http429", "stall"])
@pytest.mark.parametrize("api", ["v1", "v4"])
def test_each_fault_is_survived(tmp_path, server, public_uids, expected, fault, api):
    uid = public_uids[0]
    server.set_faults(FaultPlan(script={uid: [fault, fault]}, stall_seconds=30))
    report = download(manifest_for(tmp_path, server, public_uids), tmp_path / "dl", api=api,
                      **{**FAST, "timeout": 1.0})
    assert report.ok, report.summary()
    assert report.results[uid].attempts == 3
    assert_identical(report.root, expected, public_uids)


def test_past_the_budget_fails_cleanly_then_only_failed_finishes(tmp_path, server,
                                                                 public_uids, expected):
    uid = public_uids[0]
    server.set_faults(FaultPlan(script={uid: ["short"] * 3}))
    manifest = manifest_for(tmp_path, server, public_uids, retries=2)
    report = download(manifest, tmp_path / "dl", **FAST)
    assert not report.ok
    failed = report.results[uid]
    assert failed.state == SeriesState.ERROR and failed.attempts == 3
    assert "short zip" in failed.error
    assert uid not in downloaded_series(report.root), "a failed series was published"
    assert not any((report.root / ".nbia" / "staging").iterdir())
    with Journal(report.root / ".nbia" / "journal.sqlite") as journal:
        assert journal.get(uid).state == SeriesState.ERROR
    server.set_faults(None)
    before = sum(1 for r in server.requests if "getImage" in r.path)
    again = download(manifest, tmp_path / "dl", only_failed=True, **FAST)
    assert again.ok and list(again.results) == [uid]
    assert sum(1 for r in server.requests if "getImage" in r.path) == before + 1
    assert_identical(report.root, expected, public_uids)


def test_restricted_series_need_a_login(tmp_path, server, archive, expected):
    restricted = [s.series_uid for s in archive.series if s.restricted]
    assert restricted
    manifest = manifest_for(tmp_path, server, restricted)
    anonymous = download(manifest, tmp_path / "anon", **FAST)
    assert {r.state for r in anonymous.results.values()} == {SeriesState.NOT_AUTHORIZED}
    user, password = next(iter(archive.users.items()))
    if user != "alice":
        user, password = "alice", archive.users["alice"]
    report = download(manifest, tmp_path / "dl", user=user, password=password,
                      api_url=server.api_url, **FAST)
    assert report.ok, report.summary()
    assert_identical(report.root, expected, restricted)
    # The token expires mid-run: the engine refreshes and carries on.
    server.advance_clock(10_000)
    again = download(manifest, tmp_path / "dl2", user=user, password=password,
                     api_url=server.api_url, **FAST)
    assert again.ok, again.summary()


def test_wrong_password_is_an_auth_failure(tmp_path, server, archive):
    restricted = [s.series_uid for s in archive.series if s.restricted]
    manifest = manifest_for(tmp_path, server, restricted)
    with pytest.raises(AuthError) as raised:
        download(manifest, tmp_path / "dl", user="alice", password="wrong",
                 api_url=server.api_url, **FAST)
    report = raised.value.report  # type: ignore[attr-defined]
    assert report.auth_failed and "alice" in report.fatal and "wrong" not in report.fatal
    assert "wrong" not in str(raised.value)


def test_cancel_ends_a_read_stalled_on_a_silent_server(tmp_path, archive, serve):
    """Every zip goes silent for ten minutes (longer than the run's --timeout): cancel
    must not wait for either. SLURM's SIGINT before the time limit depends on it."""
    import time

    server = serve(archive.root, faults=FaultPlan(stall=1.0, stall_seconds=600))
    public = [s.series_uid for s in archive.series if not s.restricted]
    engine = make_engine(manifest_for(tmp_path, server, public), tmp_path / "dl",
                         api_url=server.api_url, timeout=600, workers=2, retries=0)
    engine.start()
    deadline = time.monotonic() + 60
    while not any("getImage" in p for p in server.in_flight()):
        assert time.monotonic() < deadline, "no zip was requested"
        engine.wait(0.05)
    engine.cancel()
    report = engine.wait(60)
    assert engine.finished, "cancel waited for the stalled read"
    assert report.cancelled and not report.failed
    assert not any((tmp_path / "dl").rglob("*.dcm"))


def test_overall_progress_never_goes_back_when_a_retry_discards_bytes(
        tmp_path, archive_factory, serve):
    """A 4 MB series whose first zip ends cleanly after 4 of its 8 images (the real
    server's silent failure; no reset, so no race for how much arrived): the attempt's
    2 MB are thrown away. Bytes done drop back (honestly: they are gone), the progress
    figure a bar is drawn from does not."""
    from nbia_retriever.engine import EventKind

    big = archive_factory(seed=17, collections=1, patients=1, studies=1, series=1,
                          images=8, rows=512, columns=512, awkward=False, restricted=False)
    uid = big.series[0].series_uid
    server = serve(big.root, faults=FaultPlan(script={uid: ["short:4"]}))
    engine = make_engine(manifest_for(tmp_path, server, [uid]), tmp_path / "dl",
                         api_url=server.api_url, workers=1, **FAST)
    seen: list[tuple[str, int, int]] = []

    def note(event):
        if event.kind in (EventKind.PROGRESS, EventKind.RETRY):
            stats = engine.stats()
            seen.append((str(event.kind), stats.bytes_done, stats.progress_bytes))

    engine.subscribe(note)
    report = engine.run()
    assert report.ok, report.summary()
    retry = next(i for i, (kind, _, _) in enumerate(seen) if kind == "retry")
    before = max(done for _, done, _ in seen[:retry + 1])  # the failed attempt's bytes
    after = min(done for _, done, _ in seen[retry + 1:])
    assert 0 < after < before  # the discard is real (the second attempt starts over) ...
    bars = [bar for _, _, bar in seen]
    assert bars == sorted(bars) and min(bars[retry:]) >= before  # ... the bar hides it


def test_pause_holds_and_resume_finishes(tmp_path, archive_factory, serve):
    # Bigger images and a bandwidth cap make each series take many chunks, so the pause
    # lands mid-series (the worker must hold at its next chunk, not finish the series).
    archive = archive_factory(seed=5, collections=1, patients=1, series=2, images=4,
                              rows=256, columns=256, restricted=False)
    expected = expected_series(archive.root)
    public_uids = [s.series_uid for s in archive.series]
    srv = serve(archive.root, faults=FaultPlan(bandwidth=400_000))
    engine = make_engine(manifest_for(tmp_path, srv, public_uids), tmp_path / "dl",
                         workers=2, **FAST)
    paused = threading.Event()

    def on_event(event) -> None:
        if event.kind == "state" and event.state == SeriesState.DOWNLOADING \
                and not engine.paused and not paused.is_set():
            engine.pause()
        if event.kind == "state" and event.state == SeriesState.PAUSED:
            paused.set()

    engine.subscribe(on_event)
    engine.start()
    assert paused.wait(60), "no series reported Paused"
    assert engine.paused and not engine.finished
    started = {u for u, r in engine.results.items()
               if r.state not in (SeriesState.QUEUED, SeriesState.NOT_STARTED)}
    assert len(started) <= 2
    engine.resume()
    report = engine.wait(120)
    assert report.ok, report.summary()
    assert_identical(report.root, expected, public_uids)


def test_shards_partition_the_manifest(public_uids):
    parts = {k: {u for u in public_uids if shard_of(u, 3) == k} for k in (1, 2, 3)}
    assert set().union(*parts.values()) == set(public_uids)
    assert sum(len(p) for p in parts.values()) == len(public_uids)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbia_retriever.cli", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=240)


def test_cli_json_events_exit_codes_and_error_report(tmp_path, server, public_uids):
    uid = public_uids[0]
    server.set_faults(FaultPlan(script={uid: ["http500"] * 2}))
    manifest = manifest_for(tmp_path, server, public_uids, retries=1)
    errors = tmp_path / "errors.csv"
    done = run_cli("download", str(manifest), "-d", str(tmp_path / "dl"), "--json",
                   "--backoff", "0.01", "--error-report", str(errors))
    assert done.returncode == 1, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1]["event"] == "summary" and events[-1]["failed"] == 1
    assert any(e["event"] == "retry" and e["uid"] == uid for e in events)
    streams = [e for e in events if e["event"] == "concurrency"]
    assert streams and all(1 <= e["count"] <= 16 for e in streams)  # the current number
    assert all(isinstance(e["time"], float) for e in events[:-1])
    rows = list(csv.DictReader(errors.open(encoding="utf-8")))
    assert [r["Series Instance UID"] for r in rows] == [uid]
    assert "500" in rows[0]["Error"]
    server.set_faults(None)
    again = run_cli("download", str(manifest), "-d", str(tmp_path / "dl"), "--quiet",
                    "--only-failed")
    assert again.returncode == 0, again.stderr
    listing = run_cli("list", str(manifest))
    # Piped, list is TSV (issue 25): a header line on stdout, the totals on stderr.
    assert listing.returncode == 0 and listing.stdout.startswith("Collection\t")
    assert "series" in listing.stderr
    verify = run_cli("verify", str(tmp_path / "dl" / "manifest-1700000000000"))
    assert verify.returncode == 0 and "OK" in verify.stdout


def test_cli_bad_manifest_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.tcia"
    bad.write_text("ListOfSeriesToDownload=\n1.2.3\nnot-a-uid\n", encoding="utf-8")
    done = run_cli("download", str(bad), "-d", str(tmp_path / "dl"))
    assert done.returncode == 2
    assert "bad.tcia:3" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_verify_detects_alteration(tmp_path, server, public_uids):
    report = download(manifest_for(tmp_path, server, public_uids), tmp_path / "dl", **FAST)
    assert report.ok
    victim = next(report.root.rglob("*.dcm"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    done = run_cli("verify", str(report.root))
    assert done.returncode == 1 and "altered file (MD5)" in done.stdout


def test_limiter_halves_on_throttle_and_recovers_additively():
    from nbia_retriever.engine import ConcurrencyLimiter

    limiter = ConcurrencyLimiter(8)
    assert limiter.throttled() == 4
    assert limiter.throttled() is None, "a burst of 429s in flight must count once"
    for _ in range(4):
        limiter.succeeded()
    assert limiter.limit == 5
    assert limiter.throttled() is None, "too soon after the last decrease"
    limiter.succeeded()
    assert limiter.throttled() == 2
    grown = [limiter.succeeded() for _ in range(2 + 3 + 4 + 5 + 6 + 7)]
    assert [g for g in grown if g] == [3, 4, 5, 6, 7, 8]
    assert limiter.limit == 8 and limiter.succeeded() is None
    fixed = ConcurrencyLimiter(4, adaptive=False)
    assert fixed.throttled() is None and fixed.limit == 4


def test_server_busy_lowers_concurrency_and_still_finishes(tmp_path, server, public_uids,
                                                           expected):
    server.set_faults(FaultPlan(script={uid: ["http429:0", "http503:0"] for uid in public_uids}))
    engine = make_engine(manifest_for(tmp_path, server, public_uids), tmp_path / "dl",
                         workers=4, **FAST)
    throttles: list[str] = []
    engine.subscribe(lambda e: throttles.append(e.message) if e.kind == "throttle" else None)
    report = engine.run()
    assert report.ok, report.summary()
    assert any("down to 2" in m for m in throttles), throttles
    assert engine.limiter.limit < 4
    assert_identical(report.root, expected, public_uids)


def test_naming_reads_headers_longer_than_the_in_memory_prefix(tmp_path):
    """More than 64 KiB of header before InstanceNumber must still be read, not taken
    as "absent" (which would silently order files by SOP UID)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from nbia_retriever.engine import HEADER_BYTES, read_tags

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.add_new(0x00190010, "LO", "BIG PRIVATE")
    ds.add_new(0x00191001, "OB", b"\0" * (HEADER_BYTES + 1000))
    ds.AcquisitionNumber = 3
    ds.InstanceNumber = 7
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    key = read_tags("00000001.dcm", data[:HEADER_BYTES], path, len(data))
    assert key is not None
    assert (key.acquisition, key.instance) == ("3", "7")
    assert key.sop_instance_uid == ds.SOPInstanceUID


def test_only_failed_also_takes_series_a_crash_left_behind(tmp_path, server, public_uids):
    manifest = manifest_for(tmp_path, server, public_uids)
    first = download(manifest, tmp_path / "dl", **FAST)
    assert first.ok
    victim = public_uids[-1]
    with Journal(first.root / ".nbia" / "journal.sqlite") as journal:
        journal.set_state(victim, SeriesState.DOWNLOADING)  # as a SIGKILL leaves it
    again = download(manifest, tmp_path / "dl", only_failed=True, **FAST)
    assert list(again.results) == [victim] and again.ok


def test_resume_redownloads_a_series_whose_files_were_deleted(tmp_path, server, public_uids,
                                                              expected):
    manifest = manifest_for(tmp_path, server, public_uids)
    first = download(manifest, tmp_path / "dl", **FAST)
    folder = first.root / first.results[public_uids[0]].relpath
    for f in folder.iterdir():
        f.unlink()
    again = download(manifest, tmp_path / "dl", **FAST)
    assert again.ok and again.skipped == len(public_uids) - 1
    assert_identical(first.root, expected, public_uids)


def test_journal_rows_written_in_the_background_meet_other_writes(tmp_path: Path) -> None:
    """ensure(wait=False) writes while the run goes on; whatever the interleaving, a row
    another write made first is left alone, and wait() (or close()) sees them all."""
    from nbia_retriever.engine.journal import _ENSURE_BLOCK
    from nbia_retriever.errors import JournalError

    uids = [f"1.2.{i}" for i in range(2 * _ENSURE_BLOCK + 5)]
    journal = Journal(tmp_path / "j.db")
    journal.ensure(uids, SeriesState.NOT_STARTED, wait=False)
    journal.set_state(uids[-1], SeriesState.ERROR, error="boom")
    journal.wait()
    states = journal.states()
    assert len(states) == len(uids) and states[uids[-1]] == SeriesState.ERROR
    assert set(states.values()) == {SeriesState.NOT_STARTED, SeriesState.ERROR}
    journal.ensure(["9.9"], SeriesState.NOT_STARTED, wait=False)
    journal.close()  # waits for them
    with Journal(tmp_path / "j.db", readonly=True) as again:
        assert again.states()["9.9"] == SeriesState.NOT_STARTED
        again.ensure(["9.8"], SeriesState.NOT_STARTED, wait=False)  # read-only: fails
        with pytest.raises(JournalError):
            again.wait()


def test_what_fails_writing_rows_in_the_background_is_raised(tmp_path: Path) -> None:
    """Nothing a background write meets is lost: wait() raises it, and planning ends with
    it (the run stops, as a failed journal write always stopped it)."""
    import gc

    from nbia_retriever.api import MetadataBatch
    from nbia_retriever.engine.plan import Planner, bulk
    from nbia_retriever.errors import JournalError
    from nbia_retriever.layout import Layout
    from nbia_retriever.ondisk import DownloadRoot

    journal = Journal(tmp_path / "j.db")
    journal.ensure([1, 2], SeriesState.NOT_STARTED, wait=False)  # type: ignore[list-item]
    with pytest.raises(JournalError):
        journal.wait()
    journal.close()

    class NoMetadata:
        def metadata_batches(self, uids):
            yield MetadataBatch(list(uids))

        def unavailable(self, uid):
            return SeriesState.NO_DATA, "none"

    planner = Planner(DownloadRoot(tmp_path / "root"), tmp_path / "j.db", Layout.DESCRIPTIVE)
    planner.journal = Journal(tmp_path / "j.db", readonly=True)
    planner.journal.ensure(["1.2.3"], SeriesState.NOT_STARTED, wait=False)
    with pytest.raises(JournalError):
        list(planner.batches(NoMetadata(), ["1.2.3"]))  # type: ignore[arg-type]
    planner.close()

    gc.freeze()  # the host application's own frozen objects stay frozen
    frozen = gc.get_freeze_count()
    with bulk():
        pass
    assert gc.get_freeze_count() == frozen
    gc.unfreeze()
