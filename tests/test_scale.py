"""Size must not matter to the user (issue 14): downloads start while metadata is still
arriving, folder names do not depend on how the metadata was batched, and the
interactive view answers keys while the metadata of its rows is loading.

The speed targets themselves are benchmarks (``make bench``, scenario ``scale``); these
tests show the behaviour that makes them possible, with no timing in any assertion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from textual.widgets import DataTable

from nbia_retriever.api import MetadataBatch
from nbia_retriever.engine import DownloadOptions, Engine, Verdict
from nbia_retriever.layout import series_relpath
from nbia_retriever.manifest import Manifest, read_manifest
from nbia_retriever.models import SeriesInfo, SeriesState
from nbia_retriever.server import FaultPlan, ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary
from nbia_retriever.tui import RetrieverApp
from nbia_retriever.tui.app import LOADING

DEADLINE = 30.0


def test_downloads_start_before_the_last_metadata_batch(
        archive_factory: Callable[..., ArchiveSummary],
        serve: Callable[..., ReferenceServer], tmp_path: Path) -> None:
    """70 series over v1: metadata comes in batches of 64. The server answers the first
    64 metadata calls, then holds every later one until it has sent a series zip whole:
    a client that waited for all its metadata before downloading would sit out the
    hold (a minute) and fetch its first zip after the last metadata answer."""
    archive = archive_factory(seed=14, collections=1, patients=35, studies=1, series=2,
                              images=1, awkward=False, restricted=False)
    server = serve(archive.root, faults=FaultPlan(hold_metadata=64))
    manifest = read_manifest(archive.root / "manifest.tcia")
    assert len(manifest.series_uids) == 70
    engine = Engine(manifest, tmp_path, DownloadOptions(api_url=server.api_url, api="v1",
                                                        workers=2, retries=1))
    report = engine.run()
    assert report.count(SeriesState.COMPLETE) == 70, report.summary()
    log = server.requests
    metadata = [r for r in log if r.path.endswith("/getSeriesMetaData")]
    images = [r for r in log if "/getImage" in r.path and r.status == 200]
    assert len(metadata) == 70 and len(images) == 70
    first_zip_done = min(r.started + r.duration for r in images)
    last_metadata_done = max(r.started + r.duration for r in metadata)
    assert first_zip_done < last_metadata_done
    # The held answers were released by that zip, not by the server's time limit.
    assert max(r.duration for r in metadata) < 30


# ----------------------------------------------------------------------------- batches

def _info(uid: str, number: str, study: str = "1.2.3.4.5") -> SeriesInfo:
    return SeriesInfo(series_uid=uid, collection="C", patient_id="P", study_uid=study,
                      study_date="2001-02-03", study_description="Chest",
                      series_number=number, series_description="Axial", image_count=1,
                      file_size=10)


class BatchedSource:
    """A Source whose metadata arrives in the given batch sizes, each batch's answers
    computed in the given order (what concurrent v1 calls or a slow v4 POST do)."""

    name = "batched"

    def __init__(self, infos: dict[str, SeriesInfo], sizes: Sequence[int],
                 reverse: bool) -> None:
        self.infos, self.sizes, self.reverse = infos, sizes, reverse

    def check(self) -> None:
        pass

    def prepare(self) -> None:
        pass

    def metadata_batches(self, uids: Sequence[str]) -> Iterator[MetadataBatch]:
        start = 0
        for size in self.sizes:
            part = list(uids[start:start + size])
            start += size
            order = reversed(part) if self.reverse else part
            yield MetadataBatch(part, {u: self.infos[u] for u in order})

    def unavailable(self, uid: str) -> tuple[SeriesState, str]:
        return SeriesState.NO_DATA, "none"

    def open(self, info: SeriesInfo) -> Iterator[object]:
        raise AssertionError("planning only")

    def verdict(self, error: Exception) -> Verdict:
        return Verdict(retry=False)

    def close(self) -> None:
        pass


def _folders(tmp: Path, infos: dict[str, SeriesInfo], sizes: Sequence[int],
             reverse: bool) -> dict[str, str]:
    manifest = Manifest(series_uids=tuple(infos), headers={"databasketId": "b.tcia"},
                        source=None, duplicates_dropped=0)
    engine = Engine(manifest, tmp, DownloadOptions(),
                    source=BatchedSource(infos, sizes, reverse))  # type: ignore[arg-type]
    engine.prepare()
    try:
        return {uid: engine.folder_of(uid) for uid in infos}
    finally:
        engine.close()


def test_folder_names_do_not_depend_on_batching(tmp_path: Path) -> None:
    """Series 2 and 9 would share a Java folder (same study, number, description and
    last five UID characters); they sit in different batches. Whatever the batch sizes
    and the order answers came in, the first in manifest order keeps the Java name."""
    uids = [f"1.2.826.0.1.{n}.77777" if n in (2, 9) else f"1.2.826.0.1.{n}.{n:05d}"
            for n in range(12)]
    infos = {u: _info(u, "1" if i in (2, 9) else str(i + 10)) for i, u in enumerate(uids)}
    java = str(series_relpath(infos[uids[2]]))
    assert java == str(series_relpath(infos[uids[9]]))  # the clash is real
    runs = [_folders(tmp_path / "a", infos, [12], False),
            _folders(tmp_path / "b", infos, [5, 5, 2], True),
            _folders(tmp_path / "c", infos, [1] * 12, True),
            _folders(tmp_path / "d", infos, [3, 9], False)]
    assert all(run == runs[0] for run in runs[1:])
    assert runs[0][uids[2]] == java
    assert runs[0][uids[9]] != java and runs[0][uids[9]].endswith(uids[9])
    assert len(set(runs[0].values())) == 12


# ----------------------------------------------------------------------------- the view

@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_view_answers_keys_while_metadata_loads(
        archive_factory: Callable[..., ArchiveSummary],
        serve: Callable[..., ReferenceServer], tmp_path: Path) -> None:
    """The server holds every metadata answer (nothing is being downloaded, so it never
    lets go while the test runs): the rows show at once with their UIDs, a row can be
    deleted, and ``q`` quits, all while the metadata is still loading."""
    archive = archive_factory(seed=15, collections=1, patients=3, studies=1, series=2,
                              images=1, awkward=False, restricted=False)
    server = serve(archive.root, faults=FaultPlan(hold_metadata=0))
    manifest = read_manifest(archive.root / "manifest.tcia")
    app = RetrieverApp(manifest, tmp_path, DownloadOptions(api_url=server.api_url),
                       show_rates=False)
    async with app.run_test(size=(130, 36)) as pilot:
        table = app.query_one("#table", DataTable)
        deadline = time.monotonic() + DEADLINE
        while table.row_count < 6 or not any(
                p.lower().endswith("getseriesmetadata") for p in server.in_flight()):
            assert time.monotonic() < deadline, "rows or the metadata request never came"
            await pilot.pause(0.01)
        assert app.phase == LOADING
        first = manifest.series_uids[0]
        table.move_cursor(row=table.get_row_index(first))
        await pilot.press("delete")
        assert table.row_count == 5 and first in app.removed
        assert app.phase == LOADING
        await pilot.press("q")
        deadline = time.monotonic() + DEADLINE
        while app.is_running:
            assert time.monotonic() < deadline, "q did not quit"
            await pilot.pause(0.01)
    assert not (tmp_path / "manifest").exists()  # nothing was written: nothing started
