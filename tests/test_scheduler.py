"""The concurrency controller, driven window by window with made-up links (pure: the
limiter has no clock of its own, so no test here waits for anything)."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from nbia_retriever.engine import ConcurrencyLimiter
from nbia_retriever.engine.scheduler import INITIAL_STREAMS, PROBE_EVERY


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
    assert limiter.limit == INITIAL_STREAMS
    seen = drive(limiter, per_connection_cap, 12)
    assert 8 in seen and seen[-1] == 16
    assert seen == sorted(seen)  # never stepped back on the way up


def test_steps_back_where_more_streams_stop_helping() -> None:
    limiter = ConcurrencyLimiter(16, explore=True)
    seen = drive(limiter, two_cores, 3 * PROBE_EVERY)
    assert 8 in seen  # it tried more ...
    assert seen[-1] == 4  # ... and came back to the level that was best
    probes = [s for s in seen[seen.index(8) + 3:] if s > 4]
    assert probes and max(probes) <= 5  # settled: probes one level up, now and then


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
    limiter = ConcurrencyLimiter(16, explore=True)
    judged = {"dips": 0}

    def turnover(streams: int) -> float:
        if streams == 8 and judged["dips"] < 2:  # the settle window and the first judged
            judged["dips"] += 1
            return per_connection_cap(4)
        return per_connection_cap(streams)

    seen = drive(limiter, turnover, 12)
    assert seen[-1] == 16 and seen == sorted(seen)
