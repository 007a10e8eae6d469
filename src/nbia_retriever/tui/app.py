"""The downloads window: the NBIA Data Retriever's table, in any terminal.

The app is a view and a remote control of :class:`~nbia_retriever.engine.Engine`; it
holds no download logic. Threads and the UI meet in exactly two places:

* ``Engine.prepare()`` (journal, metadata: blocking I/O) runs in a Textual thread worker
  whose result is handled on the UI thread (``on_worker_state_changed``).
* Engine events only record *which* series changed, under a lock. A timer on the UI
  thread (4 per second) redraws those rows and the overall bar. Calling
  ``call_from_thread`` per event would make every worker wait for the UI at each MiB,
  tying download speed to how busy the terminal is; polling keeps the display cost
  constant however fast the workers go, and only changed cells are touched.

A run that cannot be changed in place gets a new engine: another destination, layout or
login, "Retry failed" (``only_failed=True``: the journal remembers), or rows deleted
after the metadata was read. The table keeps every row across engines; each row shows
the latest state any engine reported for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import shlex
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from rich.text import Text
from textual import events, on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    ProgressBar,
    Select,
    Static,
)

from ..api import Credentials
from ..cli.common import run_exit_code
from ..engine import DownloadOptions, Engine, Event
from ..engine.plan import LayoutMismatchError
from ..errors import AuthError, NbiaError
from ..layout import Layout, format_series_number, root_folder_name
from ..manifest import Manifest
from ..models import ALL_STATES, FAILED_STATES, SeriesState
from ..report import Report, SeriesResult, human_size, write_error_report
from ..session import Session, session_for
from .cells import (
    COLUMNS,
    EMPTY,
    Cell,
    hidden_columns,
    origin_text,
    row_cells,
    speed_and_eta,
)
from .license import license_asker
from .screens import (
    ConfirmQuitScreen,
    DestinationScreen,
    LoginAnswer,
    LoginScreen,
    SaveReportScreen,
)
from .table import PAGE, PagedTable
from .trust import TRUST_ALWAYS, login_trust, remember_trusted_host


class ViewPhase(StrEnum):
    """Phases of the window (``RetrieverApp.phase``); tests wait on them."""

    LOADING = "loading"
    READY = "ready"
    RUNNING = "running"
    FINISHED = "finished"


#: The phases by their old names (tests import them).
LOADING, READY = ViewPhase.LOADING, ViewPhase.READY
RUNNING, FINISHED = ViewPhase.RUNNING, ViewPhase.FINISHED
TICK = 0.25
#: Seconds of history behind the speed figure: long enough to be steady, short enough
#: to follow a server that slows down.
SPEED_WINDOW = 5.0
RETRYABLE = FAILED_STATES | {SeriesState.CANCELLED}
_STATE = operator.attrgetter("state")
AUTO_WIDTH = frozenset(key for key, _, width in COLUMNS if width is None)
#: The actions that can be unavailable, and what they are called in "cannot" messages.
WHY_NOT: dict[str, str] = {
    "start": "Start", "pause": "Pause", "resume": "Resume", "cancel": "Cancel",
    "remove": "Series cannot be removed", "destination": "The destination cannot change",
    "toggle_layout": "The layout cannot change", "login": "Cannot log in or out",
    "retry_failed": "Retry failed works", "save_report": "The error report is saved",
}


@dataclass(slots=True)
class Row(SeriesResult):
    """What the table shows for one series: the latest report from any engine, plus
    the table's own state (marked for deletion; rendered cells while it is in the
    table's window, None otherwise)."""

    marked: bool = False
    cells: dict[str, Cell] | None = None


class RetrieverApp(App[None]):
    """``nbia-retriever open MANIFEST``: downloads table, destination, Start/Pause/Resume.

    ``show_rates=False`` renders speed and ETA as "—" so screenshots are reproducible.
    ``ask_login`` opens the login dialog at start-up with that username filled in (for
    ``--user`` without a stored password).
    """

    TITLE = "NBIA Data Retriever"
    #: Rows the table holds at once (see .table).
    page_size: ClassVar[int] = PAGE
    CSS_PATH = "retriever.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "start", "Start"),
        Binding("p", "pause", "Pause"),
        Binding("r", "resume", "Resume"),
        Binding("c", "cancel", "Cancel"),
        Binding("space", "toggle_mark", "Mark"),
        Binding("a", "mark_all", "Mark all", show=False),
        Binding("delete,backspace", "remove", "Remove", key_display="del"),
        Binding("o", "sort", "Sort"),
        Binding("v", "reverse_sort", "Reverse", show=False),
        Binding("d", "destination", "Destination"),
        Binding("y", "toggle_layout", "Layout", show=False),
        Binding("l", "login", "Log in"),
        Binding("f", "retry_failed", "Retry failed"),
        Binding("e", "save_report", "Error report"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(
        self,
        manifest: Manifest,
        dest: str | Path = ".",
        options: DownloadOptions | None = None,
        *,
        manifest_name: str | None = None,
        show_rates: bool = True,
        ask_login: str | None = None,
        session: Session | None = None,
    ) -> None:
        super().__init__()
        self.options = options or DownloadOptions()
        if manifest.kind == "s5cmd" and self.options.idc_pinned is None:
            # IDC objects by version: the rows are their SeriesInstanceUIDs (engine.run)
            from ..idc.source import resolve_for_run

            manifest, self.options, _notes = resolve_for_run(manifest, self.options)
        self.manifest = manifest
        self.dest, self._dest_note = destination_for(Path(dest), manifest)
        #: Who the window talks to (opened once; each engine gets it, with the login of
        #: the moment): see :mod:`nbia_retriever.session`.
        self.session = session or session_for(manifest, self.options)
        self.layout_name = Layout(self.options.layout).value
        self.credentials: Credentials | None = self.options.credentials
        self.show_rates = show_rates
        self.ask_login = ask_login
        name = manifest_name or (Path(manifest.source).name if manifest.source else "")
        self.sub_title = name
        self.rows: dict[str, Row] = {uid: Row(uid) for uid in manifest.keys}
        #: Every row's UID in display order (sorted, without removed rows); the table
        #: holds the window ``order[_start:_start + page_size]`` (see .table).
        self.order: list[str] = list(self.rows)
        self._start = 0
        self._shown: dict[str, int] = {}
        self.removed: set[str] = set()
        self.engine: Engine = self._make_engine()
        self.phase: ViewPhase = LOADING
        self.message = ""
        self.last_error = ""
        self._preparing: set[Engine] = set()
        self._engine_prepared = False  # prepare() ran (or runs) on self.engine
        self._engine_stale = False  # rows were removed after prepare(): rebuild at Start
        self._start_pending = False
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._full_sync = False
        self._samples: deque[tuple[float, float]] = deque()
        self._sort: tuple[str, bool] | None = None
        self.last_report_path: Path | None = None
        self._columns: list[str] = []
        self._hidden: frozenset[str] = frozenset()
        #: What ``open`` prints once the window has closed (see :meth:`_leave`).
        self.ending: str | None = None
        self._ran = False  # a download was started in this window
        self._open_streams = 0
        #: While a login is tried: the engine, login and phase to go back to if refused.
        self._fallback: tuple[Engine, Credentials | None, ViewPhase] | None = None

    # -- layout ---------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="settings"):
            yield Label("Destination", classes="field-label")
            yield Input(str(self.dest), id="dest", compact=True,
                        tooltip="Where the download folder goes; Enter to apply")
            yield Button("Browse…", id="browse", compact=True)
            yield Label("Layout", classes="field-label")
            yield Select([("Descriptive", "descriptive"), ("Classic", "classic")],
                         value=self.layout_name, allow_blank=False, id="layout", compact=True)
            yield Button("Log in", id="login", compact=True)
            yield Label(self._login_text(), id="user")
        yield PagedTable(self, id="table", cursor_type="row", zebra_stripes=True)
        yield Static(id="detail")
        with Horizontal(id="overall-row"):
            yield ProgressBar(total=None, show_eta=False, id="overall")
            yield Label("", id="rates")
            yield Label("", id="counts")
        yield Label("", id="status")
        with Horizontal(id="controls"):
            yield Button("Start", id="start", variant="success", compact=True)
            yield Button("Pause", id="pause", compact=True)
            yield Button("Resume", id="resume", compact=True)
            yield Button("Cancel", id="cancel", variant="error", compact=True)
            yield Button("Remove", id="remove", compact=True)
            yield Button("Retry failed", id="retry", variant="warning", compact=True)
            yield Button("Error report", id="report", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self._build_table(hidden_columns(self.size.width))
        self.query_one("#table", DataTable).focus()
        self._prepare_engine()
        self.set_interval(TICK, self._tick)
        self._refresh_controls()
        self._show_detail()
        if self.ask_login:
            self.action_login()

    def on_resize(self, event: events.Resize) -> None:
        hidden = hidden_columns(event.size.width)
        if self._columns and hidden != self._hidden:
            self._build_table(hidden)

    def _build_table(self, hidden: frozenset[str]) -> None:
        """(Re)create the columns: a narrower terminal (80 columns over SSH) drops those
        the detail panel shows anyway (:func:`~.cells.hidden_columns`), so that Progress
        and Status stay in view."""
        table = self.query_one("#table", DataTable)
        cursor = self._cursor_uid() if self._columns else None
        table.clear(columns=True)
        self._hidden = hidden
        columns = [c for c in COLUMNS if c[0] not in hidden]
        self._columns = [key for key, _, _ in columns]
        for key, label, width in columns:
            table.add_column(label, key=key, width=width)
        self._fill(self._start, cursor)

    # -- the window (see .table) ----------------------------------------------------------
    def _fill(self, start: int, cursor: str | None = None) -> None:
        """Show ``order[start:start + self.page_size]``; the cursor on ``cursor`` if it is there."""
        table = self.query_one("#table", DataTable)
        start = max(0, min(start, len(self.order) - self.page_size))
        for uid in self._shown:
            if (row := self.rows.get(uid)) is not None:
                row.cells = None
        table.clear()
        self._start = start
        shown = self.order[start:start + self.page_size]
        self._shown = {uid: i for i, uid in enumerate(shown)}
        for uid in shown:
            row = self.rows[uid]
            row.cells = self._cells(row)
            table.add_row(*(row.cells[key] for key in self._columns), key=uid)
        if cursor in self._shown:
            table.move_cursor(row=self._shown[cursor])
        self._update_counts()  # "rows a–b of n"

    def turn(self, step: int) -> bool:
        """The cursor left the window (:class:`~.table.Pager`): slide it half a page."""
        table = self.query_one("#table", DataTable)
        target = self._start + table.cursor_row + (1 if step > 0 else -1)
        if not 0 <= target < len(self.order) or (
                step > 0 and self._start + self.page_size >= len(self.order)) or (
                step < 0 and self._start == 0):
            return False
        self._fill(self._start + (self.page_size // 2 if step > 0 else -(self.page_size // 2)))
        table.move_cursor(row=target - self._start)
        return True

    def jump(self, end: bool) -> None:
        """First or last window (:class:`~.table.Pager`)."""
        start = len(self.order) - self.page_size if end else 0
        if max(0, start) != self._start:
            self._fill(start)

    def go_to(self, uid: str) -> None:
        """Put the cursor on a series, sliding the window to it."""
        if uid not in self.rows:
            return
        if uid not in self._shown:
            self._fill(self.order.index(uid) - self.page_size // 2)
        self.query_one("#table", DataTable).move_cursor(row=self._shown[uid])

    # -- engines ----------------------------------------------------------------------------
    def _make_engine(self, *, only_failed: bool = False) -> Engine:
        options = replace(self.options, layout=self.layout_name, credentials=self.credentials,
                          only_failed=only_failed, confirm_license=license_asker(self))
        engine = Engine(self.manifest, self.dest, options,
                        session=replace(self.session, credentials=self.credentials))
        engine.remove(self.removed)
        engine.subscribe(self._on_engine_event)
        return engine

    def _replace_engine(self, engine: Engine, *, keep_old: bool = False) -> None:
        """``keep_old``: a login being tried; the old engine is the fallback (see
        :meth:`_logged_in`) and is disposed once the login is accepted."""
        old, self.engine = self.engine, engine
        self._engine_prepared = False
        self._engine_stale = False
        with self._lock:
            self._dirty.clear()
            self._full_sync = False
        if not keep_old:
            self._drop_fallback()
        if old is not engine and old not in self._preparing and not (
                self._fallback and old is self._fallback[0]):
            _dispose(old)

    def _drop_fallback(self) -> None:
        fallback, self._fallback = self._fallback, None
        if fallback is not None and fallback[0] is not self.engine \
                and fallback[0] not in self._preparing:
            _dispose(fallback[0])

    def _login_refused(self, engine: Engine, error: str) -> None:
        """Back to the engine, login and rows from before the refused login."""
        assert self._fallback is not None
        old, self.credentials, phase = self._fallback
        self._fallback = None
        self.engine, self.phase = old, phase
        self._engine_prepared = True
        self._start_pending = False
        _dispose(engine)
        self.last_error = error
        reason = error.removeprefix("login refused: ")
        self._set_message(f"Login refused, nothing changed ({self._login_text()}): {reason}",
                          error=True)
        self._sync_rows(self.rows)
        self._refresh_controls()

    class Prepared(Message):
        """An engine finished reading journals and metadata (posted from its thread)."""

        def __init__(self, engine: Engine, error: str) -> None:
            super().__init__()
            self.engine = engine
            self.error = error

    def _prepare_engine(self) -> None:
        """Read journal and metadata in a thread; the table fills as batches arrive.

        A daemon thread of our own, not a Textual worker: those run in asyncio's default
        executor, which the app waits for when it exits, so ``q`` during a slow metadata
        request would leave the terminal hanging until the server answered.
        """
        engine = self.engine
        self._engine_prepared = True
        self._preparing.add(engine)
        self.phase = LOADING
        self._set_message(f"Reading metadata of {len(engine.results):,} series…")
        self.query_one("#overall", ProgressBar).update(total=None, progress=0)

        def work() -> None:
            _, error = _prepare(engine)
            with contextlib.suppress(Exception):  # the app may be gone by now
                self.post_message(self.Prepared(engine, error))

        threading.Thread(target=work, name="nbia-tui-prepare", daemon=True).start()

    def on_retriever_app_prepared(self, message: Prepared) -> None:
        engine, error = message.engine, message.error
        self._preparing.discard(engine)
        if engine is not self.engine:
            _dispose(engine)  # the settings changed while it was reading: forget it
            return
        if self._fallback is not None:
            if error and engine.report.auth_failed:
                self._login_refused(engine, error)
                return
            self._drop_fallback()  # the login worked: the old engine is done with
        self.phase = READY
        self._sync_rows(self.rows)
        if error:
            self.last_error = error
            self._set_message(f"Could not read the metadata: {error}", error=True)
        else:
            self.last_error = ""
            self._set_message(self._dest_note + self._ready_text())
        self.query_one("#overall", ProgressBar).update(total=max(1, engine.total_bytes),
                                                       progress=0)
        self._refresh_controls()
        if self._start_pending:
            self._start_pending = False
            self.action_start()

    def _reconfigure(self) -> None:
        """Destination, layout or login changed: a new engine shows what is done *there*."""
        for row in self.rows.values():
            row.state, row.error, row.attempts, row.bytes_done = (
                SeriesState.NOT_STARTED, "", 0, 0)
        self._replace_engine(self._make_engine())
        self._redraw_all()
        self._prepare_engine()
        self._refresh_controls()

    @property
    def running(self) -> bool:
        return self.phase == RUNNING

    # -- engine events (worker threads) and the UI timer ------------------------------------
    def _on_engine_event(self, event: Event) -> None:
        """Called from engine threads: only note what changed; the timer draws it."""
        with self._lock:
            if event.uid:
                self._dirty.add(event.uid)
            if event.kind in ("planned", "finished"):
                self._full_sync = True

    def _tick(self) -> None:
        if not self.query("#table"):  # quitting: the widgets are gone, nothing to draw
            return
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            full, self._full_sync = self._full_sync, False
        if full:
            dirty = set(self.rows)
        if dirty:
            self._sync_rows(dirty)
        if self.phase == RUNNING:
            self._update_overall()
            if self.engine.finished:
                self._on_finished()

    def _sync_rows(self, uids: set[str] | dict[str, Row]) -> None:
        results = self.engine.results
        cursor_uid = self._cursor_uid()
        for uid in uids:
            row = self.rows.get(uid)
            result = results.get(uid)
            if row is None or result is None:
                continue
            if result.info is not None:
                row.info = result.info
            row.state, row.error = result.state, result.error
            row.attempts, row.bytes_done = result.attempts, result.bytes_done
            row.source = result.source
            self._redraw(row)
        if cursor_uid in uids:
            self._show_detail()

    def _cells(self, row: Row) -> dict[str, Cell]:
        return row_cells(row.uid, row.info, row.state, row.bytes_done, row.marked)

    def _redraw(self, row: Row) -> None:
        """Update only the cells whose content changed; nothing for rows outside the
        window (they are drawn when the window reaches them)."""
        if row.cells is None or row.uid not in self._shown:
            return
        table = self.query_one("#table", DataTable)
        cells = self._cells(row)
        for key, cell in cells.items():
            if row.cells.get(key) != cell and key in self._columns:
                # Auto-width columns grow when metadata arrives; the others never change.
                table.update_cell(row.uid, key, cell, update_width=key in AUTO_WIDTH)
        row.cells = cells

    def _redraw_all(self) -> None:
        for uid in self._shown:
            self._redraw(self.rows[uid])
        self._show_detail()

    def _requantize_bar(self) -> None:
        """Textual's bar rounds its percentage to the half cells of the width it had when
        the percentage was set; the counts beside it change width (the bar takes what
        they leave), so the same fraction is set again once the layout has settled."""
        with contextlib.suppress(Exception):  # the window may be closing
            outer = self.query_one("#overall", ProgressBar)
            inner: Any = outer.query_one("#bar")
            inner.percentage = outer.percentage

    def _update_overall(self) -> None:
        stats = self.engine.stats()
        self._open_streams = stats.open_streams
        done, total = stats.progress_bytes, stats.bytes_total
        if self.phase == "finished":
            # What is kept: the high-water mark also held a failed attempt's partial
            # bytes, as far as the last sample saw them.
            done = stats.bytes_verified
        bar = self.query_one("#overall", ProgressBar)
        bar.update(total=max(1.0, total), progress=min(done, total) if total else 0)
        self.call_after_refresh(self._requantize_bar)
        now = time.monotonic()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > SPEED_WINDOW:
            self._samples.popleft()
        speed, eta = EMPTY, EMPTY
        if self.show_rates:
            speed, eta = speed_and_eta(list(self._samples), total,
                                       active=self.phase == RUNNING and not self.engine.paused)
        self.query_one("#rates", Label).update(
            f"{human_size(done)} of {human_size(total)} · {speed} · ETA {eta}")
        self._update_counts()
        if self.engine.paused:
            self._set_message("Paused: downloads hold at their next chunk. Resume with r.")

    def _update_counts(self) -> None:
        counts = dict.fromkeys(ALL_STATES, 0)
        counts.update(Counter(map(_STATE, self.rows.values())))
        failed = sum(counts[s] for s in FAILED_STATES)
        text = f"{counts[SeriesState.COMPLETE]}/{len(self.rows)} done"
        if self.phase == RUNNING:
            # The streams really open (engine stats), not the limiter's target nor the
            # rows in Downloading (one waiting for its answer has no stream yet): after a
            # throttle, series already downloading keep theirs until they end. Short, so
            # that it still fits beside the bar in 80 columns.
            text += f" · {self._open_streams} stream{'s' if self._open_streams != 1 else ''} open"
        elif counts[SeriesState.DOWNLOADING]:
            text += f" · {counts[SeriesState.DOWNLOADING]} active"
        if failed:
            text += f" · {failed} failed"
        if len(self.order) > self.page_size:
            end = min(len(self.order), self._start + self.page_size)
            text += f" · rows {self._start + 1:,}–{end:,} of {len(self.order):,}"
        self.query_one("#counts", Label).update(text)

    def _on_finished(self) -> None:
        self.phase = FINISHED
        self._sync_rows(self.rows)
        self._update_overall()
        report = self.engine.report
        failed = self.failed_rows()
        complete = sum(1 for r in self.rows.values() if r.state == SeriesState.COMPLETE)
        text = f"Finished: {complete} of {len(self.rows)} series complete"
        if failed:
            text += f", {len(failed)} not downloaded. f: retry failed series, e: save error report"
        if report.fatal:
            text = f"Stopped: {report.fatal}"
            fatal = self.engine.fatal_error
            if isinstance(fatal, LayoutMismatchError):  # no CLI flag advice in the view
                text = (f"Stopped: {fatal.root} was made with the {fatal.made} layout and one "
                        f"folder never mixes two: choose Layout {fatal.made.title()} (y) or "
                        "another destination (d)")
        elif report.cancelled:
            text = f"Cancelled: {complete} of {len(self.rows)} series complete. s: start again"
        self._set_message(text, error=bool(report.fatal))
        self._refresh_controls()

    def failed_rows(self) -> list[Row]:
        return [r for r in self.rows.values() if r.state in RETRYABLE]

    # -- messages and controls ----------------------------------------------------------------
    def _set_message(self, text: str, *, error: bool = False) -> None:
        self.message = text
        status = self.query_one("#status", Label)
        status.update(Text(text))
        status.set_class(error, "error")

    def _ready_text(self) -> str:
        rows = self.rows.values()
        complete = sum(1 for r in rows if r.state == SeriesState.COMPLETE)
        todo = [r for r in rows if r.state == SeriesState.NOT_STARTED]
        unavailable = [r for r in rows if r.state in FAILED_STATES]
        size = sum((r.info.file_size or 0) for r in todo if r.info)
        text = f"{len(self.rows):,} series"
        if complete:
            text += f", {complete:,} already complete"
        text += f", {len(todo):,} to download ({human_size(size)})"
        if unavailable:
            text += f", {len(unavailable):,} not available"
            if any(r.state == SeriesState.NOT_AUTHORIZED for r in unavailable):
                text += " (l: log in)"
        return text + ". s: start"

    def _login_text(self) -> str:
        return f"as {self.credentials.username}" if self.credentials else "not logged in"

    def _refresh_controls(self) -> None:
        def able(button_id: str, action: str) -> None:
            self.query_one(f"#{button_id}", Button).disabled = not self.check_action(action, ())

        for button_id, action in (("start", "start"), ("pause", "pause"), ("resume", "resume"),
                                  ("cancel", "cancel"), ("remove", "remove"),
                                  ("retry", "retry_failed"), ("report", "save_report")):
            able(button_id, action)
        busy = self.running
        for selector in ("#dest", "#browse", "#layout", "#login"):
            self.query_one(selector).disabled = busy
        self.query_one("#user", Label).update(self._login_text())
        if not busy:
            self._update_counts()
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Which keys (and buttons) make sense now; the Footer greys out the others."""
        phase, engine = self.phase, self.engine
        if action == "start":
            return (phase in (LOADING, READY) and not self._start_pending) or (
                phase == FINISHED and any(r.state != SeriesState.COMPLETE
                                          for r in self.rows.values()))
        if action == "pause":
            return phase == RUNNING and not engine.paused
        if action == "resume":
            return phase == RUNNING and engine.paused
        if action == "cancel":
            return phase == RUNNING or self._start_pending
        if action in ("remove", "destination", "toggle_layout", "login"):
            return phase != RUNNING
        if action in ("retry_failed", "save_report"):
            return (phase == FINISHED and bool(self.failed_rows())) or None
        return True

    async def run_action(self, action: Any, default_namespace: Any = None,
                         namespaces: Any = None) -> bool:
        """A key whose action cannot act now says why (Textual would drop it silently:
        ``e`` before Start looked broken); the Footer still greys it out."""
        if isinstance(action, str) and default_namespace in (None, self):
            name = action.partition("(")[0]
            if name in WHY_NOT and not self.check_action(name, ()):
                self.notify(self.why_not(name), severity="warning", markup=False)
                return True
        return await super().run_action(action, default_namespace, namespaces)

    def why_not(self, action: str) -> str:
        """Why ``action`` cannot act now, and what would let it (one sentence)."""
        phase = self.phase
        if phase == RUNNING and action in ("remove", "destination", "toggle_layout", "login"):
            return (f"{WHY_NOT[action]} while downloading: p pauses, c cancels (finished "
                    "series are kept).")
        if action == "start":
            if self._start_pending:
                return "Already starting: the download begins once the metadata is read."
            if phase == RUNNING:
                return "Already downloading."
            return "Every series is complete: nothing to start."
        if action == "pause":
            return "Already paused: r resumes." if phase == RUNNING else \
                "Nothing to pause: no download is running (s starts)."
        if action == "resume":
            return "Not paused: p pauses." if phase == RUNNING else \
                "Nothing to resume: no download is running (s starts)."
        if action == "cancel":
            return "Nothing to cancel: no download is running."
        if action in ("retry_failed", "save_report"):
            if phase == FINISHED:
                return "No series failed: nothing to retry or report."
            return (f"{WHY_NOT[action]} once a run has finished with failed series "
                    "(s starts the download).")
        return f"{WHY_NOT[action]} now."

    # -- table interactions ---------------------------------------------------------------------
    def _cursor_uid(self) -> str | None:
        table = self.query_one("#table", DataTable)
        if not table.row_count:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except Exception:
            return None
        return key.value

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self._show_detail()

    @on(DataTable.RowSelected)
    def _selected(self) -> None:
        """Enter, or a click on the highlighted row, marks it (space also moves down)."""
        self.action_toggle_mark(advance=False)

    @on(DataTable.HeaderSelected)
    def _header(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        reverse = self._sort is not None and self._sort == (key, False)
        self.sort_by(key, reverse=reverse)

    def sort_by(self, key: str, *, reverse: bool = False) -> None:
        """Stable sort on one column, over every row (not only the window); ties keep
        the manifest's order."""
        self._sort = (key, reverse)
        cursor = self._cursor_uid()

        def cell_key(uid: str) -> Any:
            row = self.rows[uid]
            return (row.cells or self._cells(row))[key].key

        base = [uid for uid in self.manifest.keys if uid in self.rows]
        self.order = sorted(base, key=cell_key, reverse=reverse)
        self._fill(0)
        if cursor is not None:
            self.go_to(cursor)
        label = {k: lbl for k, lbl, _ in COLUMNS}[key].strip() or "mark"
        self._set_message(f"Sorted by {label}{', descending' if reverse else ''}.")

    def action_sort(self) -> None:
        keys = [k for k in self._columns if k != "mark"]
        current = self._sort[0] if self._sort else None
        nxt = keys[(keys.index(current) + 1) % len(keys)] if current in keys else keys[0]
        self.sort_by(nxt)

    def action_reverse_sort(self) -> None:
        key, reverse = self._sort or ("collection", True)
        self.sort_by(key, reverse=not reverse)

    def action_toggle_mark(self, advance: bool = True) -> None:
        uid = self._cursor_uid()
        if uid is None:
            return
        row = self.rows[uid]
        row.marked = not row.marked
        self._redraw(row)
        table = self.query_one("#table", PagedTable)
        if advance and row.marked:
            table.action_cursor_down()

    def action_mark_all(self) -> None:
        mark = not all(r.marked for r in self.rows.values())
        for row in self.rows.values():
            row.marked = mark
        self._redraw_all()

    def action_remove(self) -> None:
        """Drop the marked rows (or the highlighted one) from this download; the manifest
        file is never touched."""
        if not self.check_action("remove", ()):
            self.notify("Series cannot be removed while downloading.", severity="warning")
            return
        uids = [r.uid for r in self.rows.values() if r.marked]
        if not uids and (cursor := self._cursor_uid()):
            uids = [cursor]
        if not uids:
            return
        self.remove_series(uids)

    def remove_series(self, uids: list[str]) -> None:
        table = self.query_one("#table", DataTable)
        gone = {uid for uid in uids if self.rows.pop(uid, None) is not None}
        index = self._start + table.cursor_row
        if gone:
            self.order = [uid for uid in self.order if uid not in gone]
            after = next((u for u in self.order[index:] if u in self.rows), None)
            self._fill(self._start, after or (self.order[-1] if self.order else None))
        self.removed.update(uids)
        if self._engine_prepared:
            # Engine.remove() after prepare() leaves the series in its queue and byte
            # total; a fresh engine at Start avoids both (see _start).
            self._engine_stale = True
        else:
            self.engine.remove(uids)
        self._set_message(f"Removed {len(uids)} series from this download "
                          f"({len(self.rows):,} left; the manifest file is unchanged).")
        self._show_detail()
        self._refresh_controls()

    def _show_detail(self) -> None:
        detail = self.query_one("#detail", Static)
        uid = self._cursor_uid()
        row = self.rows.get(uid) if uid else None
        if row is None:
            detail.update(Text("No series." if not self.rows else ""))
            return
        info = row.info
        text = Text()

        def line(label: str, value: str, style: str = "") -> None:
            text.append(f"{label:<12}", style="bold")
            text.append(value + "\n", style=style)

        line("Series UID", row.uid)
        if info:
            extra = " · ".join(p for p in (
                f"#{format_series_number(info.series_number)}" if info.series_number else "",
                info.modality, info.series_description) if p)
            line("Study UID", info.study_uid or "?")
            study = " · ".join(p for p in (info.study_date, info.study_description) if p)
            line("Study", study or "?")
            line("Series", extra or "?")
            line("Patient", f"{info.patient_id or '?'} · {info.collection or '?'}")
            count = "?" if info.image_count is None else f"{info.image_count:,}"
            line("Images", f"{count} · {human_size(info.file_size) or '?'}")
        else:
            line("Study UID", "(metadata not read yet)")
        status = row.state + (f" · attempt {row.attempts}" if row.attempts else "")
        if row.state == SeriesState.COMPLETE or self.options.source != "auto":
            # Where it came from (the journal's source) or will come from (a fixed source);
            # under auto the route is known only once it is downloaded.
            status += origin_text(row.source)
        if info and info.file_size and row.state in (SeriesState.DOWNLOADING,
                                                     SeriesState.PAUSED):
            status += f" · {human_size(row.bytes_done)} of {human_size(info.file_size)}"
        line("Status", status)
        if row.error:
            # The panel already shows the UID; engine messages often start with it.
            line("Last error", row.error.removeprefix(f"series {row.uid}: "), "red")
        detail.update(text)

    # -- actions: run control -----------------------------------------------------------------
    def action_start(self) -> None:
        if not self.check_action("start", ()):
            return
        typed = self.query_one("#dest", Input).value.strip()
        if typed and Path(typed).expanduser() != self.dest:
            self._set_destination(Path(typed).expanduser())  # typed without Enter
        if self.phase == LOADING:
            self._start_pending = True  # starts as soon as the metadata is in
            self._set_message("Starting once the metadata has been read…")
            self._refresh_controls()
            return
        if self.phase == FINISHED or self._engine_stale:
            self._replace_engine(self._make_engine())
        self._run(self.engine)

    def _run(self, engine: Engine) -> None:
        self._ran = True
        self._engine_prepared = True
        self._samples.clear()
        self.phase = RUNNING
        engine.start()
        self._set_message("Downloading…")
        self._refresh_controls()

    def action_pause(self) -> None:
        if self.check_action("pause", ()):
            self.engine.pause()
            self._set_message("Paused: downloads hold at their next chunk. Resume with r.")
            self._refresh_controls()

    def action_resume(self) -> None:
        if self.check_action("resume", ()):
            self.engine.resume()
            self._samples.clear()
            self._set_message("Downloading…")
            self._refresh_controls()

    def action_cancel(self) -> None:
        if self._start_pending:
            self._start_pending = False
            self._set_message("Start cancelled.")
        elif self.check_action("cancel", ()):
            self.engine.cancel()
            self._set_message("Cancelling: finished series are kept…")
        self._refresh_controls()

    def action_retry_failed(self) -> None:
        """A new engine on the same root with only_failed=True: the journal knows which."""
        if not self.check_action("retry_failed", ()):
            return
        for row in self.failed_rows():
            row.state, row.bytes_done = SeriesState.QUEUED, 0
            self._redraw(row)
        self._replace_engine(self._make_engine(only_failed=True))
        self._run(self.engine)

    def action_save_report(self) -> None:
        if not self.check_action("save_report", ()):
            return
        failed = self.failed_rows()
        default = self.engine.root / "error-report.csv"

        def save(path: Path | None) -> None:
            if path is None:
                return
            try:
                n = write_error_report(path, self.rows.values())
            except OSError as exc:
                self.notify(f"Cannot write {path}: {exc.strerror or exc}", severity="error",
                            markup=False)
                return
            self.last_report_path = path
            self.notify(f"Error report: {n} series written to {path}", markup=False)

        self.push_screen(SaveReportScreen(default, len(failed)), save)

    # -- actions: settings --------------------------------------------------------------------
    def action_destination(self) -> None:
        if self.check_action("destination", ()):
            self.push_screen(DestinationScreen(self.dest), self._set_destination)

    @on(Button.Pressed, "#browse")
    def _browse(self) -> None:
        self.action_destination()

    @on(Input.Submitted, "#dest")
    def _dest_typed(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if text:
            self._set_destination(Path(text).expanduser())
        self.query_one("#table", DataTable).focus()

    def _set_destination(self, path: Path | None) -> None:
        note = ""
        if path is not None:
            path, note = destination_for(path, self.manifest)
        self.query_one("#dest", Input).value = str(path or self.dest)
        if path is None or path == self.dest or self.running:
            return
        self.dest, self._dest_note = path, note
        self._reconfigure()

    def action_toggle_layout(self) -> None:
        if self.check_action("toggle_layout", ()):
            select: Select[str] = self.query_one("#layout", Select)
            select.value = "classic" if self.layout_name == "descriptive" else "descriptive"

    @on(Select.Changed, "#layout")
    def _layout_changed(self, event: Select.Changed) -> None:
        value = str(event.value)
        if value == self.layout_name or event.value is Select.NULL:
            return
        self.layout_name = value
        self._set_message(f"Layout: {value}.")
        # Same root and journal: only new folders change, so no need to re-read anything;
        # a fresh engine (not yet prepared) takes the setting at Start.
        if self.phase != RUNNING:
            self._engine_stale = True

    def action_login(self) -> None:
        if not self.check_action("login", ()):
            return
        username = self.credentials.username if self.credentials else (self.ask_login or "")
        self.push_screen(LoginScreen(username, logged_in=self.credentials is not None,
                                     host=self._login_host(), trust=login_trust(self.session)),
                         self._logged_in)

    def _login_host(self) -> str:
        """The host the password would go to, named in the dialog (never a guess)."""

        try:
            return urlsplit(self.engine.api_url).netloc
        except ValueError:
            return ""

    @on(Button.Pressed, "#login")
    def _login_button(self) -> None:
        self.action_login()

    def _logged_in(self, answer: LoginAnswer | None) -> None:
        """A login (or logout) is tried on a new engine *beside* the current one: until it
        is accepted the table, its finished rows and the old login stay as they were, and
        a refused login changes nothing but the status line."""
        if answer is None:
            return
        if answer.trust:
            self._trust_host(answer.trust == TRUST_ALWAYS)
        if self._fallback is None:  # a second login while the first is read keeps the first
            self._fallback = (self.engine, self.credentials, self.phase)
        self.credentials = answer.credentials
        self.query_one("#user", Label).update(self._login_text())
        self._replace_engine(self._make_engine(), keep_old=True)
        self._prepare_engine()
        self._set_message(f"Logging in as {answer.credentials.username}…" if answer.credentials
                          else "Logging out…")
        self._refresh_controls()

    def _trust_host(self, always: bool) -> None:
        """The user trusts the login's host: for this window's session (a new policy
        that includes it), and with ``always`` in their config file too."""
        host = login_trust(self.session).host
        if always:
            try:
                path = remember_trusted_host(host)
            except NbiaError as exc:
                self.notify(f"{exc} (trusted for this run only)", severity="error",
                            markup=False, timeout=12)
            else:
                self.notify(f"{host} added to trusted_hosts in {path}", markup=False)
        hosts = (*self.options.trusted_hosts, host)
        self.options = replace(self.options, trusted_hosts=hosts)
        self.session = replace(self.session, trusted_hosts=(*self.session.trusted_hosts, host),
                               _policy=None, _lock=threading.Lock())

    # -- buttons --------------------------------------------------------------------------------
    @on(Button.Pressed, "#start")
    def _start_button(self) -> None:
        self.action_start()

    @on(Button.Pressed, "#pause")
    def _pause_button(self) -> None:
        self.action_pause()

    @on(Button.Pressed, "#resume")
    def _resume_button(self) -> None:
        self.action_resume()

    @on(Button.Pressed, "#cancel")
    def _cancel_button(self) -> None:
        self.action_cancel()

    @on(Button.Pressed, "#remove")
    def _remove_button(self) -> None:
        self.action_remove()

    @on(Button.Pressed, "#retry")
    def _retry_button(self) -> None:
        self.action_retry_failed()

    @on(Button.Pressed, "#report")
    def _report_button(self) -> None:
        self.action_save_report()

    # -- leaving ----------------------------------------------------------------------------------
    async def action_quit(self) -> None:
        """``q`` or Ctrl-C. While series are downloading, ask first; quitting then
        cancels the run (published series are complete, the rest resume next time)."""
        engine = self.engine
        if self.phase != RUNNING or engine.finished:
            self._leave()
            return
        if isinstance(self.screen, ConfirmQuitScreen):
            return

        async def answered(quit_now: bool | None) -> None:
            if not quit_now:
                return
            engine.cancel()
            self._set_message("Stopping the downloads…")

            await asyncio.to_thread(engine.wait, 10.0)
            self._leave()

        active = sum(1 for r in list(engine.results.values())
                     if r.state == SeriesState.DOWNLOADING) or len(engine.results)
        self.push_screen(ConfirmQuitScreen(active), answered)

    def _leave(self) -> None:
        """Exit with the run's ending: ``open`` prints :attr:`ending` (the summary, the
        folder, the command that resumes) and exits with the code ``download`` would
        have (130 interrupted, 1 failed series, 0 all complete). A window in which no
        download was started leaves quietly with 0."""
        code = 0
        if self._ran:
            report = self.summary_report()
            self.ending = report.summary(self.resume_command())
            code = run_exit_code(report)
        self.exit(return_code=code)

    def summary_report(self) -> Report:
        """The last run's report over every row of the window (a "Retry failed" run's
        own report holds only the series it retried)."""
        engine = self.engine
        results: dict[str, SeriesResult] = {}
        for uid, row in self.rows.items():
            result = engine.results.get(uid)
            results[uid] = result if result is not None and result.state != \
                SeriesState.NOT_STARTED else row
        return replace(engine.report, results=results, only_failed=False)

    def resume_command(self) -> str:
        """The command line that reopens this download where it stopped: the ``open``
        command as typed, with the destination and layout chosen in the window."""
        args = sys.argv[1:]
        if "open" not in args:
            args = ["open", self.manifest.source or "MANIFEST"]
        dest = str(self.dest)
        if dest not in args:
            args += ["-d", dest]
        if self.layout_name != Layout(self.options.layout).value:
            args += ["--layout", self.layout_name]
        return shlex.join(["nbia-retriever", *args])

    def on_unmount(self) -> None:
        for engine in self._preparing:
            engine.cancel()  # its thread stops after the request in flight
        if self.phase == RUNNING:
            self.engine.cancel()
        elif self.engine not in self._preparing:
            _dispose(self.engine)


def destination_for(folder: Path, manifest: Manifest) -> tuple[Path, str]:
    """The destination for a folder the user typed, and a note saying how it was read.

    As ``verify`` takes ``-d`` (:func:`~nbia_retriever.verify.find_download_root`): the
    download root of this manifest itself stands for its parent, so that the window
    opens that download instead of making a new root inside it. A folder that is the
    root of another manifest is kept, with a warning (a root inside a root is legal but
    rarely meant). Read-only: nothing is created."""
    from ..verify import find_download_root  # the journal code only when a folder is typed

    try:
        root = find_download_root(folder)
    except NbiaError:  # no download there (a new folder), or several: the folder as typed
        return folder, ""
    if root != folder:
        return folder, ""  # the -d folder of a download: the engine finds its root there
    if root.name == root_folder_name(manifest.root_name):
        return folder.parent, f"{folder} is this manifest's download: continuing it. "
    return folder, (f"{folder} is the download of another manifest; this one's series go "
                    f"to {folder / root_folder_name(manifest.root_name)}. ")


def _prepare(engine: Engine) -> tuple[Engine, str]:
    """Runs in a worker thread; errors come back as text for the status line."""
    try:
        engine.prepare()
        engine.fill_finished_metadata()  # the rows of series done before: from the journals
    except AuthError as exc:
        return engine, f"login refused: {exc}"
    except NbiaError as exc:
        return engine, str(exc)
    except OSError as exc:
        return engine, f"cannot use {engine.root}: {exc.strerror or exc}"
    except Exception as exc:  # a network library error must not kill the window
        return engine, f"{type(exc).__name__}: {exc}"
    return engine, ""


def _dispose(engine: Engine) -> None:
    """Close what a prepared-but-never-started engine holds (journal, HTTP pool)."""
    with contextlib.suppress(Exception):
        engine.close()
