"""The progress bar of :func:`nbia_retriever.download` (a notebook, a terminal).

(``bar``, not ``progress``: the word names the engine's progress events; the ``download``
command's own display is :mod:`nbia_retriever.cli.live`.)

One rich bar: bytes verified and in flight (never going backwards when a retry throws
bytes away), speed, time left, series done and failed. rich draws it as a live widget in
Jupyter and as an updating line in a terminal; elsewhere (a log file, a pipe) nothing is
drawn unless asked for, and the summary line is all that is printed.

The engine is polled a few times a second from the calling thread, so the bar costs the
same however many series are downloading.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

if TYPE_CHECKING:
    from .engine import Engine
    from .report import Report

#: Seconds between two redraws.
POLL = 0.25


def in_notebook() -> bool:
    """True inside a Jupyter kernel (the one place without a terminal that shows a bar)."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def wanted(progress: bool | None) -> bool:
    """``progress=None`` means: a bar in a notebook or an interactive terminal only."""
    if progress is not None:
        return progress
    if os.environ.get("NBIA_NO_PROGRESS"):
        return False
    return in_notebook() or sys.stdout.isatty()


def new_bar(console: Console | None = None) -> Progress:
    """The one overall bar (also the CLI's): description, bar, bytes, speed, time left,
    and a ``counts`` field."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[counts]}"),
        console=console, transient=False, refresh_per_second=4,
    )


def run_with_bar(engine: Engine, *, console: Console | None = None) -> Report:
    """Start ``engine``, draw its progress until it finishes, return its report.

    Ctrl-C (KeyboardInterrupt) cancels the run cleanly (finished series are kept; a
    second call resumes) and is raised again once the engine has stopped.
    """
    bar = new_bar(console or Console(file=sys.stdout))
    task = bar.add_task("Preparing", total=None, counts="")

    def refresh() -> None:
        s = engine.stats()
        counts = f"{s.complete:,}/{s.series_total:,} series"
        if s.failed:
            counts += f", {s.failed:,} failed"
        description = "Paused" if engine.paused else (
            "Downloading" if s.bytes_total else "Preparing")
        if engine.finished:
            description = "Finished"
        bar.update(task, completed=s.progress_bytes, total=s.bytes_total or None,
                   description=description, counts=counts)

    with bar:
        engine.start()
        try:
            while not engine.finished:
                engine.wait(POLL)
                refresh()
        except KeyboardInterrupt:
            engine.cancel()
            engine.wait()
            refresh()
            raise
        refresh()
    return engine.report
