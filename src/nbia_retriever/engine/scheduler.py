"""Which series run when, and how many at once.

* :class:`ConcurrencyLimiter` decides how many series stream at once. Two mechanisms,
  both pure bookkeeping over numbers the engine feeds it (no clock of its own, so tests
  drive it step by step):

  - **Finding the link's concurrency** (``explore=True``, the default for a run without
    ``--workers``): start at :data:`INITIAL_STREAMS` (the count curl-and-unzip users
    run), and every sampling window compare the aggregate throughput of the streams with
    the level before. While adding streams makes it rise, add more (doubling, like TCP's
    slow start); when it does not, two windows in a row (the first after a raise may dip
    as streams end and new ones start), step back to the last level that helped. If even
    the first raise did not pay, try fewer streams (halving) while fewer are about as
    fast (within :data:`FEWER_SLACK`): each stream costs CPU and memory here and a
    connection on the server. Then hold, probing one level up now and then. The first
    climb judges every window (a raise's dip is what the second window is for), so a
    run is at full speed within about a second on loopback and a few windows on a slow
    link, instead of waiting a settling window per level; later changes wait one. A
    loopback download on two cores settles at a few streams; a wide link with a
    per-connection cap climbs to ``maximum``. A window in which half the streams or
    more waited the whole window for their first byte (a server that builds each zip
    before sending it) is not judged by its bytes, which come in bursts as answers
    start: the streams wait on the server, not on the link, so more requests in flight
    is what pays, and the count rises (up to ``maximum``, the politeness cap) and never
    steps back on such a window.
  - **Politeness** (AIMD, like TCP congestion control): a server that answers 429 or
    503, or keeps timing out, is asking clients to back off. Every such signal halves
    the limit (at most once per ``limit`` completed series, so a burst of 429s from
    requests already in flight counts once); every ``limit`` successful series in a row
    raise it by one, back up to what exploration had found.

* :class:`WorkQueue` holds the series that are ready (planned, or due for a retry after
  their backoff), hands them to workers in order, and knows when nothing more can come.

A pinned run (``--workers N``) starts at N and never explores; it still backs off when
the server asks.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

#: Streams a run starts with when it explores: what the floor (curl+unzip, 8 at a time)
#: and tcia-utils (10) open from the first second. Starting at 4 cost a third of a short
#: fast download: 8 was reached only 0.76 s into a 1.5 s transfer (issue 26).
INITIAL_STREAMS = 8
#: Relative throughput gain that counts as "it helped".
GAIN = 0.10
#: Fewer streams are kept when they move at least this share of what more moved.
FEWER_SLACK = 0.95
#: Windows between two probes one level up, once settled.
PROBE_EVERY = 12


class ConcurrencyLimiter:
    """How many series may stream at once (see the module docstring)."""

    def __init__(self, maximum: int, *, adaptive: bool = True, explore: bool = False,
                 initial: int | None = None) -> None:
        self.maximum = max(1, maximum)
        self.explore = explore
        start = initial if initial is not None else (INITIAL_STREAMS if explore else maximum)
        self.target = max(1, min(self.maximum, start))  # what exploration stands at
        self._start = self.target
        self.limit = self.target
        self.adaptive = adaptive
        self.active = 0
        self._successes = 0
        self._since_decrease = self.maximum  # allow the first decrease at once
        self._timeouts = 0
        self._cond = threading.Condition()
        # Exploration state.
        self._last_total: int | None = None
        self._last_time = 0.0
        self._rates: dict[int, float] = {}
        self._previous = self.target  # the level before the last raise
        self._settle = 0  # windows to wait before judging a change
        self._raising = explore
        self._climbing = explore  # the first climb: every window judged
        self._fewer = False  # trying fewer streams than the level before
        self._doubt = False  # a raise's first judged window showed no gain
        self._windows = 0

    def __repr__(self) -> str:
        return (f"ConcurrencyLimiter(limit={self.limit}, target={self.target}, "
                f"maximum={self.maximum}, active={self.active})")

    # -- slots ----------------------------------------------------------------------------
    def acquire(self, cancelled: threading.Event,
                done: Callable[[], bool] | None = None) -> bool:
        """Wait for a slot; False once ``cancelled`` is set or ``done()`` says there is
        nothing left to run."""
        with self._cond:
            while self.active >= self.limit:
                if cancelled.is_set() or (done is not None and done()):
                    return False
                self._cond.wait(0.5)
            if cancelled.is_set() or (done is not None and done()):
                return False
            self.active += 1
            return True

    def release(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- politeness -----------------------------------------------------------------------
    def throttled(self) -> int | None:
        """A 429/503 was seen; returns the new limit if it changed."""
        with self._cond:
            if not self.adaptive or self._since_decrease < self.limit or self.limit == 1:
                return None
            self.limit = max(1, self.limit // 2)
            self._since_decrease = 0
            self._successes = 0
            self._raising = self._climbing = self._fewer = False
            return self.limit

    def timed_out(self) -> int | None:
        """An attempt timed out or stalled; the second one in a row halves the limit."""
        with self._cond:
            self._timeouts += 1
            if self._timeouts < 2:
                return None
            self._timeouts = 0
        return self.throttled()

    def succeeded(self) -> int | None:
        """A series completed; returns the new limit if it grew."""
        with self._cond:
            self._since_decrease += 1
            self._timeouts = 0
            if not self.adaptive or self.limit >= self.target:
                return None
            self._successes += 1
            if self._successes >= self.limit:
                self._successes = 0
                self.limit += 1
                self._cond.notify_all()
                return self.limit
            return None

    # -- exploration ----------------------------------------------------------------------
    def sample(self, total_bytes: int, now: float | None = None, *,
               saturated: bool = True, waiting: int = 0) -> int | None:
        """Feed the bytes moved so far by all streams; called once per sampling window.

        ``saturated`` says every slot had work during the window: a window limited by
        the lack of work says nothing about the link, so it is not judged. ``waiting``
        is how many streams waited the whole window for their first byte (see the
        module docstring). Returns the new limit if it changed.
        """
        now = time.monotonic() if now is None else now
        with self._cond:
            last, self._last_total = self._last_total, total_bytes
            elapsed, self._last_time = now - self._last_time, now
            if not self.explore or last is None or elapsed <= 0:
                return None
            rate = (total_bytes - last) / elapsed
            if not saturated or self.limit < self.target:
                return None  # not enough work, or recovering from a throttle
            if self.active > self.limit:
                # Streams above a lowered count are still finishing: the window is not
                # the new level's, nor is the next (it starts with them).
                self._settle = max(self._settle, 1)
                return None
            if self._settle > 0:
                self._settle -= 1
                return None
            level = self.target
            if waiting and 2 * waiting >= max(1, self.active):
                # Idle-waiting, not bandwidth-bound: the rate is not recorded (it would
                # make the next judgement compare bursts).
                self._fewer = self._doubt = False
                if level >= self.maximum:
                    self._raising = self._climbing = False
                    return None
                self._raising = True
                return self._set(min(self.maximum, level * 2), previous=level,
                                 settle=0 if self._climbing else 1)
            known = self._rates.get(level)
            self._rates[level] = rate if known is None else 0.5 * (known + rate)
            before = self._rates.get(self._previous)
            self._windows += 1
            if self._fewer:
                assert before is not None
                if rate >= before * FEWER_SLACK:  # as fast with fewer: try fewer still
                    self._doubt = False
                    if level > 1:
                        return self._set(level // 2, previous=level)
                    self._fewer = False
                    return None
                # No second look: fewer streams have no start-up dip, and the window
                # judged began once the streams above the count had finished.
                self._fewer = False
                return self._set(self._previous, previous=self._previous)
            if self._raising:
                if before is None or level == self._previous or rate >= before * (1 + GAIN):
                    if level >= self.maximum:
                        self._raising = self._climbing = False
                        return None
                    return self._set(min(self.maximum, level * 2), previous=level,
                                     settle=0 if self._climbing else 1)
                if not self._doubt:
                    # One window more before the verdict: a window in which streams end
                    # and new ones start (a request's latency, TCP's slow start) dips
                    # whatever the level; the next one is averaged with it.
                    self._doubt = True
                    return None
                # The raise did not pay for itself: back to the level that did. (Holding
                # a level "about as good" would let every probe ratchet the count up.)
                self._raising = False
                back = self._previous
                if self._climbing and back == self._start and back > 1:
                    # Not even the first raise paid: perhaps fewer streams do as well.
                    # Judged against the start level's rate (measured before the raise);
                    # a window to settle first, as streams above the new count finish.
                    self._climbing, self._fewer = False, True
                    return self._set(back // 2, previous=back, settle=1)
                self._climbing = False
                return self._set(back, previous=back)
            if self._windows % PROBE_EVERY == 0 and level < self.maximum:
                self._raising = True
                return self._set(level + max(1, level // 4), previous=level)
            return None

    def _set(self, level: int, *, previous: int, settle: int = 1) -> int | None:
        level = max(1, min(self.maximum, level))
        self._previous = previous
        self._settle = settle
        self._doubt = False
        if level == self.target:
            return None
        self.target = self.limit = level
        self._cond.notify_all()
        return level


class WorkQueue:
    """Series ready to run, in order; retries come back when their backoff is over.

    ``get`` blocks until a series is due, the run is cancelled, or nothing more can come
    (the planner is done, nothing is waiting, and no series is in a worker's hands:
    such a series may still come back as a retry).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: deque[str] = deque()
        self._later: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._in_hand = 0
        self._closed = False
        self.dropped: set[str] = set()

    def put(self, uids: Iterable[str]) -> None:
        with self._cond:
            self._ready.extend(uids)
            self._cond.notify_all()

    def retry_later(self, uid: str, delay: float) -> None:
        """A worker gives a series back, to run again in ``delay`` seconds."""
        with self._cond:
            self._in_hand -= 1
            heapq.heappush(self._later, (time.monotonic() + max(0.0, delay),
                                         next(self._seq), uid))
            self._cond.notify_all()

    def done(self, uid: str) -> None:
        """A worker is finished with a series (whatever the outcome)."""
        with self._cond:
            self._in_hand -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """No more new series will be put (the planner is done)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drop(self, uids: Iterable[str]) -> None:
        """Series removed from the run: skipped when their turn comes."""
        with self._cond:
            self.dropped.update(uids)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._closed and not self._ready and not self._later and not self._in_hand

    def get(self, cancelled: threading.Event, running: threading.Event) -> str | None:
        with self._cond:
            while True:
                if cancelled.is_set():
                    return None
                if running.is_set():
                    now = time.monotonic()
                    if self._later and self._later[0][0] <= now:
                        uid = heapq.heappop(self._later)[2]
                    elif self._ready:
                        uid = self._ready.popleft()
                    else:
                        uid = None
                    if uid is not None:
                        if uid in self.dropped:
                            continue
                        self._in_hand += 1
                        return uid
                if self._closed and not self._ready and not self._later and not self._in_hand:
                    self._cond.notify_all()
                    return None
                wait = 0.5
                if self._later and running.is_set():
                    wait = min(wait, max(0.0, self._later[0][0] - time.monotonic()))
                self._cond.wait(wait if wait > 0 else 0.01)
