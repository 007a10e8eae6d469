"""Worker processes (``engine.procs``): the same downloads, the same guarantees.

Every engine test here first waits until the workers are up (``start_workers``, then
``stats().processes``), pins one stream so the first series (the one that proves the
image endpoint, always made in-process) is done before the next is handed out, and then
checks that the series it is about really ran in a worker (``stats().worker_attempts``).
Faults come from the reference server, the worker is killed for real.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from enginehelpers import downloaded_series, expected_series, start_workers, write_manifest
from nbia_retriever import make_engine
from nbia_retriever.engine import EventKind
from nbia_retriever.engine.procs import (
    WorkerPool,
    _pack_error,
    _unpack_error,
    default_processes,
)
from nbia_retriever.engine.staging import Progress
from nbia_retriever.errors import (
    ApiError,
    DiskFullError,
    IntegrityError,
    ManifestError,
    NetworkError,
    NotPublicError,
    UnsafeArchiveError,
)
from nbia_retriever.models import SeriesState
from nbia_retriever.server import FaultPlan

FAST = {"backoff_base": 0.01, "timeout": 5.0}
WORKER_MARK = "engine.procs import _main"

pytestmark = pytest.mark.skipif(default_processes() == 0,
                                reason="worker processes need 2 cores and fd passing")


@pytest.fixture(scope="module")
def archive(archive_factory):
    return archive_factory(seed=23, collections=2, patients=2, studies=1, series=2,
                           images=6, rows=32, columns=32)


@pytest.fixture(scope="module")
def expected(archive) -> dict[str, dict[str, str]]:
    return expected_series(archive.root)


@pytest.fixture()
def public(archive) -> list[str]:
    return [s.series_uid for s in archive.series if not s.restricted]


def workers_of(pid: int) -> list[psutil.Process]:
    """This process's worker processes (by their command line)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if WORKER_MARK in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def downloading(engine, uid: str) -> list[bool]:
    """A flag list that gets an entry when ``uid`` starts downloading."""
    flag: list[bool] = []
    engine.subscribe(lambda e: flag.append(True) if e.kind == EventKind.STATE and
                     e.uid == uid and e.state == SeriesState.DOWNLOADING else None)
    return flag


def wait_stalled(engine, server, started: list[bool]) -> None:
    """Until the series is downloading and its zip request is in flight (one stream:
    the only one)."""
    deadline = time.monotonic() + 60
    while not (started and any("getImage" in p for p in server.in_flight())):
        assert time.monotonic() < deadline, "the stalled series was never requested"
        engine.wait(0.02)


def ready_engine(manifest: Path, dest: Path, server, processes: int = 2, **options):
    """An engine whose worker processes are up, not yet started."""
    workers = options.pop("workers", 1)
    engine = make_engine(manifest, dest, api_url=server.api_url, processes=processes,
                         workers=workers, **{**FAST, **options})
    return start_workers(engine, min(processes, workers))


def test_a_download_through_workers_is_the_same_as_on_threads(tmp_path, archive, serve,
                                                              public, expected):
    server = serve(archive.root)
    cart = write_manifest(tmp_path / "cart.tcia", public, server.download_url)
    threads = make_engine(cart, tmp_path / "threads", api_url=server.api_url, processes=0,
                          **FAST).run()
    engine = ready_engine(cart, tmp_path / "procs", server)
    report = engine.run()
    assert threads.ok and report.ok, report.summary()
    # All but the first series (the endpoint's proof) ran in a worker.
    assert engine.stats().worker_attempts == len(public) - 1
    assert downloaded_series(report.root) == downloaded_series(threads.root)
    assert downloaded_series(report.root) == {u: expected[u] for u in public}
    def rows(root: Path) -> list[list[str]]:  # all but the Download Timestamp
        with (root / "metadata.csv").open(encoding="utf-8", newline="") as handle:
            return sorted(row[:-1] for row in csv.reader(handle))

    assert rows(report.root) == rows(threads.root)
    assert engine.stats().processes == 0, "the workers outlived the run"


@pytest.mark.parametrize("fault", ["reset", "short", "corrupt", "http500", "http429",
                                   "stall"])
def test_each_fault_in_a_worker_is_survived(tmp_path, archive, serve, public, expected,
                                            fault):
    server = serve(archive.root)
    uid = public[-1]
    server.set_faults(FaultPlan(script={uid: [fault, fault]}, stall_seconds=30))
    cart = write_manifest(tmp_path / "cart.tcia", public, server.download_url)
    engine = ready_engine(cart, tmp_path / "dl", server, timeout=1.0)
    report = engine.run()
    assert report.ok, report.summary()
    assert report.results[uid].attempts == 3
    assert engine.stats().worker_attempts == len(public) - 1 + 2
    assert downloaded_series(report.root) == {u: expected[u] for u in public}


def test_final_answers_keep_their_meaning_across_the_process_boundary(tmp_path, archive,
                                                                      serve, public):
    """A 460 "login needed" from a worker is final (not retried), as on threads."""
    server = serve(archive.root)
    uid = public[-1]
    server.set_faults(FaultPlan(script={uid: ["http460"] * 5}))
    cart = write_manifest(tmp_path / "cart.tcia", public, server.download_url)
    report = ready_engine(cart, tmp_path / "dl", server).run()
    result = report.results[uid]
    assert result.state == SeriesState.NOT_AUTHORIZED, result.error
    assert result.attempts == 1


def test_cancel_ends_a_worker_read_stalled_on_a_silent_server(tmp_path, archive, serve,
                                                             public):
    server = serve(archive.root)
    uid = public[-1]
    server.set_faults(FaultPlan(script={uid: ["stall"]}, stall_seconds=600))
    cart = write_manifest(tmp_path / "cart.tcia", public, server.download_url)
    engine = ready_engine(cart, tmp_path / "dl", server, timeout=600, retries=0)
    started = downloading(engine, uid)
    engine.start()
    wait_stalled(engine, server, started)
    engine.cancel()
    report = engine.wait(60)
    assert engine.finished, "cancel waited for the stalled read in the worker"
    assert report.cancelled and report.results[uid].state == SeriesState.CANCELLED
    assert uid not in downloaded_series(report.root)
    assert not any((report.root / ".nbia" / "staging").rglob("*.part"))


def test_pause_holds_a_worker_stream_and_resume_finishes_it(tmp_path, archive, serve,
                                                           public, expected):
    server = serve(archive.root)
    uid = public[-1]
    cart = write_manifest(tmp_path / "cart.tcia", public, server.download_url)
    engine = ready_engine(cart, tmp_path / "dl", server, timeout=60)
    states: list[tuple[str, str]] = []
    paused_once: list[bool] = []

    def on_event(event) -> None:
        if event.kind == EventKind.STATE and event.uid == uid:
            states.append(event.state)
        if event.kind == EventKind.STATE and event.uid == uid and \
                event.state == SeriesState.DOWNLOADING and not paused_once:
            paused_once.append(True)
            engine.pause()  # the worker's stream holds at its next chunk

    engine.subscribe(on_event)
    engine.start()
    deadline = time.monotonic() + 60
    while SeriesState.PAUSED not in states:
        assert time.monotonic() < deadline, "the worker's stream never held"
        engine.wait(0.02)
    engine.resume()
    report = engine.wait(120)
    assert report.ok, report.summary()
    assert states[-3:] == [SeriesState.PAUSED, SeriesState.DOWNLOADING, SeriesState.COMPLETE]
    assert downloaded_series(report.root)[uid] == expected[uid]
    assert engine.stats().worker_attempts == len(public) - 1


def test_a_worker_killed_mid_series_costs_one_attempt(tmp_path, archive, serve, public,
                                                     expected):
    server = serve(archive.root)
    uid = public[-1]
    server.set_faults(FaultPlan(script={uid: ["stall"]}, stall_seconds=600))
    cart = write_manifest(tmp_path / "cart.tcia", public, server.download_url)
    engine = ready_engine(cart, tmp_path / "dl", server, timeout=600)
    retries: list[str] = []
    engine.subscribe(lambda e: retries.append(e.message) if e.kind == EventKind.RETRY
                     else None)
    started = downloading(engine, uid)
    engine.start()
    wait_stalled(engine, server, started)
    victims = workers_of(os.getpid())
    assert len(victims) == 1  # one stream, one worker
    for victim in victims:
        victim.kill()
    report = engine.wait(120)
    assert report.ok, report.summary()
    assert report.results[uid].attempts == 2
    assert any("lost the worker process" in m for m in retries), retries
    assert downloaded_series(report.root) == {u: expected[u] for u in public}


def test_a_stale_token_in_a_worker_is_refreshed_without_costing_a_retry(tmp_path, archive,
                                                                      serve):
    server = serve(archive.root)
    uids = [s.series_uid for s in archive.series]
    cart = write_manifest(tmp_path / "cart.tcia", uids, server.download_url)
    engine = ready_engine(cart, tmp_path / "dl", server, user="alice",
                          password=archive.users["alice"], retries=0)
    jumped: list[bool] = []

    def on_event(event) -> None:
        if event.kind == EventKind.STATE and event.state == SeriesState.COMPLETE \
                and not jumped:
            jumped.append(True)
            server.advance_clock(100_000)  # every token issued so far is now expired

    engine.subscribe(on_event)
    report = engine.run()
    assert report.ok, report.summary()
    assert all(r.attempts == 1 for r in report.results.values())
    assert any(r.status == 401 for r in server.requests)
    # One stream: exactly one worker request met the stale token, and was made again.
    assert engine.stats().worker_attempts == len(uids) - 1 + 1


def test_workers_see_no_secret_in_argv_or_environment(tmp_path, archive, serve, monkeypatch):
    password = archive.users["alice"]
    monkeypatch.setenv("NBIA_PASSWORD", password)
    server = serve(archive.root)
    uids = [s.series_uid for s in archive.series]
    cart = write_manifest(tmp_path / "cart.tcia", uids, server.download_url)
    engine = ready_engine(cart, tmp_path / "dl", server, user="alice", password=password,
                          workers=2)
    try:
        workers = workers_of(os.getpid())
        assert len(workers) == 2
        for worker in workers:
            assert password not in " ".join(worker.cmdline())
            assert "NBIA_PASSWORD" not in worker.environ()
            assert not any(password in v for v in worker.environ().values())
    finally:
        engine.close()
    for worker in workers:
        worker.wait(30)  # close() stops them


def test_workers_exit_when_the_engine_process_is_killed(tmp_path, archive, serve, public):
    server = serve(archive.root)
    uid = public[-1]
    server.set_faults(FaultPlan(script={uid: ["stall"]}, stall_seconds=600))
    cart = write_manifest(tmp_path / "cart.tcia", public, server.download_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbia_retriever.cli", "download", str(cart), "-d",
         str(tmp_path / "dl"), "--json", "-w", "1", "--processes", "2",
         "--api-url", server.api_url, "--timeout", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            if event.get("uid") == uid and event.get("state") == SeriesState.DOWNLOADING:
                break
        else:
            raise AssertionError("the download ended early")
        deadline = time.monotonic() + 60
        while not any("getImage" in p for p in server.in_flight()):
            assert time.monotonic() < deadline, "the stalled series was never requested"
            time.sleep(0.02)
        workers = workers_of(proc.pid)
        assert workers, "no worker process"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "a worker outlived the process that started it"


def test_a_worker_ignores_the_terminals_ctrl_c(tmp_path, archive, serve, public):
    """Ctrl+C reaches the whole foreground process group; workers must leave stopping to
    the engine (which discards their staged data in order)."""
    server = serve(archive.root)
    cart = write_manifest(tmp_path / "cart.tcia", public, server.download_url)
    engine = ready_engine(cart, tmp_path / "dl", server)
    try:
        workers = workers_of(os.getpid())
        assert all(w.terminal() is None or os.getsid(w.pid) != os.getsid(0) for w in workers)
        for worker in workers:
            worker.send_signal(signal.SIGINT)
            worker.send_signal(signal.SIGTERM)
        report = engine.run()
        assert report.ok, report.summary()
        assert engine.stats().worker_attempts == len(public) - 1
    finally:
        engine.close()


@pytest.mark.parametrize("error", [
    ApiError("series 1: HTTP 503", status=503, retry_after=7.5),
    NotPublicError("series 1: HTTP 400", status=400),
    NetworkError("series 1: timed out", timeout=True),
    ManifestError("bad line", source="cart.tcia", line=3),
    IntegrityError("series 1: MD5 mismatch"),
    UnsafeArchiveError("series 1: entry '../x' escapes"),
    DiskFullError("disk full at /data"),
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError("a bug"),
])
def test_errors_cross_the_process_boundary_as_themselves(error):
    again = _unpack_error(_pack_error(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert getattr(again, "__dict__", {}) == getattr(error, "__dict__", {})
    if isinstance(error, OSError):
        assert again.errno == errno.ENOSPC  # type: ignore[attr-defined]


def test_an_attempt_a_worker_cannot_even_read_fails_at_once_and_the_worker_goes_on(
        tmp_path, archive, serve, public, monkeypatch):
    """A job the worker cannot unpickle (a class it cannot import) must come back as an
    error, not hang the engine, and must not cost the worker its thread."""
    server = serve(archive.root)
    pool = WorkerPool(1)
    pool.start()
    try:
        deadline = time.monotonic() + 60
        while pool.ready() < 1:
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.01)
        # A module only this process can import (the worker's path was fixed at spawn).
        (tmp_path / "alien_module.py").write_text("class Alien:\n    what = 'series x'\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        import alien_module

        opened: list[object] = []
        for _ in range(2):  # twice: the first failure must leave the worker serving
            with pytest.raises(Exception) as caught:
                pool.stage(alien_module.Alien(), None, tmp_path / "staging", tmp_path,
                           progress=Progress(), on_progress=lambda n: None,
                           checkpoint=lambda: None, on_open=opened.append,
                           cancelled=lambda: AssertionError("not cancelled"))
            assert "alien_module" in str(caught.value)
        assert len(opened) == 2 and pool.ready() == 1
    finally:
        pool.close()
    del server


def test_worker_processes_are_refused_in_one_line_where_they_cannot_run(monkeypatch):
    from nbia_retriever.engine import DownloadOptions
    from nbia_retriever.errors import UsageError

    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert default_processes() == 0
    with pytest.raises(UsageError, match="frozen"):
        DownloadOptions(processes=1)
    DownloadOptions(processes=0)  # threads only: fine


def test_a_worker_that_does_not_stop_after_cancel_is_killed_before_staging_is_freed(
        tmp_path, monkeypatch):
    """A worker stuck where a cancel cannot reach (waiting for the answer's first byte
    from a server that accepted and went silent) is killed after CANCEL_GRACE: the
    engine never waits forever, and nothing writes into staging after it returns."""
    import socket
    import threading

    import nbia_retriever.engine.procs as procs
    from nbia_retriever.api.client import SeriesRequest, _ImageWay
    from nbia_retriever.engine.source import NbiaOpener

    monkeypatch.setattr(procs, "CANCEL_GRACE", 0.5)
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    port = silent.getsockname()[1]
    request = NbiaOpener(SeriesRequest(
        uid="1.2.3", url=f"http://127.0.0.1:{port}/nbia-api/services/v1/getImage",
        params=(("SeriesInstanceUID", "1.2.3"),), headers=(), what="series 1.2.3",
        way=_ImageWay("v1", "getImage"), timeout=600.0, connect_timeout=600.0, verify=True))
    pool = WorkerPool(1)
    pool.start()
    try:
        deadline = time.monotonic() + 60
        while pool.ready() < 1:
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.01)
        victim = workers_of(os.getpid())[0]

        def cancel_when_asked(attempt) -> None:
            while not accepted:  # the worker's request reached the silent server
                time.sleep(0.01)
            attempt.abort()

        class Cancelled(Exception):
            pass

        with pytest.raises(Cancelled):
            pool.stage(request, None, tmp_path / "staging", tmp_path, progress=Progress(),
                       on_progress=lambda n: None, checkpoint=lambda: None,
                       on_open=cancel_when_asked, cancelled=Cancelled)
        assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
    finally:
        pool.close()
        silent.close()
        for conn in accepted:
            conn.close()
