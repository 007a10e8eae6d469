"""The one writer of series state: :class:`Ledger`.

Every change of a series' :class:`~nbia_retriever.models.SeriesState` in a run goes
through :meth:`Ledger.move` (or :meth:`Ledger.move_many` for a planning batch), which
writes the state, keeps the count of series in each state and the report's
``skipped``/``adopted`` tallies under one lock, and then emits the ``state`` event. So the
counts a progress display asks for several times a second are a copy of a dict of nine
entries, not a pass over 200,000 results, and no two threads can lose a tally (a worker
finding its series completed by another run used to bump ``report.skipped`` unlocked).
The planning counters (series planned, to download, their bytes) change with the states
(:meth:`Ledger.plan`, :meth:`Ledger.drop`), so they live here too.

The lock is the engine's lock too (``Engine._lock``): what the engine keeps beside a
state (bytes, streams) changes under the same lock, and events are emitted outside it, so
a subscriber may call back into the engine (``stats()``) without a deadlock.
"""

from __future__ import annotations

import operator
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from ..models import SeriesInfo, SeriesState
from ..report import Report, SeriesResult
from .events import Event, EventKind

_STATE = operator.attrgetter("state")

#: A report tally a transition also counts: a series done before this run, or adopted.
Tally = Literal["skipped", "adopted"]


class Ledger:
    """The states of a run's series, their counts, and the ``state`` events.

    ``results`` is the engine's (and its report's) map of series; the ledger is the only
    code that assigns a result's ``state`` or removes a result, so :meth:`counts` always
    equals counting the states of ``results`` (``tests/test_ledger.py`` holds both to it).
    """

    def __init__(self, results: dict[str, SeriesResult], report: Report,
                 emit: Callable[[Event], None], source: str) -> None:
        self.results = results
        self.report = report
        self.lock = threading.Lock()
        self._emit = emit
        self._source = source
        # Counted in C once (attrgetter, Counter); every transition keeps it up to date.
        self._counts: Counter[SeriesState] = Counter(map(_STATE, results.values()))
        #: Series planning has looked at (to download, unavailable or adopted).
        self.planned = 0
        #: Series planned for download (a result's ``variant`` is set), and their bytes.
        self.to_download = 0
        self.total_bytes = 0

    def counts(self) -> Mapping[SeriesState, int]:
        """How many series are in each state now (a copy: a state absent counts 0)."""
        with self.lock:
            return Counter(self._counts)

    def move(self, uid: str, state: SeriesState, *, message: str = "", attempt: int = 0,
             emit: bool = True, tally: Tally | None = None,
             record: Callable[[SeriesResult], None] | None = None) -> SeriesResult | None:
        """Put series ``uid`` in ``state`` (None if it is not in this run).

        ``tally`` also counts it in the report; ``record`` runs after the write and before
        the event (the engine writes the journal there); ``emit=False`` is for planning,
        which announces no state of a series before the run starts.
        """
        with self.lock:
            result = self.results.get(uid)
            if result is None:
                return None
            self._write(result, state)
            if tally is not None:
                self._tally(tally, 1)
                if tally == "skipped" and result.variant is not None:
                    self._unplan_bytes(result)  # another run of this root fetched it
        if record is not None:
            record(result)
        if emit:
            self._emit(Event(EventKind.STATE, uid=uid, source=self._source, state=state,
                             attempt=attempt, message=message))
        return result

    def plan(self, ready: Iterable[tuple[str, SeriesInfo, int]], seen: int, *,
             started: bool) -> list[str]:
        """A planning batch: ``ready`` (uid, metadata, folder variant) are to download,
        queued if the run has ``started`` (and announced, before a worker can take them),
        else not started; ``seen`` series were planned in all. Returns the uids taken."""
        state = SeriesState.QUEUED if started else SeriesState.NOT_STARTED
        taken: list[str] = []
        total = 0
        with self.lock:
            results, counts = self.results, self._counts
            for uid, meta, variant in ready:  # _write inlined: a 200,000-series plan
                result = results.get(uid)
                if result is None:
                    continue
                counts[result.state] -= 1
                result.info, result.state, result.variant = meta, state, variant
                total += meta.file_size or 0
                taken.append(uid)
            counts[state] += len(taken)
            self.total_bytes += total
            self.to_download += len(taken)
            self.planned += seen
        if started:
            for uid in taken:
                self._emit(Event(EventKind.STATE, uid=uid, source=self._source, state=state))
        return taken

    def planned_text(self, final: bool, of: int) -> str:
        """The ``planned`` event's line (``of``: how many series planning looks at)."""
        done = self.report.skipped + self.report.adopted
        head = f"{self.to_download} series to download, {done} already complete"
        if not final:
            return f"{head} ({self.planned} of {of} planned so far)"
        return head

    def move_many(self, uids: Iterable[str], state: SeriesState, *, emit: bool = True,
                  tally: Tally | None = None) -> list[str]:
        """:meth:`move` for a batch under one lock (planning); returns the uids moved."""
        moved: list[str] = []
        with self.lock:
            results, counts = self.results, self._counts
            for uid in uids:  # _write inlined: planning moves 200,000 at once
                result = results.get(uid)
                if result is not None:
                    counts[result.state] -= 1
                    result.state = state
                    moved.append(uid)
            counts[state] += len(moved)
            if tally is not None:
                self._tally(tally, len(moved))
        if emit:
            for uid in moved:
                self._emit(Event(EventKind.STATE, uid=uid, source=self._source, state=state))
        return moved

    def drop(self, uids: Iterable[str]) -> list[SeriesResult]:
        """Take series out of the run (and out of the counts); returns those removed."""
        gone: list[SeriesResult] = []
        with self.lock:
            for uid in uids:
                result = self.results.pop(uid, None)
                if result is not None:
                    self._counts[result.state] -= 1
                    if result.variant is not None:
                        self.to_download -= 1
                        self._unplan_bytes(result)
                    gone.append(result)
        return gone

    # Both below run under self.lock.
    def _write(self, result: SeriesResult, state: SeriesState) -> None:
        self._counts[result.state] -= 1
        self._counts[state] += 1
        result.state = state

    def _tally(self, tally: Tally, n: int) -> None:
        if tally == "skipped":
            self.report.skipped += n
        else:
            self.report.adopted += n

    def _unplan_bytes(self, result: SeriesResult) -> None:
        if result.info:
            self.total_bytes -= result.info.file_size or 0
