"""The live display of ``download`` in a terminal (rich).

One overall bar (bytes, speed, ETA, series done/failed) plus one line per active series,
capped so that 32 workers still fit on a laptop screen. The engine is polled from the
main thread five times a second rather than driven by events: the display cost stays
constant however fast the workers go.
"""

from __future__ import annotations

import signal
from collections import deque
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.text import Text

from ..bar import new_bar
from ..engine import EventKind
from ..models import FAILED_STATES, SeriesState
from .common import exit_at_once, inert

MAX_LINES = 8


def run_with_progress(engine: Any) -> Any:
    overall = new_bar()
    task = overall.add_task("Preparing", total=None, counts="")

    def active_lines() -> Text:
        lines = Text()
        active = [r for r in list(engine.results.values())
                  if r.state in (SeriesState.DOWNLOADING, SeriesState.PAUSED)]
        for r in active[:MAX_LINES]:
            total = (r.info.file_size if r.info else None) or 0
            pct = f"{100 * r.bytes_done / total:5.1f}%" if total else "     "
            label = r.info.collection if r.info else ""
            lines.append(f"  {pct} {r.state:<11} {label:<18.18} {r.uid}\n",
                         style="dim" if r.state == SeriesState.PAUSED else "")
        if len(active) > MAX_LINES:
            lines.append(f"  ... and {len(active) - MAX_LINES} more\n", style="dim")
        return lines

    def refresh() -> None:
        s = engine.stats()
        counts = f"{s.complete:,}/{s.series_total:,} done"
        if s.failed:
            counts += f", [red]{s.failed:,} failed[/red]"
        counts += f", {s.concurrency} streams"
        if s.planning:
            counts += f", planning {s.planned:,}/{s.series_total:,}"
        description = "Paused" if engine.paused else (
            "Downloading" if s.bytes_total else "Preparing")
        overall.update(task, completed=s.progress_bytes, total=s.bytes_total or None,
                       description=description, counts=counts)

    # Retries and failures scroll above the live display; they are queued by worker
    # threads and printed from this thread only.
    notes: deque[Text] = deque()

    def on_event(event: Any) -> None:
        if event.kind is EventKind.RETRY:
            notes.append(Text(inert(f"retrying {event.uid} (attempt {event.attempt}: "
                                    f"{event.message})"), style="yellow"))
        elif event.kind is EventKind.STATE and event.state in FAILED_STATES:
            notes.append(Text(inert(f"{event.state}: {event.uid}: {event.message}"),
                              style="red"))
        elif event.kind in (EventKind.THROTTLE, EventKind.ERROR):
            notes.append(Text(inert(event.message), style="yellow"))

    engine.subscribe(on_event)

    def flush_notes(live: Live) -> None:
        while notes:
            live.console.print(notes.popleft())

    with Live(Group(overall, Text()), refresh_per_second=5, transient=False) as live:
        engine.start()
        try:
            while not engine.finished:
                engine.wait(0.2)
                flush_notes(live)
                refresh()
                live.update(Group(overall, active_lines()))
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, exit_at_once)  # a second Ctrl-C stops at once
            live.console.print("interrupted: stopping (re-run the same command to resume)")
            engine.cancel()
            engine.wait()
        flush_notes(live)
        refresh()
        live.update(Group(overall))
    return engine.report
