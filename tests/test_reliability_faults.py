"""Fault matrix over real HTTP: every fault kind on the logged-in API (v2), expired tokens
mid-download, Retry-After, and the retry budget on every API version.

test_engine.py already proves each fault is survived on v1 and v4; this file adds v2 (the
API of limited-access collections, where every request carries a token), tokens that
expire while a download runs (NBIA tokens live two hours, downloads live for days), the
server's Retry-After being honoured, metadata faults, and, for every fault kind, what
happens past the budget: the series is reported failed with the cause, nothing of it is
published, and ``only_failed`` finishes it later.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from enginehelpers import download_report, expected_series, write_manifest
from nbia_retriever import download, make_engine
from nbia_retriever.api import Credentials, NbiaClient
from nbia_retriever.models import SeriesState
from nbia_retriever.server import FaultPlan, ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary
from reliability_helpers import assert_root_clean, metadata_rows, staging_leftovers

FAST = {"backoff_base": 0.01, "timeout": 5.0}
#: The fault kinds of the reference server, with what the failure report must say.
CAUSES = {
    "reset": "reset by peer",
    "short": "short zip",
    "corrupt": "MD5 mismatch",
    "http500": "HTTP 500",
    "http503:0.1": "HTTP 503",
    "http429:0.1": "HTTP 429",
    "stall": "timed out",
}


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    # Two collections, the second restricted: alice sees all four series, bob only two.
    return archive_factory(seed=23, collections=2, patients=1, studies=1, series=2, images=4,
                           rows=32, columns=32)


@pytest.fixture(scope="module")
def expected(archive: ArchiveSummary) -> dict[str, dict[str, str]]:
    return expected_series(archive.root)


@pytest.fixture()
def server(archive: ArchiveSummary, serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    return serve(archive.root)


def login(archive: ArchiveSummary, server: ReferenceServer) -> dict[str, str]:
    """alice's login, for the server the user chose (credentials go nowhere else)."""
    return {"user": "alice", "password": archive.users["alice"], "api_url": server.api_url}


def all_uids(archive: ArchiveSummary) -> list[str]:
    return [s.series_uid for s in archive.series]


def restricted_uid(archive: ArchiveSummary) -> str:
    return next(s.series_uid for s in archive.series if s.restricted)


def manifest(tmp_path: Path, server: ReferenceServer, uids: list[str], **kw: object) -> Path:
    return write_manifest(tmp_path / "cart.tcia", uids, server.download_url, **kw)  # type: ignore[arg-type]


def timeout_for(fault: str) -> float:
    """A short read timeout only where the fault is a stall (it is what ends the stall)."""
    return 1.0 if fault == "stall" else 5.0


@pytest.mark.parametrize("fault", list(CAUSES))
def test_each_fault_is_survived_on_v2_with_login(tmp_path, server, archive, expected, fault):
    # The restricted series is only reachable through v2 with a token: every retry must
    # carry a valid one, and the faulted attempts must not leak anything into the tree.
    uid = restricted_uid(archive)
    server.set_faults(FaultPlan(script={uid: [fault, fault]}, stall_seconds=30))
    report = download(manifest(tmp_path, server, all_uids(archive)), tmp_path / "dl",
                      api="v2", **{**FAST, "timeout": timeout_for(fault)},
                      **login(archive, server))
    assert report.ok, report.summary()
    assert report.results[uid].attempts == 3
    assert_root_clean(report.root, complete=all_uids(archive), expected=expected)
    assert staging_leftovers(report.root) == []
    image_calls = [r for r in server.requests if r.series_uid == uid and "getImage" in r.path]
    assert [r.user for r in image_calls] == ["alice"] * 3
    assert [r.fault for r in image_calls] == [fault.split(":")[0]] * 2 + [None]


@pytest.mark.parametrize("api", ["v1", "v2", "v4"])
@pytest.mark.parametrize("fault", list(CAUSES))
def test_past_the_budget_reports_the_cause_and_publishes_nothing(
        tmp_path, server, archive, expected, fault, api):
    uids = all_uids(archive)
    uid = restricted_uid(archive) if api == "v2" else \
        next(s.series_uid for s in archive.series if not s.restricted)
    uids = uids if api == "v2" else [s.series_uid for s in archive.series if not s.restricted]
    creds = login(archive, server) if api == "v2" else {}
    server.set_faults(FaultPlan(script={uid: [fault] * 2}, stall_seconds=30))
    cart = manifest(tmp_path, server, uids, retries=1)
    # A stall past the budget only has to time out: half a second is plenty.
    timeout = 0.5 if fault == "stall" else FAST["timeout"]
    report = download(cart, tmp_path / "dl", api=api, **{**FAST, "timeout": timeout}, **creds)
    failed = report.results[uid]
    assert failed.state == SeriesState.ERROR and failed.attempts == 2
    assert CAUSES[fault] in failed.error and "after 2 attempts" in failed.error
    others = [u for u in uids if u != uid]
    assert_root_clean(report.root, complete=others, expected=expected)
    assert uid not in {r[0] for r in metadata_rows(report.root)}
    assert staging_leftovers(report.root) == []
    # Later, with the server healthy, --only-failed fetches just that series.
    server.set_faults(None)
    server.clear_requests()
    again = download(cart, tmp_path / "dl", api=api, only_failed=True, **FAST, **creds)
    assert again.ok and list(again.results) == [uid]
    assert {r.series_uid for r in server.requests if "getImage" in r.path} == {uid}
    assert_root_clean(report.root, complete=uids, expected=expected)


@pytest.mark.parametrize("advance", [10_000, 100_000], ids=["refresh-grant", "new-login"])
def test_token_expiring_mid_download_costs_no_retry(tmp_path, server, archive, expected,
                                                    advance):
    # noOfrRetry=0: no attempt may be wasted on an expired token. The server's clock jumps
    # past the token's life (10,000 s: the refresh token still works; 100,000 s: it has
    # expired too, so the client must log in again) as soon as the first series is done.
    uids = all_uids(archive)
    engine = make_engine(manifest(tmp_path, server, uids, retries=0), tmp_path / "dl",
                         api="v2", workers=1, **FAST, **login(archive, server))
    jumped = threading.Event()

    def on_event(event) -> None:
        if event.kind == "state" and event.state == SeriesState.COMPLETE \
                and not jumped.is_set():
            jumped.set()
            server.advance_clock(advance)

    engine.subscribe(on_event)
    report = engine.run()
    assert jumped.is_set()
    assert report.ok, report.summary()
    assert all(r.attempts == 1 for r in report.results.values())
    statuses = [r.status for r in server.requests if "getImage" in r.path]
    assert 401 in statuses, "the token never expired: the test proves nothing"
    grants = [r.status for r in server.requests if r.path.endswith("/oauth/token")]
    assert grants.count(200) == 2
    assert_root_clean(report.root, complete=uids, expected=expected)


def test_metadata_calls_survive_an_expired_token(server, archive):
    uids = all_uids(archive)
    with NbiaClient(server.api_url, version="v2",
                    credentials=Credentials("alice", archive.users["alice"]),
                    backoff_base=0.01) as client:
        client.login()
        server.advance_clock(100_000)
        infos = client.series_metadata(uids)
    assert set(infos) == set(uids)
    assert any(r.status == 401 for r in server.requests)


@pytest.mark.parametrize("kind", ["http429", "http503"])
def test_retry_after_is_honoured(tmp_path, server, archive, kind):
    # backoff_base is 10 ms: any wait of 0.4 s or more comes from the server's Retry-After.
    uid = restricted_uid(archive)
    server.set_faults(FaultPlan(script={uid: [f"{kind}:0.4"]}))
    report = download(manifest(tmp_path, server, [uid]), tmp_path / "dl", api="v2", **FAST,
                      **login(archive, server))
    assert report.ok, report.summary()
    calls = [r for r in server.requests if r.series_uid == uid and "getImage" in r.path]
    assert [r.status for r in calls] == [int(kind[4:]), 200]
    assert calls[1].started - calls[0].started >= 0.4


@pytest.mark.parametrize("api", ["v1", "v2", "v4"])
def test_metadata_faults_are_retried(tmp_path, server, archive, expected, api):
    uids = all_uids(archive) if api == "v2" else \
        [s.series_uid for s in archive.series if not s.restricted]
    creds = login(archive, server) if api == "v2" else {}
    server.set_faults(FaultPlan(metadata_script=["http500", "http503:0", "http429:0"]))
    report = download(manifest(tmp_path, server, uids), tmp_path / "dl", api=api, **FAST,
                      **creds)
    assert report.ok, report.summary()
    assert_root_clean(report.root, complete=uids, expected=expected)
    faulted = [r for r in server.requests if r.fault]
    assert len(faulted) == 3


@pytest.mark.parametrize("api", ["v1", "v4"])
def test_metadata_down_for_good_fails_in_one_line_then_resumes(tmp_path, server, archive,
                                                                expected, api):
    # v1 asks per series, so each series fails on its own; v4 asks in one batch, so the
    # run stops. Either way: one line, nothing published, and a re-run finishes.
    uids = [s.series_uid for s in archive.series if not s.restricted]
    server.set_faults(FaultPlan(metadata_script=["http500"] * 50))
    cart = manifest(tmp_path, server, uids)
    report = download_report(cart, tmp_path / "dl", api=api, **FAST)
    assert not report.ok
    if api == "v4":
        assert "HTTP 500" in report.fatal and "\n" not in report.fatal
    else:
        for uid in uids:
            result = report.results[uid]
            assert result.state == SeriesState.ERROR, result
            assert "HTTP 500" in result.error and "\n" not in result.error
    assert_root_clean(report.root, expected=expected)
    server.set_faults(None)
    again = download(cart, tmp_path / "dl", api=api, **FAST)
    assert again.ok, again.summary()
    assert_root_clean(report.root, complete=uids, expected=expected)
