"""examples/slurm-array.sh on a real SLURM cluster (``scripts/slurm-local.sh`` sets one up).

The array really runs: ``sbatch`` submits TASKS download tasks and the afterany
``merge-reports`` check, slurmd starts them as separate processes on this host, and they
download from a reference server that this test process serves on 127.0.0.1. The
submission is made from a directory unrelated to the repository and the destination,
so the script must work with absolute paths and put its logs where it says it does
(DEST/slurm-logs/). Waiting is polling a condition (the jobs have left ``squeue``)
under a deadline, never a sleep standing in for synchronisation; the checks hold
whatever order the tasks run in.

Skipped, with the reason, when there is no ``sbatch`` or ``sinfo`` finds no node up.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from enginehelpers import downloaded_series, expected_series, write_manifest
from nbia_retriever.engine import shard_of
from nbia_retriever.engine.journal import Journal
from nbia_retriever.errors import NbiaError
from nbia_retriever.models import SeriesState
from nbia_retriever.server import ReferenceServer, RequestRecord
from nbia_retriever.server.faults import FaultPlan
from nbia_retriever.server.synth import ArchiveSummary
from reliability_helpers import assert_root_clean

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "slurm-array.sh"
TASKS = 3
BASKET = "manifest-1700000000000.tcia"
ROOT_NAME = "manifest-1700000000000"
#: Generous: a run takes seconds; the deadline only turns a hang into a failure.
DEADLINE = 240.0
POLL = 0.25
ARCHIVE = dict(seed=5, collections=2, patients=2, studies=1, series=3, images=4, rows=16,
               columns=16, restricted=False)
UP_STATES = {"idle", "mixed", "allocated", "completing"}


def slurm_unavailable() -> str | None:
    """Why the SLURM tests cannot run here, or None when they can."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (scripts/slurm-local.sh sets up a one-node SLURM)"
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo does not answer ({exc})"
    if done.returncode != 0:
        return f"sinfo does not answer: {done.stderr.strip() or done.returncode}"
    states = set(done.stdout.split())
    if not {s.rstrip("~#!%$@^-") for s in states} & UP_STATES:  # "idle*": not responding
        return f"no SLURM node is up (sinfo: {' '.join(sorted(states)) or 'no nodes'})"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    reason = slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)


# ------------------------------------------------------------------------- SLURM helpers


@dataclass(frozen=True)
class Submission:
    array: str
    merge: str
    output: str


class Submit(Protocol):
    def __call__(self, manifest: Path, dest: Path, sbatch_args: str = "") -> Submission: ...


def squeue(job_ids: list[str]) -> list[str]:
    """The jobs (and array tasks) among ``job_ids`` SLURM still has pending or running."""
    done = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "Invalid job id" in done.stderr:
        return []  # all of them ended long enough ago to be forgotten
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[:-1]


def wait_until(condition: Callable[[], object], what: str,
               deadline: float = DEADLINE) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``deadline`` s."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"not after {deadline:.0f} s: {what}")
        time.sleep(POLL)


def wait_ended(job_ids: list[str], deadline: float = DEADLINE) -> None:
    left: list[str] = []

    def ended() -> bool:
        left[:] = squeue(job_ids)
        return not left

    wait_until(ended, f"jobs {job_ids} ended (still queued: {left})", deadline)


def job_state(job_id: str) -> tuple[str, str]:
    """(JobState, ExitCode) of a job or array task (``ID_K``) SLURM still remembers."""
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    fields = dict(re.findall(r"(\w+)=(\S*)", done.stdout))
    return fields["JobState"], fields["ExitCode"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Submit]:
    """``submit(manifest, dest, sbatch_args="")``: the script's login-node mode, run from
    tmp/elsewhere.

    The jobs get the environment of this test (sbatch exports it), with the
    nbia-retriever of this interpreter's environment and one CPU per job, so two tasks
    run at once on a two-CPU node. Jobs still queued at the end are cancelled.
    """
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tool = Path(sys.executable).with_name("nbia-retriever")
    assert tool.is_file(), f"{tool}: nbia-retriever is not installed next to {sys.executable}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NBIA_", "SBATCH_"))}
    env.update(NBIA_RETRIEVER=str(tool),
               NBIA_SBATCH_ARGS="--cpus-per-task=1 --time=30",
               NBIA_RETRIEVER_CONFIG=str(tmp_path / "no-config.toml"),
               PYTHONUNBUFFERED="1")
    submitted: list[str] = []

    def submit(manifest: Path, dest: Path, sbatch_args: str = "") -> Submission:
        run_env = {**env, "NBIA_SBATCH_ARGS": f"{env['NBIA_SBATCH_ARGS']} {sbatch_args}"}
        done = subprocess.run(["bash", str(SCRIPT), str(manifest), str(dest), str(TASKS)],
                              cwd=elsewhere, env=run_env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        found = re.search(r"submitted download array (\d+) \((\d+) tasks\) and check (\d+)",
                          done.stdout)
        assert found, done.stdout
        assert found.group(2) == str(TASKS)
        submitted.extend([found.group(1), found.group(3)])
        return Submission(found.group(1), found.group(3), done.stdout)

    yield submit
    left = [line.split()[0] for line in squeue(submitted)] if submitted else []
    if left:
        subprocess.run(["scancel", *{job.split("_")[0] for job in left}], timeout=60)
    assert not any(elsewhere.iterdir()), "the jobs wrote into the submit directory"


# ----------------------------------------------------------------------- download checks


def image_requests(records: list[RequestRecord]) -> Counter[str]:
    """Series UID -> number of whole image zips (200, no fault) among ``records``."""
    return Counter(r.series_uid for r in records if r.series_uid is not None
                   and r.path.endswith("/getImage") and r.status == 200 and r.fault is None)


def shard_uids(uids: list[str]) -> dict[int, set[str]]:
    return {k: {u for u in uids if shard_of(u, TASKS) == k} for k in range(1, TASKS + 1)}


def journal_states(root: Path, k: int) -> dict[str, str]:
    with Journal(root / ".nbia" / f"journal-{k}-of-{TASKS}.sqlite", readonly=True) as journal:
        return journal.states()


def log_of(dest: Path, name: str) -> str:
    path = dest / "slurm-logs" / name
    assert path.is_file(), f"no log {path}: {sorted(os.listdir(path.parent))}"
    return path.read_text(encoding="utf-8", errors="replace")


def assert_complete_download(root: Path, archive: ArchiveSummary, uids: list[str]) -> None:
    """Every series once, byte-identical to the archive, each in its own shard's journal."""
    expected = expected_series(archive.root)
    assert downloaded_series(root) == expected
    # Nothing else in the root: no second copy of a series, no leftovers, a clean
    # metadata.csv, journals agreeing with the files.
    assert_root_clean(root, complete=uids, expected=expected)
    images = [p for p in root.rglob("*.dcm") if ".nbia" not in p.relative_to(root).parts]
    assert len(images) == sum(len(files) for files in expected.values())
    for k, owned in shard_uids(uids).items():
        states = journal_states(root, k)
        assert set(states) == owned, f"journal of shard {k} holds another shard's series"
        assert set(states.values()) == {SeriesState.COMPLETE}


def assert_merge_ok(dest: Path, sub: Submission, uids: list[str]) -> None:
    assert job_state(sub.merge) == ("COMPLETED", "0:0")
    log = log_of(dest, f"nbia-merge-reports-{sub.merge}.log")
    assert f"{len(uids)} of {len(uids)} series complete ({TASKS} journal(s)" in log, log
    assert "missing" not in log, log


@pytest.fixture
def uids(archive_factory: Callable[..., ArchiveSummary]) -> list[str]:
    found = [s.series_uid for s in archive_factory(**ARCHIVE).series]
    # Guards the tests themselves: a shard without series would prove nothing.
    assert all(shard_uids(found).values())
    return found


# --------------------------------------------------------------------------------- tests


def test_array_downloads_every_series_once_and_a_resubmission_fetches_nothing(
        archive_factory: Callable[..., ArchiveSummary], serve: Callable[..., ReferenceServer],
        cluster: Submit, uids: list[str], tmp_path: Path) -> None:
    archive = archive_factory(**ARCHIVE)
    server = serve(archive.root)
    manifest = write_manifest(tmp_path / BASKET, uids, server.download_url, basket=BASKET)
    dest = tmp_path / "dest"
    root = dest / ROOT_NAME

    first = cluster(manifest, dest)
    assert f"{dest}/slurm-logs/nbia-merge-reports-{first.merge}.log" in first.output
    wait_ended([first.array, first.merge])

    shards = shard_uids(uids)
    for k in range(1, TASKS + 1):
        assert job_state(f"{first.array}_{k}") == ("COMPLETED", "0:0")
        # Each task downloaded its own shard, all of it, and said so in its own log.
        log = log_of(dest, f"nbia-download-{first.array}_{k}.log")
        n = len(shards[k])
        assert f"{n} of {n} series complete;" in log, log
    assert_merge_ok(dest, first, uids)
    assert_complete_download(root, archive, uids)
    assert image_requests(server.requests) == Counter(set(uids))  # each series once

    # The same command again: every task finds its shard done and downloads nothing.
    before = len(server.requests)
    second = cluster(manifest, dest)
    wait_ended([second.array, second.merge])
    for k in range(1, TASKS + 1):
        assert job_state(f"{second.array}_{k}") == ("COMPLETED", "0:0")
        log = log_of(dest, f"nbia-download-{second.array}_{k}.log")
        n = len(shards[k])
        assert f"{n} of {n} series complete ({n} already done);" in log, log
    assert_merge_ok(dest, second, uids)
    assert not [r for r in server.requests[before:] if r.path.endswith("/getImage")]
    assert_complete_download(root, archive, uids)


def stalled_shard_1(uids: list[str]) -> FaultPlan:
    """Every attempt at a series of shard 1 stalls: part of the zip, then ten minutes of
    silence (the client gives an attempt up after its --timeout, 60 s, and retries)."""
    return FaultPlan(script={uid: ["stall:600"] * 10 for uid in shard_uids(uids)[1]})


def check_interrupted_then_resume(server: ReferenceServer, cluster: Submit,
                                  first: Submission, manifest: Path, dest: Path,
                                  archive: ArchiveSummary, uids: list[str]) -> None:
    """Task 1 of ``first`` was interrupted: it stopped cleanly, the others completed, the
    check says what is missing, and a resubmission (the server healthy) completes it."""
    shards = shard_uids(uids)
    task1 = f"{first.array}_1"
    assert job_state(task1) == ("FAILED", "130:0")  # the download's own clean exit
    log = log_of(dest, f"nbia-download-{task1}.log")
    assert "interrupted: stopping (re-run the same command to resume)" in log, log
    assert f"0 of {len(shards[1])} series complete;" in log, log
    assert "Traceback" not in log, log
    for k in range(2, TASKS + 1):
        assert job_state(f"{first.array}_{k}") == ("COMPLETED", "0:0")
    # The check ran all the same (afterany), and failed: shard 1 is not done.
    assert job_state(first.merge) == ("FAILED", "1:0")
    log = log_of(dest, f"nbia-merge-reports-{first.merge}.log")
    assert f"{len(uids) - len(shards[1])} of {len(uids)} series complete" in log, log
    for uid in shards[1]:
        assert re.search(rf"missing {re.escape(uid)} \[shard 1/{TASKS}\]", log), log
    # Task 1 did ask for shard 1's series, and no zip of them got through.
    stalls = [r for r in server.requests if r.series_uid in shards[1]]
    assert stalls and all(r.fault for r in stalls if r.path.endswith("/getImage"))
    assert not image_requests(server.requests).keys() & shards[1]

    server.set_faults(None)
    before = len(server.requests)
    second = cluster(manifest, dest)
    wait_ended([second.array, second.merge])
    for k in range(1, TASKS + 1):
        assert job_state(f"{second.array}_{k}") == ("COMPLETED", "0:0")
    assert_merge_ok(dest, second, uids)
    assert_complete_download(dest / ROOT_NAME, archive, uids)
    # Only shard 1 was downloaded again, each of its series once.
    assert image_requests(server.requests[before:]) == Counter(shards[1])


def test_sigint_stops_a_task_cleanly_and_the_next_submission_completes(
        archive_factory: Callable[..., ArchiveSummary], serve: Callable[..., ReferenceServer],
        cluster: Submit, uids: list[str], tmp_path: Path) -> None:
    """SIGINT to the batch shell (``scancel --batch``), which is how SLURM delivers the
    script's ``--signal=B:INT@120``; ``exec`` makes the download that shell.

    Shard 1's series all stall, so task 1 cannot finish any: once its journal shows one
    downloading, the task is signalled mid-series, whatever the timing. (It then stops
    when the stalled attempt times out, up to the download's --timeout, 60 s.)
    """
    archive = archive_factory(**ARCHIVE)
    server = serve(archive.root, faults=stalled_shard_1(uids))
    manifest = write_manifest(tmp_path / BASKET, uids, server.download_url, basket=BASKET)
    dest = tmp_path / "dest"
    root = dest / ROOT_NAME

    first = cluster(manifest, dest)

    def task1_downloading() -> bool:
        try:
            states = journal_states(root, 1)
        except (OSError, NbiaError, sqlite3.Error):  # not yet created, or being created
            return False
        return SeriesState.DOWNLOADING in states.values()

    wait_until(task1_downloading, "task 1 is downloading a series")
    signal = subprocess.run(["scancel", "--signal=INT", "--batch", f"{first.array}_1"],
                            capture_output=True, text=True, timeout=60)
    assert signal.returncode == 0, signal.stderr
    wait_ended([first.array, first.merge])
    check_interrupted_then_resume(server, cluster, first, manifest, dest, archive, uids)


@pytest.mark.slow
def test_time_limit_sends_sigint_before_the_kill(
        archive_factory: Callable[..., ArchiveSummary], serve: Callable[..., ReferenceServer],
        cluster: Submit, uids: list[str], tmp_path: Path) -> None:
    """The script's own ``--signal=B:INT@120``, sent by SLURM: a 4-minute limit, and task 1
    stalled on shard 1 for longer (5 attempts of 60 s). SLURM signals it 120 s (up to
    60 s more) before the limit; the download stops cleanly (exit 130, not TIMEOUT)
    within its --timeout. About four minutes: make soak runs it."""
    archive = archive_factory(**ARCHIVE)
    server = serve(archive.root, faults=stalled_shard_1(uids))
    manifest = write_manifest(tmp_path / BASKET, uids, server.download_url, basket=BASKET)
    dest = tmp_path / "dest"

    first = cluster(manifest, dest, "--time=4")
    wait_ended([first.array, first.merge], deadline=600.0)
    check_interrupted_then_resume(server, cluster, first, manifest, dest, archive, uids)
