"""What the IDC speed work (issue 23, "a transfer that suits object storage") changed in
the engine keeps its guarantees: metadata.csv rows written in groups are each there
once, with one header, whoever wrote them."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

from nbia_retriever.report import METADATA_HEADER, MetadataCsv


def _row(uid: str) -> list[str]:
    return [uid, *[f"{uid}-x"] * (len(METADATA_HEADER) - 1)]


def _read(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return list(csv.reader(handle))


def test_append_many_writes_new_rows_once_with_one_header(tmp_path: Path) -> None:
    path = tmp_path / "metadata.csv"
    first = MetadataCsv(path)
    assert first.append(_row("1.1")) is True
    other = MetadataCsv(path)  # another process's view, behind this one
    assert other.append_many([_row("1.1"), _row("1.2"), _row("1.2"), _row("1.3")]) == [
        False, True, False, True]
    assert first.append_many([_row("1.3"), _row("1.4")]) == [False, True]
    assert first.append_many([_row("1.4")]) == [False]
    rows = _read(path)
    assert rows[0] == list(METADATA_HEADER)
    assert [r[0] for r in rows[1:]] == ["1.1", "1.2", "1.3", "1.4"]


def test_publisher_rows_from_many_threads_each_once(tmp_path: Path) -> None:
    """Group commit: threads publishing at once each find their row in the file when
    add_csv_row returns (another thread may have written it with its own)."""
    from nbia_retriever.engine.publish import Publisher
    from nbia_retriever.models import SeriesInfo

    path = tmp_path / "metadata.csv"
    notes: list[tuple[str, str]] = []
    publisher = Publisher(None, None, None, None, MetadataCsv(path),  # type: ignore[arg-type]
                          note=lambda uid, text: notes.append((uid, text)))  # CSV half only
    barrier = threading.Barrier(16)
    present: list[bool] = []

    def one(n: int) -> None:
        uid = f"1.2.{n}"
        info = SeriesInfo(series_uid=uid, collection="C")
        barrier.wait()
        publisher.add_csv_row(uid, info, f"C/{n}", 0.0, 1, 10)
        present.append(uid in {r[0] for r in _read(path)[1:]})

    threads = [threading.Thread(target=one, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = _read(path)
    assert rows[0] == list(METADATA_HEADER)
    assert sorted(r[0] for r in rows[1:]) == sorted(f"1.2.{n}" for n in range(16))
    assert all(present) and not notes


def test_an_idc_run_starts_with_more_streams_nbia_runs_as_before() -> None:
    from nbia_retriever.engine.options import (
        DEFAULT_MAX_CONNECTIONS,
        IDC_MAX_STREAMS,
        IDC_START_STREAMS,
        DownloadOptions,
    )
    from nbia_retriever.engine.scheduler import INITIAL_STREAMS, ConcurrencyLimiter

    idc = DownloadOptions(source="idc")
    assert (idc.streams_cap, idc.streams_start) == (IDC_MAX_STREAMS, IDC_START_STREAMS)
    limiter = ConcurrencyLimiter(idc.streams_cap, explore=True, initial=idc.streams_start)
    assert limiter.limit == IDC_START_STREAMS > INITIAL_STREAMS
    for options in (DownloadOptions(), DownloadOptions(source="nbia"),
                    DownloadOptions(source="idc", workers=3),
                    DownloadOptions(source="idc", max_connections=DEFAULT_MAX_CONNECTIONS - 1)):
        assert options.streams_start is None  # the controller's own start, as before
    assert ConcurrencyLimiter(16, explore=True, initial=None).limit == INITIAL_STREAMS

