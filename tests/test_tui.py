"""The downloads window, driven like a user would (Textual's Pilot: keys and clicks),
against the real reference server over HTTP on 127.0.0.1.

Waiting is always for a condition the user could see (a phase, a row's status), polled
between UI frames and bounded by a generous deadline; never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from textual.widgets import Button, DataTable, Input, Label, Static

from nbia_retriever.engine import DownloadOptions, Engine
from nbia_retriever.manifest import read_manifest
from nbia_retriever.models import SeriesInfo, SeriesState
from nbia_retriever.server import FaultPlan, ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary
from nbia_retriever.tui import RetrieverApp
from nbia_retriever.tui.app import FINISHED, READY, RUNNING
from nbia_retriever.tui.cells import (
    Cell,
    human_size,
    progress_cell,
    progress_fraction,
    row_cells,
    short_uid,
    text_cell,
    uid_key,
)
from nbia_retriever.tui.screens import (
    ConfirmQuitScreen,
    DestinationScreen,
    FolderTree,
    LoginScreen,
    SaveReportScreen,
)
from tui_helpers import DEADLINE, wait_for

pytestmark = pytest.mark.anyio  # async tests run on anyio's pytest plugin (asyncio)

SIZE = (130, 36)
#: Bytes/s per zip stream: a ~38 KB series takes about a second, long enough to pause it.
SLOW = 40_000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    """4 public series (collection A) + 4 restricted ones (collection B, alice only)."""
    return archive_factory(seed=11, collections=2, patients=2, studies=1, series=2, images=4,
                           awkward=False)


@pytest.fixture
def server(archive: ArchiveSummary, serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    return serve(archive.root)


def make_app(archive: ArchiveSummary, server: ReferenceServer, dest: Path, *,
             manifest: str = "manifest.tcia", workers: int = 2, retries: int = 1,
             show_rates: bool = False, **kwargs: object) -> RetrieverApp:
    options = DownloadOptions(api_url=server.api_url, workers=workers, retries=retries,
                              backoff_base=0.01, timeout=20)
    return RetrieverApp(read_manifest(archive.root / manifest), dest, options,
                        show_rates=show_rates, **kwargs)  # type: ignore[arg-type]


def states(app: RetrieverApp) -> dict[str, str]:
    return {uid: row.state for uid, row in app.rows.items()}


def table_order(app: RetrieverApp) -> list[str]:
    table = app.query_one("#table", DataTable)
    return [str(row.key.value) for row in table.ordered_rows]


def image_requests(server: ReferenceServer) -> list[str]:
    return [r.series_uid or "" for r in server.requests if "getImage" in r.path]


def button(app: RetrieverApp, button_id: str) -> Button:
    return app.query_one(f"#{button_id}", Button)


# -- pure formatting ----------------------------------------------------------------------


def test_cells_format_and_sort() -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    assert short_uid(uid) == "…901234567890"
    assert short_uid("1.2.3") == "1.2.3"
    assert uid_key("1.2.10") > uid_key("1.2.9")  # numbers, not text
    assert human_size(None) == "" and human_size(999) == "999 B"
    assert human_size(38_123) == "38.1 KB"
    # Network text is shown verbatim, never as console markup.
    assert Cell("[bold]P1[/bold]").__rich__().plain == "[bold]P1[/bold]"
    assert text_cell("x" * 40).text.endswith("…") and len(text_cell("x" * 40).text) == 24
    assert text_cell("") > text_cell("zzz")  # unknown sorts after known
    assert progress_fraction(SeriesState.COMPLETE, 0, None) == 1.0
    assert progress_fraction(SeriesState.DOWNLOADING, 50, 200) == 0.25
    assert progress_fraction(SeriesState.DOWNLOADING, 500, 200) == 1.0
    assert progress_fraction(SeriesState.ERROR, 50, 200) is None
    assert progress_cell(0.5).text == "█████░░░░░  50%"
    info = SeriesInfo(series_uid=uid, collection="C", patient_id="P", image_count=7,
                      file_size=10_000)
    cells = row_cells(uid, info, SeriesState.PAUSED, 5_000, marked=True)
    assert cells["mark"].text == "●" and cells["images"].text == "7"
    assert cells["size"].text == "10.0 KB" and cells["status"].text == "Paused"
    small = row_cells(uid, SeriesInfo(series_uid=uid, file_size=999), "Queued", 0, False)
    assert small["size"] < cells["size"]  # sorts by bytes, not by the text "999 B"


# -- the main flow ----------------------------------------------------------------------


async def test_remove_start_pause_resume_finish(archive: ArchiveSummary,
                                                server: ReferenceServer,
                                                tmp_path: Path) -> None:
    manifest = archive.root / "manifest.tcia"
    manifest_bytes = manifest.read_bytes()
    server.set_faults(FaultPlan(bandwidth=SLOW))
    app = make_app(archive, server, tmp_path / "dl", workers=2)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        uids = list(app.rows)
        assert len(uids) == 4
        assert set(states(app).values()) == {SeriesState.NOT_STARTED}
        assert "4 to download" in app.message
        table = app.query_one("#table", DataTable)
        assert table.row_count == 4
        # The detail panel shows the full UIDs of the highlighted row.
        await pilot.press("down")
        detail = str(app.query_one("#detail").render())
        assert uids[1] in detail and app.rows[uids[1]].info.study_uid in detail  # type: ignore[union-attr]

        # Mark row 2 with space, delete it.
        assert table.cursor_row == 1
        await pilot.press("space")
        assert app.rows[uids[1]].marked
        await pilot.press("delete")
        assert uids[1] not in app.rows and table.row_count == 3
        assert "Removed 1 series" in app.message

        await pilot.press("s")
        assert app.phase == RUNNING
        assert button(app, "start").disabled and not button(app, "pause").disabled
        assert app.query_one("#dest", Input).disabled  # settings are frozen while running
        await wait_for(pilot, lambda: SeriesState.DOWNLOADING in states(app).values(),
                       "a download to start")

        await pilot.press("p")
        assert app.engine.paused and "Paused" in app.message
        assert button(app, "pause").disabled and not button(app, "resume").disabled
        # Running series hold at their next chunk; nothing new starts.
        await wait_for(pilot, lambda: SeriesState.DOWNLOADING not in states(app).values(),
                       "the downloads to hold")
        assert set(states(app).values()) & {SeriesState.PAUSED, SeriesState.QUEUED}

        await pilot.click("#resume")
        assert not app.engine.paused
        await wait_for(pilot, lambda: app.phase == FINISHED, "the run to finish")
        assert set(states(app).values()) == {SeriesState.COMPLETE}
        assert app.message.startswith("Finished: 3 of 3")
        assert button(app, "retry").disabled and button(app, "report").disabled
        assert "100%" in str(table.get_cell(uids[0], "progress").__rich__())

    assert uids[1] not in image_requests(server)
    assert sorted(set(image_requests(server))) == sorted(u for u in uids if u != uids[1])
    assert manifest.read_bytes() == manifest_bytes  # deleting rows never edits the manifest
    root = app.engine.root
    assert len((root / "metadata.csv").read_text().splitlines()) == 1 + 3


async def test_failure_retry_and_error_report(archive: ArchiveSummary, server: ReferenceServer,
                                              tmp_path: Path) -> None:
    manifest = read_manifest(archive.root / "manifest.tcia")
    bad = manifest.series_uids[2]
    # Two short zips: past the budget of retries=1 (2 attempts); the retry run's
    # attempt 3 is clean.
    server.set_faults(FaultPlan(script={bad: ["short:1", "short:1"]}))
    app = make_app(archive, server, tmp_path / "dl", retries=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")  # pressed while the metadata loads: starts when ready
        await wait_for(pilot, lambda: app.phase == FINISHED, "the run to finish")
        assert states(app)[bad] == SeriesState.ERROR
        assert "short zip" in app.rows[bad].error and app.rows[bad].attempts == 2
        assert "1 not downloaded" in app.message
        assert not button(app, "retry").disabled and not button(app, "report").disabled

        # The detail panel shows the last error of the highlighted row.
        app.query_one("#table", DataTable).move_cursor(row=2)
        await pilot.pause()
        assert "short zip" in str(app.query_one("#detail").render())

        await pilot.press("e")
        assert isinstance(app.screen, SaveReportScreen)
        path_input = app.screen.query_one("#path", Input)
        assert path_input.value == str(app.engine.root / "error-report.csv")
        report = tmp_path / "errors.csv"
        path_input.value = str(report)
        await pilot.press("enter")
        assert not isinstance(app.screen, SaveReportScreen)
        rows = list(csv.DictReader(report.open(encoding="utf-8")))
        assert [(r["Series Instance UID"], r["Status"]) for r in rows] == [(bad, "Error")]
        assert "short zip" in rows[0]["Error"] and rows[0]["Attempts"] == "2"

        before = len(image_requests(server))
        await pilot.press("f")
        await wait_for(pilot, lambda: app.phase == FINISHED, "the retry to finish")
        assert set(states(app).values()) == {SeriesState.COMPLETE}
        assert image_requests(server)[before:] == [bad]  # only the failed series again
        assert app.engine.options.only_failed
        assert button(app, "retry").disabled


async def test_existing_journal_shows_complete_series(archive: ArchiveSummary,
                                                      server: ReferenceServer,
                                                      tmp_path: Path) -> None:
    manifest = read_manifest(archive.root / "manifest.tcia")
    done = list(manifest.series_uids[:2])
    first = Engine(manifest, tmp_path, DownloadOptions(api_url=server.api_url))
    first.remove(manifest.series_uids[2:])
    assert first.run().ok
    server.clear_requests()

    app = make_app(archive, server, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        assert [states(app)[u] for u in manifest.series_uids] == [
            SeriesState.COMPLETE, SeriesState.COMPLETE,
            SeriesState.NOT_STARTED, SeriesState.NOT_STARTED]
        assert "2 already complete" in app.message and "2 to download" in app.message
        for uid in done:  # finished rows carry their metadata, from the journal
            row = app.rows[uid]
            assert row.info is not None and row.info.collection and row.info.patient_id
        await pilot.click("#start")
        await wait_for(pilot, lambda: app.phase == FINISHED, "the run to finish")
        assert set(states(app).values()) == {SeriesState.COMPLETE}
    assert set(image_requests(server)) == set(manifest.series_uids[2:])
    assert not set(done) & set(image_requests(server))


async def test_q_and_ctrl_c_ask_before_stopping_downloads(archive: ArchiveSummary,
                                                         serve: Callable[..., ReferenceServer],
                                                         tmp_path: Path) -> None:
    # Every series' stream stalls: nothing can complete before "q, y", however slow the
    # machine (and cancel must cut the stalled sockets for the app to quit at all).
    stalled = FaultPlan(script={s.series_uid: ["stall:600"] * 10 for s in archive.series})
    slow = serve(archive.root, faults=stalled)
    app = make_app(archive, slow, tmp_path / "dl")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        assert not (tmp_path / "dl").exists()  # nothing on disk before Start
        await pilot.press("s")
        await wait_for(pilot, lambda: any(r.state == SeriesState.DOWNLOADING
                                          for r in app.engine.results.values()), "a download")
        for key in ("q", "ctrl+c"):
            await pilot.press(key)
            assert isinstance(app.screen, ConfirmQuitScreen), key
            await pilot.press("n")  # keep downloading
            assert not isinstance(app.screen, ConfirmQuitScreen)
            assert app.is_running and app.phase == RUNNING and not app.engine.cancelled
        await pilot.press("q")
        await pilot.press("y")
        deadline = time.monotonic() + DEADLINE
        while app.is_running:  # the app is gone: poll it, not its screens
            assert time.monotonic() < deadline, "q, y did not quit"
            await asyncio.sleep(0.01)
    assert app.engine.cancelled
    assert app.engine.report.count(SeriesState.COMPLETE) < len(app.rows)


def test_speed_and_eta_are_honest() -> None:
    from nbia_retriever.tui.cells import EMPTY, speed_and_eta

    steady = [(t, 1000.0 * t) for t in range(6)]
    assert speed_and_eta(steady, 10_000, active=True) == ("1.0 KB/s", "0:05")
    stalled = [*steady, (8.0, 5000.0), (9.0, 5000.0)]  # no byte for 4 s
    speed, eta = speed_and_eta(stalled, 10_000, active=True)
    assert eta == EMPTY and not speed.startswith("-")
    dropped = [(0.0, 5000.0), (1.0, 4000.0)]  # cannot happen (monotonic), still not < 0
    assert speed_and_eta(dropped, 10_000, active=True) == ("0 B/s", EMPTY)
    assert speed_and_eta(steady, 10_000, active=False) == (EMPTY, EMPTY)  # finished
    assert speed_and_eta(steady, 0, active=True)[1] == EMPTY  # no total, no ETA


async def test_speed_and_eta_are_cleared_when_finished(archive: ArchiveSummary,
                                                       server: ReferenceServer,
                                                       tmp_path: Path) -> None:
    app = make_app(archive, server, tmp_path, show_rates=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("s")
        await wait_for(pilot, lambda: app.phase == FINISHED, "the end")
        text = str(app.query_one("#rates", Label).render())
        assert text.endswith("· — · ETA —"), text


async def test_detail_prints_series_numbers_one_way(archive: ArchiveSummary,
                                                    server: ReferenceServer,
                                                    tmp_path: Path) -> None:
    from nbia_retriever.layout import format_series_number

    app = make_app(archive, server, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        info = app.rows[app._cursor_uid() or ""].info
        assert info is not None and info.series_number
        detail = str(app.query_one("#detail", Static).render())
        assert f"#{format_series_number(info.series_number)} " in detail


async def test_a_root_of_the_other_layout_gets_advice_for_the_view(
        archive: ArchiveSummary, server: ReferenceServer, tmp_path: Path) -> None:
    manifest = read_manifest(archive.root / "manifest.tcia")
    first = Engine(manifest, tmp_path, DownloadOptions(api_url=server.api_url,
                                                       layout="classic"))
    first.remove(manifest.series_uids[1:])
    assert first.run().ok
    app = make_app(archive, server, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("s")
        await wait_for(pilot, lambda: app.phase == FINISHED, "the refusal")
        assert "classic layout" in app.message and "(y)" in app.message
        assert "--" not in app.message
        for row in app.rows.values():
            assert "--" not in row.error


async def test_cancel_then_start_again(archive: ArchiveSummary, server: ReferenceServer,
                                       tmp_path: Path) -> None:
    server.set_faults(FaultPlan(bandwidth=SLOW))
    app = make_app(archive, server, tmp_path, workers=1)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("s")
        await wait_for(pilot, lambda: SeriesState.DOWNLOADING in states(app).values(),
                       "a download to start")
        await pilot.press("c")
        await wait_for(pilot, lambda: app.phase == FINISHED, "the cancel")
        assert app.message.startswith("Cancelled")
        assert SeriesState.CANCELLED in states(app).values()
        assert not button(app, "start").disabled
        server.set_faults(None)
        await pilot.press("s")
        await wait_for(pilot, lambda: app.phase == FINISHED and not app.engine.report.cancelled,
                       "the second run")
        assert set(states(app).values()) == {SeriesState.COMPLETE}


# -- table ------------------------------------------------------------------------------


async def test_sort_by_key_and_header_click(archive: ArchiveSummary, server: ReferenceServer,
                                            tmp_path: Path) -> None:
    app = make_app(archive, server, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        manifest_order = table_order(app)

        def descriptions() -> list[str]:
            return [app.rows[u].info.series_description.casefold()  # type: ignore[union-attr]
                    for u in table_order(app)]

        table = app.query_one("#table", DataTable)
        # 130 columns: mark, Patient ID, Study Date, Modality, Series Description, ...
        assert [str(c.key.value) for c in table.ordered_columns][:5] == [
            "mark", "patient", "date", "modality", "description"]
        x = sum(c.get_render_width(table) for c in table.ordered_columns[:4]) + 2
        await pilot.click("#table", offset=(x, 0))  # the "Series Description" header
        assert app._sort == ("description", False)
        assert descriptions() == sorted(descriptions())
        await pilot.click("#table", offset=(x, 0))  # again: descending
        assert descriptions() == sorted(descriptions(), reverse=True)
        await pilot.press("o")  # keyboard: next column
        assert app._sort == ("images", False)
        await pilot.press("o", "o", "o")  # progress, status, then wraps round to Patient ID
        assert app._sort == ("patient", False)
        patients = [app.rows[u].info.patient_id for u in manifest_order]  # type: ignore[union-attr]
        assert [app.rows[u].info.patient_id for u in table_order(app)] == sorted(patients)  # type: ignore[union-attr]
        await pilot.press("v")
        assert [app.rows[u].info.patient_id for u in table_order(app)] == sorted(  # type: ignore[union-attr]
            patients, reverse=True)


async def test_a_window_of_rows_pages_through_them_all(archive: ArchiveSummary,
                                                       server: ReferenceServer,
                                                       tmp_path: Path) -> None:
    """The table holds a window of rows (200,000 would not fit): with a window of 2 of
    the 4 rows, the cursor keys still reach every series, in order, and sorting or
    removing works on all rows, not only those in the window."""
    app = make_app(archive, server, tmp_path)
    app.page_size = 2
    manifest = list(app.manifest.series_uids)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        table = app.query_one("#table", DataTable)
        assert len(manifest) == 4 and table.row_count == 2 and len(app.order) == 4
        seen = [app._cursor_uid()]
        for _ in range(3):
            await pilot.press("down")
            seen.append(app._cursor_uid())
        assert seen == manifest  # down past the window's end slides it
        await pilot.press("down")
        assert app._cursor_uid() == manifest[-1]  # the real end
        for _ in range(3):
            await pilot.press("up")
        assert app._cursor_uid() == manifest[0]
        await pilot.press("ctrl+end")
        assert app._cursor_uid() == manifest[-1]
        assert "rows 3–4 of 4" in str(app.query_one("#counts", Label).render())
        await pilot.press("ctrl+home")
        assert app._cursor_uid() == manifest[0]
        app.sort_by("series", reverse=True)  # the whole list, not the window
        from nbia_retriever.tui.cells import uid_key

        assert app.order == sorted(manifest, key=uid_key, reverse=True)
        assert table_order(app) == app.order[:2]
        last = app.order[-1]
        app.go_to(last)
        assert app._cursor_uid() == last
        await pilot.press("delete")  # a row outside the first window
        assert last not in app.rows and len(app.order) == 3
        assert app._cursor_uid() == app.order[-1]


async def test_mark_all_and_remove_with_mouse(archive: ArchiveSummary, server: ReferenceServer,
                                              tmp_path: Path) -> None:
    app = make_app(archive, server, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        second = table_order(app)[1]
        await pilot.click("#table", offset=(4, 2))  # a click highlights the row...
        assert app._cursor_uid() == second and not app.rows[second].marked
        await pilot.click("#table", offset=(4, 2))  # ...a click on the highlighted row marks
        assert app.rows[second].marked
        await pilot.click("#table", offset=(4, 2))
        assert not app.rows[second].marked
        await pilot.press("a")
        assert all(r.marked for r in app.rows.values())
        await pilot.press("a")
        assert not any(r.marked for r in app.rows.values())
        await pilot.press("space", "space")
        await pilot.click("#remove")
        assert len(app.rows) == 2
        await pilot.press("s")
        await wait_for(pilot, lambda: app.phase == FINISHED, "the run to finish")
        assert set(states(app).values()) == {SeriesState.COMPLETE}
        assert len(app.engine.results) == 2
    assert len(set(image_requests(server))) == 2


# -- settings -----------------------------------------------------------------------------


async def test_destination_picker_and_layout(archive: ArchiveSummary, server: ReferenceServer,
                                             tmp_path: Path) -> None:
    (tmp_path / "picked").mkdir()
    (tmp_path / "a-file.txt").write_text("x")
    app = make_app(archive, server, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("d")
        screen = app.screen
        assert isinstance(screen, DestinationScreen)
        path_input = screen.query_one("#path", Input)
        assert screen.focused is path_input  # type or paste a folder at once
        assert path_input.cursor_position == len(path_input.value)
        tree = screen.query_one(FolderTree)
        await pilot.press("shift+tab")  # then the tree, above it
        assert screen.focused is tree
        await wait_for(pilot, lambda: any(n.data and n.data.path.name == "picked"
                                          for n in tree.root.children), "the folder tree")
        names = {n.data.path.name for n in tree.root.children if n.data}
        assert "a-file.txt" not in names  # folders only
        node = next(n for n in tree.root.children if n.data and n.data.path.name == "picked")
        tree.move_cursor(node)
        await pilot.press("enter")
        assert screen.query_one("#path", Input).value == str(tmp_path / "picked")
        await pilot.click("#ok")
        assert app.dest == tmp_path / "picked"
        assert app.query_one("#dest", Input).value == str(tmp_path / "picked")
        await wait_for(pilot, lambda: app.phase == READY, "the new destination")

        # Typed destination + Enter, and the layout by key.
        dest_input = app.query_one("#dest", Input)
        dest_input.focus()
        dest_input.value = str(tmp_path / "typed")
        await pilot.press("enter")
        assert app.dest == tmp_path / "typed"
        await pilot.press("y")
        assert app.layout_name == "classic"
        await wait_for(pilot, lambda: app.phase == READY, "the new destination")
        await pilot.press("s")
        await wait_for(pilot, lambda: app.phase == FINISHED, "the run to finish")
        assert app.engine.options.layout == "classic"
    root = app.engine.root
    assert root.parent == tmp_path / "typed"
    # Classic layout: Collection/Patient/StudyUID/SeriesUID.
    for uid in app.rows:
        assert list(root.glob(f"*/*/*/{uid}/*.dcm"))


async def test_login_unlocks_restricted_series(archive: ArchiveSummary,
                                               server: ReferenceServer, tmp_path: Path) -> None:
    restricted = {s.series_uid for s in archive.series if s.restricted}
    password = archive.users["alice"]
    app = make_app(archive, server, tmp_path, manifest="manifest-all.tcia")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        assert {states(app)[u] for u in restricted} == {SeriesState.NOT_AUTHORIZED}
        assert "l: log in" in app.message

        await pilot.press("l")
        assert isinstance(app.screen, LoginScreen)
        host = server.api_url.split("/")[2]
        assert f"goes to {host} only" in str(app.screen.query_one("#login-host", Label).render())
        await pilot.press(*"alice", "enter", *password)
        field = app.screen.query_one("#password", Input)
        assert field.password and field.value == password
        assert password not in app.export_screenshot()  # masked on screen
        await pilot.press("enter")
        assert not isinstance(app.screen, LoginScreen)
        assert app.credentials is not None and app.credentials.username == "alice"
        assert password not in repr(app.engine.options)
        await wait_for(pilot, lambda: app.phase == READY, "the metadata after login")
        assert {states(app)[u] for u in restricted} == {SeriesState.NOT_STARTED}
        assert "as alice" in str(app.query_one("#user").render())

        # A wrong password says so on the status line; the table stays usable.
        await pilot.press("l", *"x", "enter")
        await wait_for(pilot, lambda: app.phase == READY, "the refused login")
        assert "Login refused, nothing changed (as alice)" in app.message  # issue 25
        assert app.credentials is not None and app.credentials.password == password
        assert password not in app.export_screenshot()


# -- the command --------------------------------------------------------------------------


def test_open_command_builds_the_app(archive: ArchiveSummary, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from nbia_retriever.cli import main

    seen: list[RetrieverApp] = []
    monkeypatch.setattr(RetrieverApp, "run", lambda self, *a, **k: seen.append(self))
    monkeypatch.setenv("NBIA_PASSWORD", "pw-from-env")
    runner = CliRunner()
    manifest = str(archive.root / "manifest.tcia")
    result = runner.invoke(main, ["open", manifest, "-d", str(tmp_path), "--api-url",
                                  "http://127.0.0.1:9/nbia-api/services", "--api", "v1",
                                  "--user", "alice", "--workers", "7", "--layout", "classic"])
    assert result.exit_code == 0, result.output
    app = seen[0]
    assert app.dest == tmp_path and app.layout_name == "classic"
    assert app.options.workers == 7 and app.options.api == "v1"
    assert app.options.api_url == "http://127.0.0.1:9/nbia-api/services"
    assert app.credentials is not None and app.credentials.password == "pw-from-env"
    assert app.ask_login is None and app.sub_title == "manifest.tcia"

    monkeypatch.delenv("NBIA_PASSWORD")
    monkeypatch.setattr("nbia_retriever.tui.command.stored_password",
                        lambda host, user: None)
    result = runner.invoke(main, ["open", manifest, "--user", "bob"])
    assert result.exit_code == 0 and seen[1].ask_login == "bob"
    assert seen[1].credentials is None  # asked in the window, not on the terminal

    result = runner.invoke(main, ["open", str(tmp_path / "missing.tcia")])
    assert result.exit_code == 2
    assert "missing.tcia" in result.output and "Traceback" not in result.output
