"""The view with a DRS/PathDB sheet (issue 24: "list and open show them like series"),
driven with Textual's Pilot against our Gen3/PathDB servers over real HTTP on 127.0.0.1:
every row of the sheet is a row of the table, named as people know it, and Start fetches
them into the tree. Waiting is for a condition the user could see, with a deadline.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nbia_retriever.engine import DownloadOptions
from nbia_retriever.manifest import read_manifest
from nbia_retriever.models import SeriesState
from nbia_retriever.server.gen3 import Gen3Server
from nbia_retriever.tui import RetrieverApp
from nbia_retriever.tui.app import FINISHED, READY
from tui_helpers import wait_for

if TYPE_CHECKING:
    from gen3_fixtures import Gen3Archive

pytestmark = pytest.mark.anyio
DEADLINE = 60.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config" / "config.toml"
    monkeypatch.setenv("NBIA_RETRIEVER_CONFIG", str(path))
    return path


def sheet(path: Path, archive: Gen3Archive, gen3: Gen3Server) -> Path:
    host = gen3.url.split("://", 1)[1]
    rows = [["drs_uri", "imageUrl", "name", "collection", "patient_id", "file_size_bytes"]]
    rows += [[f"drs://{host}/{o.object_id}", "", o.name, o.collection, o.patient_id,
              str(o.size)] for o in archive.objects]
    rows += [["", f"{gen3.pathdb_url}/system/files/{s.url_path}", s.name, s.collection,
              s.patient_id, ""] for s in archive.slides]
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


async def test_the_view_shows_every_row_of_a_drs_and_pathdb_sheet_and_fetches_them(
        tmp_path: Path, gen3_archive: Gen3Archive, gen3_server: Gen3Server,
        gen3_creds: Path) -> None:
    manifest = read_manifest(sheet(tmp_path / "files.csv", gen3_archive, gen3_server))
    options = DownloadOptions(auth=str(gen3_creds), gen3_endpoint=gen3_server.url,
                              accept_data_policy=True, workers=2, retries=1,
                              backoff_base=0.01, timeout=20)
    app = RetrieverApp(manifest, tmp_path / "dl", options, show_rates=False)
    keys = set(manifest.keys)
    assert len(keys) == len(gen3_archive.objects) + len(gen3_archive.slides)
    async with app.run_test(size=(160, 40)) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the rows described",
                       within=DEADLINE)
        assert set(app.rows) == keys
        # A file's row says its file name where a series says its description.
        report = gen3_archive.files[0]
        row = app.rows[next(k for k in keys if k.endswith(report.object_id))]
        cells = row.cells or app._cells(row)
        assert any(report.name in str(c.text) for c in cells.values()), cells
        await pilot.press("s")
        await wait_for(pilot, lambda: app.phase == FINISHED, "the run's end", within=DEADLINE)
        assert {r.state for r in app.engine.results.values()} == {SeriesState.COMPLETE}
    root = tmp_path / "dl" / "files"
    for item in [*gen3_archive.files, *gen3_archive.slides]:
        got = root / item.collection / item.patient_id / item.name
        assert got.read_bytes() == item.path.read_bytes()
