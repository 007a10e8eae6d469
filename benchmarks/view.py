"""The interactive view on a slow server: how soon the rows show, how soon ``q`` quits.

Run by run.py (``python benchmarks/view.py MANIFEST API_URL DEST``); prints one JSON
line. The app runs headless under Textual's Pilot in this process; the server is a
process of its own (``serve --faults latency=...``) whose metadata answers take longer
than the whole measurement, so ``q`` is pressed while metadata is still loading.

* ``rows_s``: from creating the app to every manifest row being in the table (its first
  window of rows drawn, the rest a key press away).
* ``quit_s``: from pressing ``q`` (metadata still loading) to the app having exited.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from textual.widgets import DataTable

from nbia_retriever.engine import DownloadOptions
from nbia_retriever.manifest import read_manifest
from nbia_retriever.tui import RetrieverApp
from nbia_retriever.tui.app import LOADING

DEADLINE = 60.0


async def measure(manifest: Path, api_url: str, dest: Path) -> dict[str, object]:
    parsed = read_manifest(manifest)
    count = len(parsed.series_uids)
    start = time.perf_counter()
    app = RetrieverApp(parsed, dest, DownloadOptions(api_url=api_url), show_rates=False)
    async with app.run_test(size=(130, 36)) as pilot:
        table = app.query_one("#table", DataTable)
        window = min(count, app.page_size)
        while table.row_count < window or len(app.order) < count:
            if time.perf_counter() - start > DEADLINE:
                raise SystemExit(f"only {table.row_count} of {count} rows after {DEADLINE} s")
            await pilot.pause(0.005)
        rows_s = time.perf_counter() - start
        loading = app.phase == LOADING
        pressed = time.perf_counter()
        await pilot.press("q")
        while app.is_running:
            if time.perf_counter() - pressed > DEADLINE:
                raise SystemExit("q did not quit")
            await asyncio.sleep(0.005)
        quit_s = time.perf_counter() - pressed
    import resource
    return {"series": count, "rows_s": rows_s, "quit_s": quit_s,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "still_loading_at_q": loading}


def main() -> None:
    manifest, api_url, dest = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    print(json.dumps(asyncio.run(measure(manifest, api_url, dest))))


if __name__ == "__main__":
    main()
