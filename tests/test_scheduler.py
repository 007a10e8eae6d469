"""The concurrency controller, driven window by window with made-up links (pure: the
limiter has no clock of its own, so no test here waits for anything)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from nbia_retriever.engine import ConcurrencyLimiter
from nbia_retriever.engine.scheduler import FEWER_SLACK, INITIAL_STREAMS, PROBE_EVERY

#: The engine's sampling window (engine.run.SAMPLE_WINDOW); its first sample is the
#: baseline, so window k of :func:`drive` ends (k + 1) windows into the run.
WINDOW = 0.25


def drive(limiter: ConcurrencyLimiter, link: Callable[[int], float], windows: int, *,
          saturated: bool = True) -> list[int]:
    """Feed ``windows`` one-second windows of a link moving ``link(streams)`` bytes/s;
    the limit after each window."""
    total, now, seen = 0.0, 0.0, []
    limiter.sample(0, now, saturated=saturated)
    for _ in range(windows):
        now += 1.0
        total += link(limiter.limit)
        limiter.sample(int(total), now, saturated=saturated)
        seen.append(limiter.limit)
    return seen


def per_connection_cap(streams: int) -> float:
    """A wide link: 10 MB/s per connection, no shared bottleneck below 16."""
    return 10e6 * min(streams, 16)


def two_cores(streams: int) -> float:
    """Loopback on two cores: best at 4 streams, a little worse with more."""
    return 200e6 - 2e6 * max(0, streams - 4) if streams >= 4 else 50e6 * streams


def test_climbs_to_the_maximum_on_a_link_that_rewards_streams() -> None:
    limiter = ConcurrencyLimiter(16, explore=True)
    assert limiter.limit == INITIAL_STREAMS == 8
    seen = drive(limiter, per_connection_cap, 12)
    assert seen[0] == 16  # the first judged window: half a second into the run
    assert seen == [16] * 12  # never stepped back on the way up


def test_steps_back_where_more_streams_stop_helping() -> None:
    limiter = ConcurrencyLimiter(16, explore=True)
    seen = drive(limiter, two_cores, 3 * PROBE_EVERY)
    assert 16 in seen  # it tried more ...
    assert 2 in seen  # ... and fewer ...
    assert seen[-1] == 4  # ... and came back to the level that was best
    probes = [s for s in seen[seen.index(2) + 3:] if s > 4]
    assert probes and max(probes) <= 5  # settled: probes one level up, now and then


def settled_after(seen: list[int], best: int) -> int:
    """Windows until the limit is ``best`` for good (in ``seen``)."""
    last_other = max((i for i, s in enumerate(seen) if s != best), default=-1)
    return last_other + 1


def loopback_best_at_8(streams: int) -> float:
    """A fast server on two cores: 8 streams best, a little worse above, worse below."""
    return 250e6 - 3e6 * (streams - 8) if streams >= 8 else 250e6 * streams / 8


def test_full_speed_within_a_second_on_loopback() -> None:
    """Issue 26: the run starts where loopback is fastest and, after trying 16 and 4,
    is back there within a second (four 0.25 s windows; the first is the baseline)."""
    limiter = ConcurrencyLimiter(16, explore=True)
    seen = drive(limiter, loopback_best_at_8, PROBE_EVERY - 1)
    assert limiter.limit == 8 and set(seen) == {16, 4, 8}
    assert (settled_after(seen, 8) + 1) * WINDOW <= 1.5
    assert seen.count(16) <= 2 and seen.count(4) <= 2  # tried, not dwelt on


def test_fewer_streams_found_quickly_when_they_do_as_well() -> None:
    """Two cores, best at 4: found within a second and a half, and never below."""
    limiter = ConcurrencyLimiter(16, explore=True)
    seen = drive(limiter, two_cores, PROBE_EVERY - 1)
    assert seen[-1] == 4 and min(seen) == 2
    assert (seen.index(4) + 1) * WINDOW <= 1.0


def test_fewer_streams_kept_only_within_the_slack() -> None:
    """A link where 4 streams move 10% less than 8 (outside FEWER_SLACK) stays at 8."""
    def link(streams: int) -> float:
        return {16: 100e6, 8: 100e6}.get(streams, 100e6 * (1 - 2 * (1 - FEWER_SLACK)))

    limiter = ConcurrencyLimiter(16, explore=True)
    seen = drive(limiter, link, PROBE_EVERY - 1)
    assert seen[-1] == 8 and 4 in seen


def test_a_slow_wide_link_reaches_the_maximum_in_a_few_windows() -> None:
    """IDC's 64 streams at 10 MB/s each: 8, 16, 32, 64 in three judged windows."""
    limiter = ConcurrencyLimiter(64, explore=True)
    seen = drive(limiter, lambda n: 10e6 * n, 8)
    assert seen[:3] == [16, 32, 64] and seen[-1] == 64


def test_a_throttle_while_trying_fewer_stops_there() -> None:
    limiter = ConcurrencyLimiter(16, explore=True)
    drive(limiter, two_cores, 3)  # 16 tried, now at 4 trying fewer
    assert limiter.limit == 4
    assert limiter.throttled() == 2
    seen = drive(limiter, two_cores, PROBE_EVERY - 2)
    assert max(seen) <= 4  # recovers additively, to what exploration had found


def test_timeouts_twice_in_a_row_still_halve_from_the_start() -> None:
    limiter = ConcurrencyLimiter(16, explore=True)
    assert limiter.timed_out() is None
    assert limiter.timed_out() == INITIAL_STREAMS // 2
    seen = drive(limiter, per_connection_cap, 6)
    assert max(seen) <= INITIAL_STREAMS  # no climb while recovering from the step back


def test_windows_short_of_work_are_not_judged() -> None:
    limiter = ConcurrencyLimiter(16, explore=True)
    assert drive(limiter, per_connection_cap, 20, saturated=False) == [INITIAL_STREAMS] * 20


def test_pinned_workers_never_explore_but_still_back_off() -> None:
    limiter = ConcurrencyLimiter(6, explore=False)
    assert drive(limiter, per_connection_cap, 20) == [6] * 20
    assert limiter.throttled() == 3


def test_a_throttle_during_exploration_stops_the_climb() -> None:
    limiter = ConcurrencyLimiter(16, explore=True)
    drive(limiter, per_connection_cap, 3)
    high = limiter.limit
    assert limiter.throttled() == high // 2
    seen = drive(limiter, per_connection_cap, 10)
    assert max(seen) <= high  # recovers additively, to what exploration had found


@settings(max_examples=200, deadline=None)
@given(maximum=st.integers(1, 64), rates=st.lists(st.floats(0, 1e9), min_size=1, max_size=60),
       throttles=st.sets(st.integers(0, 59)), pinned=st.booleans())
def test_the_limit_stays_between_one_and_the_maximum(maximum: int, rates: list[float],
                                                     throttles: set[int],
                                                     pinned: bool) -> None:
    limiter = ConcurrencyLimiter(maximum, explore=not pinned)
    total, now = 0.0, 0.0
    limiter.sample(0, now)
    for i, rate in enumerate(rates):
        now += 1.0
        total += rate
        limiter.sample(int(total), now, saturated=i % 3 != 0)
        if i in throttles:
            limiter.throttled()
        limiter.succeeded()
        assert 1 <= limiter.limit <= maximum
        assert limiter.limit <= limiter.target or limiter.limit <= maximum


def test_a_dip_in_the_first_window_after_a_raise_is_not_the_verdict() -> None:
    """On a wide link the window just after a raise can dip (streams ending, new ones
    still starting): the raise gets one more window, and the climb goes on."""
    limiter = ConcurrencyLimiter(32, explore=True)
    judged = {"dips": 0}

    def turnover(streams: int) -> float:
        if streams == 16 and judged["dips"] < 1:  # the first window at 16 (no settling)
            judged["dips"] += 1
            return 10e6 * 8
        return 10e6 * streams

    seen = drive(limiter, turnover, 12)
    assert seen[-1] == 32 and seen == sorted(seen)


def test_fewer_streams_are_judged_only_once_the_extra_streams_have_finished() -> None:
    """After the count drops, the streams above it run on until their series end: those
    windows say nothing about the lower count, however long they last."""
    limiter = ConcurrencyLimiter(16, explore=True)
    never = threading.Event()
    now, total = 0.0, 0.0
    limiter.sample(0, now)

    def window(rate: float) -> int | None:
        nonlocal now, total
        now += 1.0
        total += rate
        return limiter.sample(int(total), now)

    assert window(two_cores(8)) == 16
    for _ in range(16):
        assert limiter.acquire(never)
    assert window(two_cores(16)) is None  # the raise's second look
    assert window(two_cores(16)) == 4  # it did not pay: try fewer
    for _ in range(10):  # still 16 streams, then 6: draining, nothing judged
        assert window(two_cores(16)) is None
    for _ in range(10):
        limiter.release()
    assert window(two_cores(6)) is None
    for _ in range(2):
        limiter.release()
    assert window(two_cores(6)) is None  # began with 6 streams: not the new level's
    assert window(two_cores(4)) == 2  # a clean window at 4: as fast, so fewer still
