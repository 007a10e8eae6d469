"""The live display of ``download`` in a terminal (rich).

One overall bar (bytes, speed, ETA, series done/failed) plus one line per active series,
capped so that 32 workers still fit on a laptop screen. The engine is polled from the
main thread five times a second rather than driven by events: the display cost stays
constant however fast the workers go.

A series is shown as people know it (Collection, Patient ID, Study Date, Modality,
Series Description, images; the UID's tail tells two alike apart), in columns that fit
the terminal: the free text is cut, never the date, the modality or the UID's tail.
Retries and failures scroll above the display, one line each, naming the series the
same way (:func:`~.common.series_label`) and the reason once.
"""

from __future__ import annotations

import signal
from collections import deque
from typing import Any

from rich.cells import cell_len
from rich.console import Group
from rich.live import Live
from rich.text import Text

from ..bar import new_bar
from ..engine import EventKind
from ..models import FAILED_STATES, SeriesState
from ..report import short_uid
from .common import exit_at_once, fit_widths, inert, series_fields, series_label

MAX_LINES = 8


def reason(uid: str, message: str) -> str:
    """The engine's message without the UID the line already names."""
    text = message.strip()
    for prefix in (f"series {uid}: ", f"{uid}: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text or "no reason given"


def series_lines(results: list[Any], width: int) -> Text:
    """One line per active series, in columns that fit ``width``: progress, state, then
    the series as people know it (:func:`~.common.series_fields`), its images and the
    UID's tail. Server text is inert."""
    rows = []
    for r in results:
        total = (r.info.file_size if r.info else None) or 0
        pct = f"{100 * r.bytes_done / total:5.1f}%" if total else ""
        count = r.info.image_count if r.info else None
        images = f"{count:,} img" if count is not None else ""
        rows.append([pct, str(r.state), *(inert(f) for f in series_fields(r.info)), images,
                     short_uid(r.uid)])
    lines = Text()
    if not rows:
        return lines
    free = (2, 3, 6)  # collection, patient, description: cut to fit, in that order
    naturals = [max(cell_len(row[i]) for row in rows) for i in range(len(rows[0]))]
    naturals[0] = 6
    widths = list(naturals)
    room = width - 2 - sum(n for i, n in enumerate(naturals) if i not in free) \
        - (len(naturals) - 1)
    for i, fitted in zip(free, fit_widths([naturals[i] for i in free], room), strict=True):
        widths[i] = fitted
    for r, row in zip(results, rows, strict=True):
        line = Text("  ", style="dim" if r.state == SeriesState.PAUSED else "")
        for i, (text, w) in enumerate(zip(row, widths, strict=True)):
            if not w:  # a column nobody has (no image counts): no room taken
                continue
            piece = Text(text.rjust(w) if i == 0 else text)
            piece.truncate(w, overflow="ellipsis", pad=True)
            line.append(piece)
            line.append(" ")
        line.rstrip()
        line.append("\n")
        lines.append(line)
    return lines


def run_with_progress(engine: Any) -> Any:
    overall = new_bar()
    task = overall.add_task("Preparing", total=None, counts="")
    width = [80]

    def active_lines() -> Text:
        active = [r for r in list(engine.results.values())
                  if r.state in (SeriesState.DOWNLOADING, SeriesState.PAUSED)]
        lines = series_lines(active[:MAX_LINES], width[0])
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

    def label(uid: str) -> str:
        result = engine.results.get(uid)
        return series_label(uid, result.info if result is not None else None)

    def on_event(event: Any) -> None:
        if event.kind is EventKind.RETRY:
            notes.append(Text(inert(f"retrying {label(event.uid)} (attempt {event.attempt}: "
                                    f"{reason(event.uid, event.message)})"), style="yellow"))
        elif event.kind is EventKind.STATE and event.state in FAILED_STATES:
            notes.append(Text(inert(f"{event.state}: {label(event.uid)}: "
                                    f"{reason(event.uid, event.message)}"), style="red"))
        elif event.kind in (EventKind.THROTTLE, EventKind.ERROR):
            notes.append(Text(inert(event.message), style="yellow"))

    engine.subscribe(on_event)

    def flush_notes(live: Live) -> None:
        while notes:
            live.console.print(notes.popleft())

    with Live(Group(overall, Text()), refresh_per_second=5, transient=False) as live:
        width[0] = live.console.width
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
