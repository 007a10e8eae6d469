"""Honest, actionable endings (issue 25, item 4).

What a person reads when a run does not simply succeed: an interrupted run (a real
SIGINT to a real ``nbia-retriever download`` process, sent once the output shows bytes
of a series arriving), failed series, a server that cannot be reached, ``--only-failed``
with nothing to retry, ``collections --counts`` with unanswered counts, and old journals
whose rows still say "Cancelled". Everything runs against the reference server (or a
port nobody listens on) on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from enginehelpers import write_manifest
from nbia_retriever.errors import EXIT_UNREACHABLE, ServerUnreachableError, exit_code
from nbia_retriever.models import SeriesState
from nbia_retriever.server import FaultPlan, ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary, SynthSeries
from test_cli_people import QuirkyServer, cli

BASKET = "manifest-1700000000000.tcia"
ROOT_NAME = "manifest-1700000000000"


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    return archive_factory(collections=3)


@pytest.fixture(scope="module")
def public(archive: ArchiveSummary) -> list[SynthSeries]:
    return [s for s in archive.series if not s.restricted]


@pytest.fixture
def srv(archive: ArchiveSummary, serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    return serve(archive.root)


def free_port() -> int:
    with socket.socket() as sock:  # a port nobody listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def popen(*args: str | Path, cwd: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NBIA_PASSWORD")}
    return subprocess.Popen([sys.executable, "-m", "nbia_retriever.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", env=env, cwd=cwd, stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------ interrupted (SIGINT)


@pytest.fixture(scope="module")
def big(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    """Four series of about 1.6 MB: bytes of one arrive (256 KiB a read) long before
    it is whole when the server sends 200 KB/s."""
    return archive_factory(collections=1, patients=1, series=4, images=4,
                           image_bytes=400_000, awkward=False, restricted=False)


def test_sigint_says_complete_interrupted_partial_bytes_and_the_resume_command(
        big, serve, tmp_path):
    """Before: "2 of 4 series complete; ... / 2 series Cancelled", and "re-run the same
    command to resume". After: how many are complete, how many were interrupted, the
    bytes of partial series fetched again, and the exact command that resumes."""
    srv = serve(big.root)
    uids = [s.series_uid for s in big.series]
    write_manifest(tmp_path / "half.tcia", uids[:2], srv.download_url)
    write_manifest(tmp_path / "m.tcia", uids, srv.download_url)
    assert cli("download", "-d", "out dir", "half.tcia", cwd=tmp_path).returncode == 0
    srv.set_faults(FaultPlan(bandwidth=200_000))
    args = ("download", "--json", "-d", "out dir", "m.tcia")
    proc = popen(*args, cwd=tmp_path)
    assert proc.stdout is not None
    partial = 0
    for line in proc.stdout:  # until bytes of a series still on its way have arrived
        event = json.loads(line)
        if event["event"] == "progress" and event["uid"] in uids[2:]:
            partial = max(partial, event["bytes"])
            if partial:
                break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    summary = json.loads(out.splitlines()[-1])
    assert summary["event"] == "summary"
    assert (summary["complete"], summary["interrupted"]) == (2, 2)
    assert summary["interrupted_bytes"] > 0 < partial  # bytes off the wire (compressed)
    resume = "nbia-retriever download --json -d 'out dir' m.tcia"
    assert summary["next"] == [f"resume: {resume}"]
    text = err.splitlines()
    assert text[0] == "interrupted: stopping (re-run the same command to resume)"
    assert text[1].startswith("2 of 4 series complete (2 already done); "), text
    assert re.fullmatch(r"2 series interrupted; [\d,.]+ (KB|MB) of partial series will "
                        r"be fetched again", text[2]), text
    assert text[-1] == f"resume: {resume}"
    assert "Cancelled" not in out + err
    # The journal says "Interrupted" too, and the resume command does resume.
    root = tmp_path / "out dir" / ROOT_NAME
    with sqlite3.connect(root / ".nbia" / "journal.sqlite") as db:
        assert {state for (state,) in db.execute(
            "SELECT state FROM series WHERE uid IN (?, ?)", uids[2:])} == {"Interrupted"}
    srv.set_faults(None)
    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["complete"] == len(uids)


def test_old_journal_rows_that_say_cancelled_read_as_interrupted_and_resume(
        srv, public, tmp_path):
    """Journals written before the rename keep working: "Cancelled" rows are series to
    do again, shown as Interrupted, never as an unknown state."""
    from nbia_retriever.engine.journal import Journal

    uids = [s.series_uid for s in public]
    manifest = write_manifest(tmp_path / "m.tcia", uids, srv.download_url)
    root = tmp_path / "out" / ROOT_NAME
    (root / ".nbia").mkdir(parents=True)
    with sqlite3.connect(root / ".nbia" / "journal.sqlite") as db:  # the old schema
        db.execute("CREATE TABLE series (uid TEXT PRIMARY KEY, state TEXT NOT NULL, "
                   "attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL "
                   "DEFAULT '', relpath TEXT NOT NULL DEFAULT '', metadata TEXT NOT NULL "
                   "DEFAULT '', files TEXT NOT NULL DEFAULT '', bytes INTEGER NOT NULL "
                   "DEFAULT 0, updated REAL NOT NULL DEFAULT 0, completed REAL NOT NULL "
                   "DEFAULT 0) WITHOUT ROWID")
        db.executemany("INSERT INTO series (uid, state, last_error) VALUES (?, ?, ?)",
                       [(uid, "Cancelled", "cancelled") for uid in uids])
    with Journal(root / ".nbia" / "journal.sqlite", readonly=True) as journal:
        assert {e.state for e in journal.entries()} == {SeriesState.INTERRUPTED}
        assert set(journal.states().values()) == {"Interrupted"}
        assert journal.runs() == []  # no run record in a journal this old
    assert SeriesState("Cancelled") is SeriesState.INTERRUPTED
    done = cli("download", "--only-failed", "-d", tmp_path / "out", manifest)
    assert done.returncode == 0, done.stderr
    assert f"{len(uids)} of {len(uids)} series complete" in done.stdout


# ------------------------------------------------------------------ failed series


def test_each_failed_series_is_one_line_naming_it_once_then_one_next_step(
        srv, public, tmp_path):
    """Before: "Error          UID: series UID: HTTP 500 (an HTML page) (after 2
    attempts)" and no next step. After: the UID once, the reason, the attempts, and
    one line with the command that retries only the failed series."""
    broken = public[0].series_uid
    unknown = "1.2.826.0.1.3680043.8.498.424242"
    write_manifest(tmp_path / "m.tcia", [broken, unknown, *(s.series_uid for s in public[1:])],
                   srv.download_url)
    srv.set_faults(FaultPlan(script={broken: ["http500"] * 5}))
    done = cli("download", "--retries", "1", "--backoff", "0", "-d", "out", "m.tcia",
               cwd=tmp_path)
    assert done.returncode == 1
    err = done.stderr.splitlines()
    failures = [line for line in err if line.startswith(("Error ", "Not Authorized "))]
    assert failures == [
        f"Not Authorized {unknown}: not public or unknown (it may belong to a "
        "limited-access collection: log in)",
        f"Error          {broken}: HTTP 500 (an HTML page) (2 attempts)",
    ] or sorted(failures) == sorted([
        f"Not Authorized {unknown}: not public or unknown (it may belong to a "
        "limited-access collection: log in)",
        f"Error          {broken}: HTTP 500 (an HTML page) (2 attempts)"]), err
    assert all(line.count(broken) <= 1 for line in err)
    out = done.stdout.splitlines()
    steps = [line for line in out if line.startswith("next: ")]
    assert steps == [
        "next: retry the 2 failed series with: nbia-retriever download --retries 1 "
        "--backoff 0 -d out m.tcia --only-failed (--error-report FILE lists them as CSV); "
        "1 need a login (--user NAME) or are not on this server"], out
    # -q: the same one line per series, after the level.
    srv.set_faults(FaultPlan(script={broken: ["http500"] * 5}))
    quiet = cli("download", "-q", "--only-failed", "--retries", "0", "-d", "out", "m.tcia",
                cwd=tmp_path)
    assert f"Error: {broken}: HTTP 500 (an HTML page) (1 attempt)" in quiet.stderr.splitlines()


def test_local_verify_that_finds_damage_names_the_repair(srv, public, tmp_path):
    """Before: "altered file (MD5) ..." and nothing else. After: one line saying that
    ``verify --server --repair`` (not a re-run, which trusts the journal) fixes it."""
    write_manifest(tmp_path / "m.tcia", [public[0].series_uid], srv.download_url)
    assert cli("download", "-d", "out", "m.tcia", cwd=tmp_path).returncode == 0
    victim = next(p for p in (tmp_path / "out").rglob("*.dcm") if ".nbia" not in p.parts)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    done = cli("verify", "out", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1] == (
        f"next: nbia-retriever verify out/{ROOT_NAME} --server --repair downloads the damaged "
        "series again (a re-run of the download would not: its journal says they are "
        "complete)")


# ------------------------------------------------------------------ unreachable


def test_unreachable_server_is_exit_4_said_once_and_creates_no_folder(tmp_path):
    """Before: 12 s, 18 "Cancelled" lines, the error twice, exit 1 and an empty
    destination folder. After: one line, exit 4, the destination untouched."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/nbia-download/servlet/DownloadServlet"
    write_manifest(tmp_path / "m.tcia", [f"1.2.3.{n}" for n in range(1, 19)], url)
    done = cli("download", "--backoff", "0", "-d", "dest", "m.tcia", cwd=tmp_path)
    assert done.returncode == EXIT_UNREACHABLE == 4
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"nbia-retriever: error: cannot reach http://127.0.0.1:{port}/nbia-api/services: "
        "API version probe: ConnectionRefusedError: Connection refused"]
    assert not (tmp_path / "dest").exists()
    # --json: the one error event, the same code.
    as_json = cli("download", "--json", "--backoff", "0", "-d", "dest", "m.tcia",
                  cwd=tmp_path)
    assert as_json.returncode == 4
    assert [json.loads(line)["event"] for line in as_json.stdout.splitlines()][-1] == "summary"
    assert not (tmp_path / "dest").exists()
    assert exit_code(ServerUnreachableError("x")) == 4
    assert "4 the server could not be reached" in " ".join(
        cli("download", "--help").stdout.split())


# ------------------------------------------------------------------ --only-failed, fresh


def test_only_failed_on_a_fresh_folder_says_there_is_nothing_to_retry(srv, public, tmp_path):
    """Before: "0 of 0 series complete; 0.0 MB downloaded in 0.0 s". After: what it
    means, and nothing is created."""
    write_manifest(tmp_path / "m.tcia", [s.series_uid for s in public], srv.download_url)
    done = cli("download", "--only-failed", "-d", "out", "m.tcia", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"nothing to retry: no series of this manifest failed in an earlier run into "
        f"out/{ROOT_NAME}"]
    assert "0 of 0" not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ collections --counts


def test_collections_counts_prints_each_warning_once(srv):
    """Before: "SYNTH-CT-B: counts not available (?): getPatient: getPatient: HTTP 500
    (an HTML page); getSeries: getSeries: HTTP 500 (an HTML page)". After: each call
    and each reason once."""
    with QuirkyServer(srv, broken={"SYNTH-CT-B"}) as quirky:
        done = cli("collections", "--counts", "--api-url", quirky.api_url)
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.splitlines()
    assert len(warnings) == len(set(warnings)), warnings
    assert [line for line in warnings if "SYNTH-CT-B" in line] == [
        "nbia-retriever: warning: SYNTH-CT-B: counts not available (?): getPatient, "
        "getSeries: the server sent an HTML page, not data"], warnings
