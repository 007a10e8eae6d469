"""The source registry: a source added in one module of the test suite
(``folder_source.py``) and one registration downloads through the engine, on threads and
in worker processes, and every series says where it came from (journal, JSON events,
report, data frame)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

import folder_source
from enginehelpers import downloaded_series, expected_series, start_workers
from nbia_retriever import make_engine
from nbia_retriever.engine import EventKind
from nbia_retriever.engine.journal import Journal
from nbia_retriever.engine.source import SOURCES, register_source
from nbia_retriever.errors import UsageError
from nbia_retriever.models import SeriesState
from nbia_retriever.server.synth import ArchiveSummary


@pytest.fixture
def folder(synthetic_archive: ArchiveSummary) -> Iterator[ArchiveSummary]:
    register_source("folder", folder_source.factory(synthetic_archive.root))  # the one line
    yield synthetic_archive
    SOURCES.pop("folder", None)


@pytest.mark.parametrize("processes", [0, 1])
def test_a_source_added_in_one_module_downloads_on_threads_and_in_worker_processes(
        folder: ArchiveSummary, tmp_path: Path, processes: int) -> None:
    uids = [s.series_uid for s in folder.series]
    engine = make_engine(uids, tmp_path, source="folder", processes=processes, workers=2)
    if processes:
        start_workers(engine)
    events: list[dict[str, object]] = []
    engine.subscribe(lambda e: events.append(json.loads(json.dumps(e.as_dict()))))
    report = engine.run()
    assert report.ok, report.summary()
    assert downloaded_series(report.root) == expected_series(folder.root)
    # Every attempt ran where it was asked to: all in the worker, or none.
    assert engine.stats().worker_attempts == (len(uids) if processes else 0)
    # Where each series came from: the report, the data frame, the events, the journal.
    assert {r.source for r in report.results.values()} == {"folder"}
    frame = report.to_dataframe()
    assert set(frame["source"]) == {"folder"} and len(frame) == len(uids)
    series_events = [e for e in events if e.get("uid")]
    assert series_events and all(e["source"] == "folder" for e in series_events)
    assert {e["uid"] for e in series_events if e["event"] == EventKind.STATE.value
            and e.get("state") == SeriesState.COMPLETE.value} == set(uids)
    (journal_path,) = engine.disk.journal_paths()
    with Journal(journal_path, readonly=True) as journal:
        entries = list(journal.entries())
    assert len(entries) == len(uids) and {e.source for e in entries} == {"folder"}
    # The source's own rules checked every series (in the engine's process, either way).
    assert sorted(engine.source.checked) == sorted(uids)  # type: ignore[attr-defined]


def test_an_nbia_run_says_nbia_and_an_unknown_source_is_refused_naming_the_known_ones(
        tmp_path: Path) -> None:
    engine = make_engine(["1.2.3"], tmp_path)
    assert engine.source_name == "nbia" and engine.results["1.2.3"].source == "nbia"
    engine.close()
    with pytest.raises(UsageError, match=r"unknown source 'nope'; known: .*nbia"):
        make_engine(["1.2.3"], tmp_path, source="nope")  # at once, not at the first download


def test_a_journal_from_before_the_source_column_reads_as_nbia_and_gets_the_column(
        tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with sqlite3.connect(path) as db:  # the columns of the first release
        db.execute("CREATE TABLE series (uid TEXT PRIMARY KEY, state TEXT NOT NULL,"
                   " attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',"
                   " relpath TEXT NOT NULL DEFAULT '', metadata TEXT NOT NULL DEFAULT '',"
                   " files TEXT NOT NULL DEFAULT '', bytes INTEGER NOT NULL DEFAULT 0,"
                   " updated REAL NOT NULL DEFAULT 0, completed REAL NOT NULL DEFAULT 0)"
                   " WITHOUT ROWID")
        db.execute("INSERT INTO series (uid, state) VALUES ('1.2.3', 'Error')")
    db.close()
    with Journal(path, readonly=True) as journal:  # read-only: no migration
        assert [e.source for e in journal.entries()] == ["nbia"]
    with Journal(path, source="folder") as journal:  # migrated: old rows are NBIA's
        assert [e.source for e in journal.entries()] == ["nbia"]
        journal.set_state("1.2.3", "Error", error="again")
        journal.ensure(["1.2.4"], "Not started")
        assert {e.uid: e.source for e in journal.entries()} == {"1.2.3": "folder",
                                                                 "1.2.4": "folder"}
