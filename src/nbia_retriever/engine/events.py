"""What an engine tells its front ends: events as they happen, stats when asked.

Front ends either subscribe to :class:`Event` objects (delivered from engine threads:
record and return, never block) or poll :meth:`Engine.stats` for a :class:`Stats`
snapshot. ``--json`` writes each event's :meth:`Event.as_dict` as one line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from ..models import SeriesState
from ..untrusted import plain, redact


class EventKind(StrEnum):
    """The kinds of :class:`Event`.

    * ``planned``: a batch of series has its metadata and folders (``count``: how many
      series are planned so far; the last one of a run says ``done``)
    * ``state``: a series changed status
    * ``progress``: bytes written for a series (throttled, about one per MiB)
    * ``retry``: an attempt failed and will be retried
    * ``throttle``: the server said 429/503 (or timed out repeatedly) and the number of
      streams went down
    * ``concurrency``: the number of concurrent streams changed (``count``)
    * ``message``: anything else worth a line (pause, resume, notes)
    * ``error``: the run cannot go on (``message`` says why, in one line)
    * ``finished``: the run is over (``message``: the summary)
    """

    PLANNED = "planned"
    STATE = "state"
    PROGRESS = "progress"
    RETRY = "retry"
    THROTTLE = "throttle"
    CONCURRENCY = "concurrency"
    MESSAGE = "message"
    ERROR = "error"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class Event:
    """A progress event, delivered to subscribers from engine threads."""

    kind: EventKind
    uid: str = ""
    #: The series' new state, in ``state`` events (written by :class:`~.ledger.Ledger`).
    state: SeriesState | None = None
    attempt: int = 0
    series_bytes: int = 0
    count: int = 0
    message: str = ""
    time: float = field(default_factory=time.time)
    #: The source of the series (``DownloadOptions.source``) in a series' events.
    source: str = ""

    def as_dict(self) -> dict[str, object]:
        """The JSON form: server text in ``message`` is plain and secret-free."""
        data: dict[str, object] = {"event": self.kind.value, "time": round(self.time, 3)}
        if self.uid:
            data["uid"] = self.uid
        if self.source:
            data["source"] = self.source
        if self.state is not None:
            data["state"] = str(self.state)
        if self.message:
            data["message"] = redact(plain(self.message))  # plain first: see untrusted.quote
        if self.attempt:
            data["attempt"] = self.attempt
        if self.kind is EventKind.PROGRESS:
            data["bytes"] = self.series_bytes
        if self.kind in (EventKind.CONCURRENCY, EventKind.THROTTLE, EventKind.PLANNED):
            data["count"] = self.count
        return data


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot for progress displays.

    ``bytes_verified`` only grows (published series); ``bytes_in_flight`` is what
    running attempts have written so far and drops back when an attempt is discarded.
    Their sum is ``bytes_done``. A bar drawn from ``bytes_verified + bytes_in_flight``
    with ``bytes_total`` as its end may wobble on a retry; one drawn from
    :attr:`progress_bytes` never goes backwards.
    """

    bytes_verified: int = 0
    bytes_in_flight: int = 0
    bytes_total: int = 0
    series_total: int = 0
    complete: int = 0
    failed: int = 0
    active: int = 0
    planned: int = 0
    planning: bool = False
    concurrency: int = 0
    elapsed: float = 0.0
    progress_bytes: int = 0
    bytes_received: int = 0  # off the wire, discarded attempts included: for speeds
    processes: int = 0  # worker processes ready to stream (engine.procs)
    worker_attempts: int = 0  # attempts those processes ran (the others ran on threads)
    #: Series streams open right now (threads and worker processes): what is really
    #: downloading, not the limiter's target (``concurrency``) nor the rows in Downloading.
    open_streams: int = 0

    @property
    def bytes_done(self) -> int:
        return self.bytes_verified + self.bytes_in_flight
