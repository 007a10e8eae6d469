"""Crash safety: kill the CLI at any moment, re-run, and the download ends exactly right.

Researchers leave multi-day downloads running; machines reboot, jobs hit their wall
time, people press Ctrl-C. Whatever moment the process dies at, re-running the same
command must finish the job, and nothing the journal calls complete may be wrong.

Kills are triggered by *observed progress* (the k-th JSON event read from the CLI's
``--json`` stdout, k drawn from a seeded generator), never by sleeping, so each seed
lands at a reproducible point of the run's event sequence. The narrow windows that a
random kill rarely hits (between the publishing ``rename`` and the journal commit,
between the journal and ``metadata.csv``, while writing a LICENSE, while replacing a
folder left by an earlier crash) get a deterministic crash point each: a driver
process patches the engine's collaborators to ``os._exit`` exactly there.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from enginehelpers import expected_series, write_manifest
from nbia_retriever import download
from nbia_retriever.models import SeriesState
from nbia_retriever.server import FaultPlan, ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary
from nbia_retriever.verify import verify_root
from reliability_helpers import CLI, assert_root_clean, exit_signal, journal_complete, run_cli

ROOT_NAME = "manifest-1700000000000"
#: Per-stream bandwidth cap: a series of ~1.5 MiB takes ~0.15 s, so a kill triggered by
#: an event lands while other series are mid-stream.
BANDWIDTH = 10_000_000


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    # 8 series of 3 images of 512 KiB: each series crosses the 1 MiB progress step once.
    return archive_factory(seed=31, collections=2, patients=2, studies=1, series=2, images=3,
                           rows=512, columns=512, restricted=False)


@pytest.fixture(scope="module")
def expected(archive: ArchiveSummary) -> dict[str, dict[str, str]]:
    return expected_series(archive.root)


@pytest.fixture(scope="module")
def server(archive: ArchiveSummary,
           module_serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    return module_serve(archive.root, faults=FaultPlan(bandwidth=BANDWIDTH))


@pytest.fixture(scope="module")
def fast_server(archive: ArchiveSummary,
                module_serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    """Unthrottled: the deterministic crash points need no help landing mid-run."""
    return module_serve(archive.root)


@pytest.fixture()
def cart(tmp_path: Path, server: ReferenceServer, archive: ArchiveSummary) -> Path:
    return write_manifest(tmp_path / "cart.tcia", [s.series_uid for s in archive.series],
                          server.download_url)


@pytest.fixture()
def fast_cart(tmp_path: Path, fast_server: ReferenceServer, archive: ArchiveSummary) -> Path:
    return write_manifest(tmp_path / "fast.tcia", [s.series_uid for s in archive.series],
                          fast_server.download_url)


def download_args(cart: Path, dest: Path, *extra: str) -> list[str]:
    return ["download", str(cart), "-d", str(dest), "--backoff", "0.01", "--timeout", "10",
            "-w", "3", *extra]


def run_until(cart: Path, dest: Path, stop: int, kinds: tuple[str, ...],
              sig: signal.Signals) -> tuple[int, list[dict[str, object]], str]:
    """Run the CLI with --json; send ``sig`` after the ``stop``-th event of ``kinds``.

    Returns (exit code, events read, stderr). If the run ends first, no signal is sent.
    """
    proc = subprocess.Popen([*CLI, *download_args(cart, dest, "--json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(120, proc.kill)  # a hung child must not hang the suite
    guard.start()
    events: list[dict[str, object]] = []
    seen = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            events.append(event)
            if event["event"] in kinds:
                seen += 1
                if seen == stop:
                    proc.send_signal(sig)
                    if sig == signal.SIGKILL:
                        break
        proc.stdout.read()
        code = proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        guard.cancel()
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return code, events, stderr


def finish(cart: Path, dest: Path, archive: ArchiveSummary,
           expected: dict[str, dict[str, str]]) -> None:
    """Re-run to completion and check that the result is exactly right.

    The re-run is in-process (the same engine the CLI drives; a subprocess would only add
    a second of interpreter start-up per test on this small machine).
    """
    report = download(cart, dest, backoff_base=0.01, timeout=10.0, workers=3)
    assert report.ok, report.summary()
    root = dest / ROOT_NAME
    uids = [s.series_uid for s in archive.series]
    assert_root_clean(root, complete=uids, expected=expected)
    for collection in {s.collection for s in archive.series}:
        assert (root / collection / "LICENSE").is_file(), f"{collection}: LICENSE lost"
    checked = verify_root(root)
    assert checked.ok and checked.series == len(uids), checked.problems


# Seeds: (events that count, how many kills before the final run). The k of each kill is
# drawn from random.Random(seed) over the run's event count, so kills land anywhere from
# planning to the last series.
KILL_PLANS = [
    (1, ("state",), 2),
    (2, ("state",), 2),
    (3, ("progress",), 2),
    (4, ("progress", "state"), 3),
]


@pytest.mark.parametrize(("seed", "kinds", "kills"), KILL_PLANS,
                         ids=[f"seed{p[0]}-{'+'.join(p[1])}" for p in KILL_PLANS])
def test_sigkill_at_observed_progress_then_rerun(tmp_path, cart, archive, expected, seed,
                                                 kinds, kills):
    rng = random.Random(seed)
    dest = tmp_path / "dl"
    root = dest / ROOT_NAME
    # Roughly how many such events a whole run emits: 3 states and 1 progress per series.
    per_series = sum({"state": 3, "progress": 1}[k] for k in kinds)
    killed = 0
    for _ in range(kills):
        remaining = len(archive.series) - len(journal_complete(root)) if root.exists() \
            else len(archive.series)
        if remaining == 0:
            break
        stop = rng.randint(1, max(1, remaining * per_series))
        code, _, stderr = run_until(cart, dest, stop, kinds, signal.SIGKILL)
        assert "Traceback" not in stderr
        if code == -signal.SIGKILL:
            killed += 1
            # Whatever the journal calls complete at the moment of death is exactly right.
            assert_root_clean(root, expected=expected, settled=False)
        else:
            assert code == 0, f"exit {exit_signal(code)}: {stderr}"
    assert killed >= 1, "no kill landed before the run ended: the test proved nothing"
    finish(cart, dest, archive, expected)


@pytest.mark.parametrize("stop", [1, 3])
def test_sigint_stops_cleanly_with_130_and_resumes(tmp_path, cart, archive, expected, stop):
    dest = tmp_path / "dl"
    code, events, stderr = run_until(cart, dest, stop, ("progress",), signal.SIGINT)
    assert code == 130, f"exit {exit_signal(code)}: {stderr}"
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    summary = events[-1]
    assert summary["event"] == "summary" and summary["fatal"] == ""
    states = [e["state"] for e in events if e["event"] == "state"]
    assert SeriesState.CANCELLED in states
    root = dest / ROOT_NAME
    assert_root_clean(root, expected=expected)
    assert not any((root / ".nbia" / "staging").iterdir()), "a cancelled series left staging"
    finish(cart, dest, archive, expected)


def test_second_ctrl_c_still_exits_130_without_traceback(tmp_path, cart, archive, expected):
    dest = tmp_path / "dl"
    proc = subprocess.Popen([*CLI, *download_args(cart, dest, "--json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if json.loads(line)["event"] == "progress":
                proc.send_signal(signal.SIGINT)
                break
        proc.stderr.readline()  # "interrupted: stopping ...": the first one was handled
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, f"exit {exit_signal(proc.returncode)}: {stderr}"
    assert "Traceback" not in stderr
    finish(cart, dest, archive, expected)


# Deterministic crash points. The driver patches one public seam (a module function, a
# public method, os.rename) to os._exit(137) on its NBIA_CRASH_NTH-th use; everything
# else runs as the real CLI.
DRIVER = r"""
import os, shutil, sys
from pathlib import Path

point, nth = os.environ["NBIA_CRASH_AT"], int(os.environ["NBIA_CRASH_NTH"])
calls = [0]

def hit():
    calls[0] += 1
    if calls[0] == nth:
        sys.stdout.flush()
        os._exit(137)

from nbia_retriever import report
from nbia_retriever.engine import checks, journal, publish

def before(owner, name):
    original = getattr(owner, name)
    def patched(*args, **kwargs):
        hit()
        return original(*args, **kwargs)
    setattr(owner, name, patched)

if point == "journal":      # the series folder is published, the journal not yet told
    before(journal.Journal, "mark_complete")
elif point == "csv":        # the journal says complete, metadata.csv has no row yet
    before(report.MetadataCsv, "append_many")  # (append is append_many([row]))
elif point == "license":    # a collection's LICENSE is about to be written
    before(publish.Publisher, "write_license")
elif point == "license-tmp":  # the LICENSE's temporary file is written, not yet renamed
    real_rename = os.rename
    def rename(src, dst, *a, **k):
        if Path(dst).name == "LICENSE":
            hit()
        return real_rename(src, dst, *a, **k)
    os.rename = rename
elif point == "trash":      # an unjournaled folder was moved aside, the new one not yet in
    real_rename = os.rename
    def rename(src, dst, *a, **k):
        real_rename(src, dst, *a, **k)
        if str(dst).endswith(".old"):
            hit()
    os.rename = rename
elif point == "staged":     # every image of a series is staged, nothing published
    before(checks, "check_series")

from nbia_retriever.cli import main
main()
"""


def crash_run(cart: Path, dest: Path, point: str, nth: int) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [sys.executable, "-c", DRIVER, *download_args(cart, dest, "--quiet", "-w", "1")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "NBIA_CRASH_AT": point, "NBIA_CRASH_NTH": str(nth)},
    )


# (point, n): crash at the n-th use. LICENSE is written once per collection (2 here).
CRASH_POINTS = [("staged", 3), ("journal", 1), ("journal", 4), ("csv", 1), ("csv", 4),
                ("license", 2), ("license-tmp", 1)]


@pytest.mark.parametrize(("point", "nth"), CRASH_POINTS,
                         ids=[f"{p}-{n}" for p, n in CRASH_POINTS])
def test_crash_at_each_commit_step_then_rerun(tmp_path, fast_cart, archive, expected, point,
                                             nth):
    dest = tmp_path / "dl"
    crashed = crash_run(fast_cart, dest, point, nth)
    assert crashed.returncode == 137, crashed.stderr
    assert_root_clean(dest / ROOT_NAME, expected=expected, settled=False)
    finish(fast_cart, dest, archive, expected)


@pytest.mark.parametrize("point", ["license", "csv"])
def test_crash_on_a_collections_only_series_keeps_its_license(tmp_path, fast_server, archive,
                                                              expected, point):
    # The only series of its collection in the manifest: if it ends up journaled while
    # its LICENSE is not written, no re-run would ever write it.
    one = archive.series[0]
    cart = write_manifest(tmp_path / "one.tcia", [one.series_uid], fast_server.download_url)
    dest = tmp_path / "dl"
    assert crash_run(cart, dest, point, 1).returncode == 137
    done = run_cli(download_args(cart, dest, "--quiet"))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    root = dest / ROOT_NAME
    assert_root_clean(root, complete=[one.series_uid], expected=expected)
    assert (root / one.collection / "LICENSE").read_bytes().strip()


def test_crash_while_replacing_a_folder_left_by_a_crash(tmp_path, fast_cart, archive,
                                                        expected):
    # Run 1 dies after publishing a folder but before journaling it, and the folder then
    # loses a file (so it cannot be adopted as complete); run 2 must replace that folder
    # and dies half-way through the swap; run 3 must still end exactly right.
    dest = tmp_path / "dl"
    assert crash_run(fast_cart, dest, "journal", 2).returncode == 137
    journaled = {relpath for relpath, _ in journal_complete(dest / ROOT_NAME).values()}
    unjournaled = [p.parent for p in (dest / ROOT_NAME).rglob("*.dcm")
                   if ".nbia" not in p.parts and
                   str(p.parent.relative_to(dest / ROOT_NAME)) not in journaled]
    assert unjournaled, "run 1 left no unjournaled folder: the test proves nothing"
    sorted(unjournaled[0].glob("*.dcm"))[-1].unlink()
    assert crash_run(fast_cart, dest, "trash", 1).returncode == 137
    assert_root_clean(dest / ROOT_NAME, expected=expected, settled=False)
    finish(fast_cart, dest, archive, expected)
