"""One retry table and one retry policy for every retry loop: series downloads, API
calls, the version probe.

:func:`classify` says what a failure means (retried or final, in which state, whether
the server asked to slow down, whether the whole run must stop): the one table of what
is retried. :class:`RetryPolicy` says how often and how long to wait.

Modelled on urllib3's ``Retry``: an immutable value. A loop holds one, and each failure
replaces it with ``policy.increment(error)``; the new value knows how many attempts are
left and how long to wait. Nothing is mutated, so a policy can be shared, logged and
tested on its own, and the rules (how many, how long, what does not count) live here
and nowhere else.

>>> policy = RetryPolicy(total=2, backoff_base=1.0)
>>> policy = policy.increment("HTTP 503")
>>> policy.attempts, policy.exhausted
(1, False)
>>> policy.increment("reset").increment("reset").exhausted
True
>>> 1.0 <= RetryPolicy(total=1, backoff_base=1.0).increment("x").backoff(retry_after=1.0)
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from .errors import (
    ApiError,
    AuthError,
    IntegrityError,
    NetworkError,
    NotPublicError,
    TlsError,
    UntrustedHostError,
)
from .models import SeriesState

#: Longest wait between two attempts, whatever the backoff or the server's Retry-After.
BACKOFF_MAX = 300.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do after a failed attempt.

    ``retry``: try again (after a backoff of at least ``retry_after``); otherwise the
    series ends in ``state``. ``throttle``: the server asked clients to slow down.
    ``timeout``: the attempt timed out or stalled. ``fatal``: stop the whole run
    (a certificate that cannot be verified, a login that cannot work).
    """

    retry: bool
    state: SeriesState = SeriesState.ERROR
    retry_after: float | None = None
    throttle: bool = False
    timeout: bool = False
    fatal: bool = False


def classify(error: BaseException, *, logged_in: bool = False) -> Verdict:
    """The one table of what is retried, for every retry loop.

    ``logged_in``: an :class:`AuthError` on a run that holds a token is the token going
    stale under us, worth another attempt; without a login it means the series needs
    one. A loop that already refreshes the token itself (``NbiaClient.call``) passes
    False. Statuses: 429 and 503 are the server asking to slow down; any other status
    from 300 to 499 (a refused redirect, a 4xx) is an answer that will not change; 5xx,
    a 200 that is not what was asked for (an HTML page instead of a zip) and no status at
    all (malformed or oversized answers) are worth another try.

    >>> verdict = classify(NetworkError("stalled", timeout=True))
    >>> verdict.retry, verdict.timeout, verdict.fatal
    (True, True, False)
    >>> classify(ApiError("busy", status=503, retry_after=30.0)).throttle
    True
    >>> classify(ApiError("gone", status=404)).retry, classify(ApiError("oops", status=500)).retry
    (False, True)
    >>> classify(ApiError("an HTML page instead of a zip", status=200)).retry
    True
    >>> print(classify(NotPublicError("460", status=460)).state)
    Not Authorized
    >>> classify(TlsError("self-signed")).fatal
    True
    >>> classify(AuthError("401")).retry, classify(AuthError("401"), logged_in=True).retry
    (False, True)
    """
    if isinstance(error, TlsError | UntrustedHostError):
        return Verdict(retry=False, fatal=True)
    if isinstance(error, NotPublicError):
        return Verdict(retry=False, state=SeriesState.NOT_AUTHORIZED)
    if isinstance(error, AuthError):
        if logged_in:
            return Verdict(retry=True)
        return Verdict(retry=False, state=SeriesState.NOT_AUTHORIZED)
    if isinstance(error, IntegrityError):  # a short or corrupt stream: the next may be whole
        return Verdict(retry=True)
    if isinstance(error, NetworkError):
        return Verdict(retry=True, timeout=error.timeout)
    if isinstance(error, ApiError):
        status = error.status
        if status in (429, 503):
            return Verdict(retry=True, retry_after=error.retry_after, throttle=True)
        if status is not None and 300 <= status < 500:
            return Verdict(retry=False)
        return Verdict(retry=True, retry_after=error.retry_after)
    return Verdict(retry=True)


@dataclass(frozen=True)
class RetryPolicy:
    """How often to try again and how long to wait in between.

    ``total`` is the number of retries allowed after the first attempt (the manifest's
    ``noOfrRetry``). ``attempts`` counts the failures that counted so far; ``history``
    keeps their messages (the last one is what a report shows).
    """

    total: int = 4
    backoff_base: float = 2.0
    backoff_max: float = BACKOFF_MAX
    attempts: int = 0
    history: tuple[str, ...] = field(default=(), repr=False)

    def increment(self, error: str, *, counts: bool = True) -> RetryPolicy:
        """The policy after one more failure. ``counts=False`` records it without
        spending a retry: a stream the server dropped while the user had paused, or an
        API-version fallback, is not the series' fault."""
        history = (*self.history[-9:], error)
        return replace(self, attempts=self.attempts + (1 if counts else 0), history=history)

    @property
    def exhausted(self) -> bool:
        """No retry left: the last failure is final."""
        return self.attempts > self.total

    @property
    def last_error(self) -> str:
        return self.history[-1] if self.history else ""

    def backoff(self, retry_after: float | None = None,
                rng: random.Random | None = None) -> float:
        """Seconds to wait before the next attempt: exponential with full jitter, never
        shorter than the server's ``Retry-After`` (both capped at ``backoff_max``).

        Jitter spreads the retries of many workers (and many users) so that a struggling
        server is not hit by a synchronised wave.
        """
        step = max(1, self.attempts)
        exp = float(min(self.backoff_max, self.backoff_base * (2 ** (step - 1))))
        draw = (rng or random).uniform(0, exp / 2)
        delay = exp / 2 + draw
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay


def backoff_delay(attempt: int, base: float, retry_after: float | None = None,
                  cap: float = BACKOFF_MAX) -> float:
    """The wait before retry number ``attempt`` (1-based) of a fresh policy: kept for
    callers that only need the number."""
    policy = RetryPolicy(total=attempt, backoff_base=base, backoff_max=cap, attempts=attempt)
    return policy.backoff(retry_after)
