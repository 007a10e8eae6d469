"""Snapshot tests of the downloads window (pytest-textual-snapshot; SVGs in __snapshots__/).

Content is deterministic: a fixed-seed archive, a relative destination under a chdir'd
temporary folder (no random path on screen), speed and ETA rendered as "—", and a
failure whose message names no port. Update after an intended change with
``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the SVGs.

``python tests/test_tui_snapshots.py docs/screenshot.svg`` regenerates the README image.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from nbia_retriever.engine import DownloadOptions
from nbia_retriever.manifest import read_manifest
from nbia_retriever.server import FaultPlan, ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary, generate_archive
from nbia_retriever.tui import RetrieverApp

SIZE = (120, 30)
DEADLINE = 30.0


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    return archive_factory(seed=5, collections=2, patients=3, studies=1, series=2, images=4,
                           awkward=False)


@pytest.fixture
def server(archive: ArchiveSummary, serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    return serve(archive.root)


def make_app(archive: ArchiveSummary, server: ReferenceServer, **kwargs: object) -> RetrieverApp:
    options = DownloadOptions(api_url=server.api_url, workers=2, retries=1, backoff_base=0.01)
    return RetrieverApp(read_manifest(archive.root / "manifest.tcia"), "downloads", options,
                        **kwargs)  # type: ignore[arg-type]


def until(condition: Callable[[], bool]) -> Callable[[Pilot[None]], object]:
    async def run_before(pilot: Pilot[None]) -> None:
        deadline = time.monotonic() + DEADLINE
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            await pilot.pause(0.01)

    return run_before


def test_table_loaded(snap_compare: Callable[..., bool], archive: ArchiveSummary,
                      server: ReferenceServer, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    app = make_app(archive, server, show_rates=False)
    assert snap_compare(app, terminal_size=SIZE, run_before=until(lambda: app.phase == "ready"))


def test_finished_with_failures(snap_compare: Callable[..., bool], archive: ArchiveSummary,
                                server: ReferenceServer, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = read_manifest(archive.root / "manifest.tcia").series_uids[0]
    server.set_faults(FaultPlan(script={bad: ["short:1"] * 4}))
    app = make_app(archive, server, show_rates=False)

    async def run_before(pilot: Pilot[None]) -> None:
        await pilot.press("s")
        await until(lambda: app.phase == "finished")(pilot)  # type: ignore[misc]
        # and until the bar shows what is kept (the finished view's last redraw)
        await until(lambda: app.query_one("#overall").progress  # type: ignore[attr-defined,misc]
                    == app.engine.stats().bytes_verified)(pilot)
        await until(bar_settled)(pilot)  # type: ignore[misc]
        await pilot.pause()

    def bar_settled() -> bool:
        """The bar drawn at the width it has now (Textual rounds to half cells of the
        width the bar had when its percentage was set)."""
        outer: Any = app.query_one("#overall")
        inner: Any = outer.query_one("#bar")
        width = inner.size.width * 2
        return bool(width) and outer.percentage is not None and \
            inner.percentage == int(outer.percentage * width) / width

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
    assert app.rows[bad].state == "Error"


def _readme_screenshot(out: Path) -> None:  # pragma: no cover - a maintenance script
    """A demo-like moment for the README: a bigger archive mid-download, one failure."""
    import asyncio
    import os
    import tempfile

    out = out.absolute()

    async def main() -> None:
        tmp = Path(tempfile.mkdtemp())
        summary = generate_archive(tmp / "archive", seed=2024, collections=3, patients=3,
                                   studies=1, series=2, images=8, image_bytes=300_000)
        uids = read_manifest(summary.root / "manifest.tcia").series_uids
        plan = FaultPlan(bandwidth=1_000_000, script={uids[4]: ["http500"] * 9})
        os.chdir(tmp)
        with ReferenceServer(summary.root, faults=plan) as server:
            options = DownloadOptions(api_url=server.api_url, workers=3, retries=1,
                                      backoff_base=0.05)
            app = RetrieverApp(read_manifest(summary.root / "manifest.tcia"), "downloads",
                               options)
            async with app.run_test(size=(120, 30)) as pilot:
                while app.phase != "ready":
                    await pilot.pause(0.01)
                await pilot.press("s")
                while sum(r.state == "Complete" for r in app.rows.values()) < 5:
                    await pilot.pause(0.01)
                await pilot.press("down", "down", "down", "down")
                await pilot.pause(0.3)
                app.save_screenshot(out.name, str(out.parent))
                app.engine.cancel()

    asyncio.run(main())


if __name__ == "__main__":  # pragma: no cover
    _readme_screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/screenshot.svg"))
