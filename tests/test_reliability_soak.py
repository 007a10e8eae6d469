"""Soak: many series, a fifth of all requests faulted, everything verified at the end.

The fault draws of the reference server depend only on (seed, series, attempt), so a run
is reproducible. Every fault kind is in the mix (resets, short and corrupt zips, 500,
503 and 429 with Retry-After, stalls), on image and metadata requests alike. The small
version runs in the normal suite; the 2,000-series one (``@pytest.mark.slow``, run by
``make soak``) also interrupts the run half-way and resumes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from enginehelpers import downloaded_series, expected_series, write_manifest
from nbia_retriever import download, make_engine
from nbia_retriever.models import SeriesState
from nbia_retriever.server import FaultPlan, ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary
from nbia_retriever.verify import verify_root
from reliability_helpers import assert_root_clean, staging_leftovers

#: 20% of requests: each fault kind gets its share.
PLAN = FaultPlan(seed=3, reset=0.04, short=0.04, corrupt=0.04, http500=0.03, http503=0.02,
                 http429=0.02, stall=0.01, stall_seconds=3, retry_after=0.05, metadata=True)
#: With 20% faults, 9 attempts fail together with probability 0.2**9 (5e-7 per series).
RETRIES = 8


def soak(tmp_path: Path, archive_factory: Callable[..., ArchiveSummary],
         serve: Callable[..., ReferenceServer], *, series_per_study: int, patients: int,
         api: str, login: bool, interrupt_after: int | None = None) -> None:
    archive = archive_factory(seed=81, collections=2, patients=patients, studies=1,
                              series=series_per_study, images=2, rows=8, columns=8,
                              restricted=login, awkward=False)
    uids = [s.series_uid for s in archive.series]
    expected = expected_series(archive.root)
    server = serve(archive.root, faults=PLAN)
    creds = {"user": "alice", "password": archive.users["alice"],
             "api_url": server.api_url} if login else {}
    options = {"api": api, "backoff_base": 0.01, "timeout": 1.0, "workers": 8, **creds}
    cart = write_manifest(tmp_path / "cart.tcia", uids, server.download_url, retries=RETRIES)
    if interrupt_after is not None:
        # Stop the run half-way (as Ctrl-C would), then resume it.
        engine = make_engine(cart, tmp_path / "dl", **options)
        done = threading.Event()
        completed: list[str] = []

        def on_event(event) -> None:
            if event.kind == "state" and event.state == SeriesState.COMPLETE:
                completed.append(event.uid)  # list.append is atomic across threads
                if len(completed) >= interrupt_after:
                    done.set()
                    engine.cancel()

        engine.subscribe(on_event)
        first = engine.run()
        assert done.is_set() and first.cancelled and not first.ok
    report = download(cart, tmp_path / "dl", **options)
    requests = server.requests
    assert report.ok, report.summary()
    images = [r for r in requests if "getImage" in r.path]
    faulted = sum(1 for r in images if r.fault)
    # Close to the planned rate: the fault plan really was in force.
    assert 0.12 <= faulted / len(images) <= 0.28, (faulted, len(images))
    kinds = {r.fault for r in images} - {None}
    assert len(kinds) >= (7 if len(images) > 1000 else 4), kinds
    assert downloaded_series(report.root) == {u: expected[u] for u in uids}
    assert_root_clean(report.root, complete=uids, expected=expected)
    assert staging_leftovers(report.root) == []
    checked = verify_root(report.root)
    assert checked.ok and checked.series == len(uids), checked.problems[:5]


@pytest.mark.parametrize(("api", "login"), [("v1", False), ("v2", True)])
def test_small_soak_with_a_fifth_of_requests_faulted(tmp_path, archive_factory, serve, api,
                                                     login):
    # 60 series (2 collections x 3 patients x 10 series of 2 images).
    soak(tmp_path, archive_factory, serve, series_per_study=10, patients=3, api=api,
         login=login)


@pytest.mark.slow
@pytest.mark.parametrize(("api", "login", "interrupt"), [
    ("v4", False, 1000), ("v1", False, None), ("v2", True, None)])
def test_soak_2000_series_with_a_fifth_of_requests_faulted(tmp_path, archive_factory, serve,
                                                           api, login, interrupt):
    # 2,000 series (2 collections x 100 patients x 10 series of 2 images).
    soak(tmp_path, archive_factory, serve, series_per_study=10, patients=100, api=api,
         login=login, interrupt_after=interrupt)
