"""The one retry table (`classify`) and the one retry policy (`RetryPolicy`).

Every retry loop (series attempts through `NbiaSource.verdict`, `NbiaClient.call`, the
API version probe) asks `classify`; these tests pin the table row by row, and the
policy's arithmetic (attempts, exhaustion, backoff bounds, Retry-After) without sleeping.
"""

from __future__ import annotations

import random

import pytest

from nbia_retriever.api import Credentials, NbiaClient
from nbia_retriever.api.client import ApiMismatch, StaleToken
from nbia_retriever.engine.source import NbiaSource
from nbia_retriever.errors import (
    ApiError,
    AuthError,
    DiskFullError,
    IntegrityError,
    NbiaError,
    NetworkError,
    NoRoomError,
    NotPublicError,
    TlsError,
    UnsafeArchiveError,
    UntrustedHostError,
)
from nbia_retriever.models import SeriesState
from nbia_retriever.retry import BACKOFF_MAX, RetryPolicy, Verdict, backoff_delay, classify

# ------------------------------------------------------------------------------ classify

FINAL_ERROR = Verdict(retry=False)
RETRY = Verdict(retry=True)


@pytest.mark.parametrize(("error", "verdict"), [
    (TlsError("self-signed"), Verdict(retry=False, fatal=True)),
    (UntrustedHostError("a manifest's host"), Verdict(retry=False, fatal=True)),
    (NotPublicError("HTTP 400 not public", status=400),
     Verdict(retry=False, state=SeriesState.NOT_AUTHORIZED)),
    (NotPublicError("HTTP 462", status=462),
     Verdict(retry=False, state=SeriesState.NOT_AUTHORIZED)),
    (AuthError("HTTP 401"), Verdict(retry=False, state=SeriesState.NOT_AUTHORIZED)),
    (StaleToken("HTTP 401 with a token"),
     Verdict(retry=False, state=SeriesState.NOT_AUTHORIZED)),
    (NetworkError("reset"), RETRY),
    (NetworkError("stalled", timeout=True), Verdict(retry=True, timeout=True)),
    (ApiError("HTTP 429", status=429, retry_after=7.0),
     Verdict(retry=True, retry_after=7.0, throttle=True)),
    (ApiError("HTTP 503", status=503), Verdict(retry=True, throttle=True)),
    (ApiError("HTTP 500", status=500, retry_after=2.0), Verdict(retry=True, retry_after=2.0)),
    (ApiError("HTTP 502", status=502), RETRY),
    (ApiError("HTTP 404", status=404), FINAL_ERROR),
    (ApiError("HTTP 410", status=410), FINAL_ERROR),
    (ApiMismatch("HTTP 400 invalid query parameter", status=400), FINAL_ERROR),
    (ApiError("a redirect to another host; not followed", status=302), FINAL_ERROR),
    # A 200 that is an HTML or JSON page instead of a zip: the next answer may be the zip.
    (ApiError("the server sent text/html instead of a zip", status=200), RETRY),
    (ApiError("malformed JSON"), RETRY),
    (IntegrityError("MD5 mismatch"), RETRY),
    (UnsafeArchiveError("a path outside the series"), RETRY),
    (NoRoomError("this series does not fit"), RETRY),
    (NbiaError("anything else"), RETRY),
])
def test_classify_table(error: NbiaError, verdict: Verdict) -> None:
    assert classify(error) == verdict


def test_a_401_is_retried_only_when_logged_in() -> None:
    """Logged in, the token went stale under us; without a login the series needs one."""
    for error in (AuthError("HTTP 401"), StaleToken("HTTP 401")):
        assert classify(error, logged_in=True) == RETRY
        assert classify(error, logged_in=False).state is SeriesState.NOT_AUTHORIZED
    # What stops the run stays fatal, logged in or not.
    assert classify(UntrustedHostError("x"), logged_in=True).fatal


def test_classify_takes_any_exception() -> None:
    assert classify(DiskFullError("full")).retry  # the engine stops the run before asking
    assert classify(ValueError("not ours")) == RETRY


def test_nbia_source_verdict_is_the_table() -> None:
    """The engine's retry loop asks the source, which answers from the one table."""
    errors = [TlsError("t"), NotPublicError("n", status=460), AuthError("a"),
              NetworkError("n", timeout=True), ApiError("e", status=429, retry_after=3.0),
              ApiError("e", status=404), ApiError("e", status=500), IntegrityError("i")]
    anonymous = NbiaSource(NbiaClient("http://127.0.0.1:9/nbia-api/services"))
    member = NbiaSource(NbiaClient("http://127.0.0.1:9/nbia-api/services",
                                   credentials=Credentials("alice", "secret")))
    try:
        for error in errors:
            assert anonymous.verdict(error) == classify(error, logged_in=False)
            assert member.verdict(error) == classify(error, logged_in=True)
    finally:
        anonymous.close()
        member.close()


# --------------------------------------------------------------------------- RetryPolicy


def test_a_fresh_policy_has_every_retry_left() -> None:
    policy = RetryPolicy(total=2)
    assert (policy.attempts, policy.exhausted, policy.last_error) == (0, False, "")


def test_total_counts_retries_after_the_first_attempt() -> None:
    policy = RetryPolicy(total=2)
    policy = policy.increment("first")
    assert not policy.exhausted
    policy = policy.increment("second")
    assert not policy.exhausted
    policy = policy.increment("third")
    assert policy.exhausted and policy.attempts == 3 and policy.last_error == "third"


def test_zero_retries_means_one_attempt() -> None:
    assert RetryPolicy(total=0).increment("only").exhausted


def test_increment_never_mutates() -> None:
    policy = RetryPolicy(total=1)
    after = policy.increment("x")
    assert policy.attempts == 0 and policy.history == ()
    assert after.attempts == 1 and after.history == ("x",)


def test_a_failure_that_does_not_count_is_recorded_without_spending_a_retry() -> None:
    policy = RetryPolicy(total=0).increment("dropped while paused", counts=False)
    assert policy.attempts == 0 and not policy.exhausted
    assert policy.last_error == "dropped while paused"


def test_history_keeps_the_last_ten() -> None:
    policy = RetryPolicy(total=100)
    for n in range(25):
        policy = policy.increment(f"e{n}")
    assert policy.history == tuple(f"e{n}" for n in range(15, 25))
    assert policy.attempts == 25


@pytest.mark.parametrize("attempts", [1, 2, 3, 6])
def test_backoff_is_exponential_with_jitter_in_its_upper_half(attempts: int) -> None:
    policy = RetryPolicy(total=10, backoff_base=1.0, attempts=attempts)
    exp = 2.0 ** (attempts - 1)
    rng = random.Random(attempts)
    for _ in range(200):
        delay = policy.backoff(rng=rng)
        assert exp / 2 <= delay <= exp


def test_backoff_before_any_failure_is_that_of_the_first() -> None:
    rng = random.Random(1)
    for _ in range(50):
        assert 0.5 <= RetryPolicy(backoff_base=1.0).backoff(rng=rng) <= 1.0


def test_backoff_honours_retry_after_and_the_cap() -> None:
    policy = RetryPolicy(total=50, backoff_base=1.0, attempts=1)
    assert policy.backoff(retry_after=30.0) == 30.0
    assert policy.backoff(retry_after=10 * BACKOFF_MAX) == BACKOFF_MAX
    far = RetryPolicy(total=50, backoff_base=2.0, attempts=40, backoff_max=60.0)
    rng = random.Random(0)
    assert all(30.0 <= far.backoff(rng=rng) <= 60.0 for _ in range(100))


def test_backoff_delay_is_a_fresh_policy_after_n_failures() -> None:
    assert 2.0 <= backoff_delay(2, 2.0) <= 4.0
    assert backoff_delay(1, 1.0, retry_after=9.0) == 9.0
    assert backoff_delay(30, 1.0, cap=5.0) <= 5.0
