"""The exceptions users can catch.

One small hierarchy, in the style of httpx: everything the tool raises on purpose is an
:class:`NbiaError`, so a script can ``except NbiaError`` and print ``str(exc)``, which is
always a single line that names the file, line, series or host concerned. HTTP-library
exceptions never escape: the transport boundary (``api``) maps them onto
:class:`NetworkError` and :class:`TlsError`, so nothing downstream imports an HTTP
library to catch them. Anything else that escapes is a bug.

::

    NbiaError
    ├── ManifestError          a manifest, spreadsheet or UID list cannot be read
    ├── UsageError             a bad option value (URL, timeout, layout mismatch)
    │   └── LayoutMismatchError  the destination was made with another layout
    ├── ApiError               the server answered something we cannot use
    │   ├── NotPublicError     ... and refuses the series for good (never retried)
    │   ├── ApiMismatch        ... this build lacks that endpoint (try the next way)
    │   ├── NetworkError       no answer: reset, refused, timed out, stalled
    │   │   └── ServerUnreachableError  ... from the first call on: nothing was done (exit 4)
    │   └── TlsError           the certificate cannot be verified (stops the run)
    ├── AuthError              login failed or is not allowed (exit code 3)
    │   ├── StaleToken         a token went stale under us (refreshed, tried again)
    │   └── UntrustedHostError a password would go to a host the user did not choose
    ├── IntegrityError         a downloaded series failed verification
    │   ├── UnsafeArchiveError the zip stream tried something hostile
    │   └── NoRoomError        this series does not fit in the free space left
    ├── DestinationError       the download folder cannot be used safely
    │   ├── AmbiguousRootError the folder given holds several download roots (exit 2)
    │   ├── DiskFullError      no room left (stops the run)
    │   └── JournalError       the journal cannot be read or written (stops the run)
    ├── SeriesFailedError      some series of a run did not complete (raise_for_failures)
    ├── MissingDependencyError an optional package (pandas) is missing (also an ImportError)
    └── ServerError            the reference server (``serve``, ``synth``) cannot start
        ├── ArchiveError       the archive folder or its nbia-archive.toml is unusable
        ├── FaultSpecError     a --faults spec cannot be understood
        └── SynthError         parameters that cannot make a synthetic archive

Every class is defined here, once; the modules that raise them re-export their own
(``from nbia_retriever.api.client import StaleToken`` keeps working).

What a failure means is decided here too, in two functions and nowhere else:
:func:`exit_code` (the CLI's exit status for an exception) and
:func:`nbia_retriever.retry.classify` (retried or final, for every retry loop).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from .report import SeriesResult

#: CLI exit codes (stable, for scripts and job schedulers): every series complete; some
#: series failed (or the run stopped); bad usage or an unreadable manifest; login failed
#: or not allowed; the server could not be reached at all (nothing was done: a job
#: scheduler may simply try again later); interrupted (Ctrl-C: re-run the same command
#: to resume).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_UNREACHABLE, EXIT_INTERRUPTED = \
    0, 1, 2, 3, 4, 130


class NbiaError(Exception):
    """Base of every error this package raises deliberately."""


class ManifestError(NbiaError):
    """A manifest (or spreadsheet / UID list) could not be read.

    ``str()`` reads ``<file>:<line>: <problem>`` when the line is known, so a user can
    jump straight to the offending line.
    """

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None):
        self.source = source
        self.line = line
        self.problem = message
        where = source or "<manifest>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")


class UsageError(NbiaError):
    """An option value that cannot work: a malformed URL, a timeout of zero, a layout
    that differs from the one the download root was made with (CLI exit code 2)."""


class LayoutMismatchError(UsageError):
    """The destination was made with another layout (``made``); one root never mixes
    two. Front ends word the remedy their own way (a flag, a key)."""

    def __init__(self, root: Path, made: str) -> None:
        self.root, self.made = root, made
        super().__init__(f"{root} was made with --layout {made}; re-run with --layout {made} "
                         "(or choose another destination): one root never mixes two layouts")


class ApiError(NbiaError):
    """The NBIA server answered something we cannot use (status, body or shape)."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ):
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class NotPublicError(ApiError):
    """The server refuses a series for good (400 "not in public domain", 460 "login
    needed", 462 "insufficient privilege"): never retried."""


class ApiMismatch(ApiError):
    """This server build does not take that endpoint or parameter (400 "Invalid query
    parameter", 404 on an endpoint): try the next way, never report it as a refusal."""


class NetworkError(ApiError):
    """No usable answer arrived: connection refused or reset, a timeout, a body that
    stopped or trickled below the floor. ``timeout`` tells timeouts and stalls apart
    (the scheduler backs off on repeated ones)."""

    def __init__(self, message: str, *, timeout: bool = False):
        self.timeout = timeout
        super().__init__(message)


class ServerUnreachableError(NetworkError):
    """The server did not answer the run's first calls (refused, no such host, timed
    out, always busy): nothing was downloaded, and a fresh destination was left as it
    was (CLI exit code 4, :data:`EXIT_UNREACHABLE`)."""


class TlsError(ApiError):
    """The server's TLS certificate cannot be verified.

    The same for every request, so never retried, and it stops the run rather than
    failing series one by one: ``--insecure`` is the user's explicit way out.
    """


class AuthError(NbiaError):
    """Login failed or a token could not be obtained or refreshed (CLI exit code 3)."""


class StaleToken(AuthError):
    """A 401 on a request that carried a token: the token went stale (not the series'
    fault); :meth:`~nbia_retriever.api.NbiaClient.series_answer_failed` refreshes it for
    one more try."""


class UntrustedHostError(AuthError):
    """A password or token would go to a host the user did not choose (one that only a
    manifest names, or plain http to a remote host). Nothing was sent."""


class IntegrityError(NbiaError):
    """A downloaded series failed verification: short zip, MD5 or CRC mismatch, count."""


class UnsafeArchiveError(IntegrityError):
    """A zip stream tried something hostile: path tricks, bombs, absurd sizes."""


class NoRoomError(IntegrityError):
    """This series does not fit in the free space left (others may): the series fails,
    the run goes on."""


class DestinationError(NbiaError):
    """The download folder cannot be used safely: it cannot be created, or something
    inside it is a symbolic link someone planted, or another run holds it."""


class AmbiguousRootError(DestinationError):
    """The folder a command was given is no download root and holds several: which one
    is meant cannot be guessed. ``roots`` lists them; ``str()`` names each, one a line
    (CLI exit code 2)."""

    def __init__(self, folder: Path, roots: list[Path]) -> None:
        self.folder, self.roots = folder, roots
        listed = "".join(f"\n  {root}" for root in roots)
        super().__init__(f"{folder} holds {len(roots)} download roots; name one of them:"
                         f"{listed}")


class DiskFullError(DestinationError):
    """The destination has no room for what is being written (stops the run)."""


class JournalError(DestinationError):
    """The download journal is unreadable or unwritable (stops the run; the message says
    how to recover)."""


class SeriesFailedError(NbiaError):
    """Some series of a run did not complete (:meth:`Report.raise_for_failures`)."""

    def __init__(self, message: str, failed: list[SeriesResult]) -> None:
        self.failed = failed
        super().__init__(message)


class MissingDependencyError(NbiaError, ImportError):
    """An optional package (pandas) is needed for this call; ``pip install`` it."""


class ServerError(NbiaError):
    """The reference server or the synthetic archive generator cannot do what was
    asked (``serve`` and ``synth`` print it as one line)."""


class ArchiveError(ServerError):
    """The archive folder or its ``nbia-archive.toml`` cannot be served as it is."""


class FaultSpecError(ServerError):
    """A ``--faults`` spec or a fault script entry cannot be understood."""


class SynthError(ServerError):
    """Parameters that cannot make an archive, or an output folder already in use."""


def exit_code(error: BaseException | None) -> int:
    """The CLI exit code for a run or command that ended with ``error`` (None: success).

    The one place that decides it; commands print ``str(error)`` and exit with this.

    >>> exit_code(None), exit_code(AuthError("401")), exit_code(ManifestError("bad"))
    (0, 3, 2)
    >>> exit_code(DestinationError("a planted link")), exit_code(DiskFullError("full"))
    (2, 1)
    >>> exit_code(KeyboardInterrupt()), exit_code(NetworkError("reset"))
    (130, 1)
    >>> exit_code(ServerUnreachableError("cannot reach https://nbia.example.org"))
    4
    """
    if error is None:
        return EXIT_OK
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, AuthError):
        return EXIT_AUTH
    if isinstance(error, ServerUnreachableError):
        return EXIT_UNREACHABLE
    if isinstance(error, UsageError | ManifestError):
        return EXIT_USAGE
    # A destination that cannot be used is a usage problem; one that filled up or whose
    # journal broke mid-run is a failed run (re-run to resume).
    if isinstance(error, DestinationError) and not isinstance(error, DiskFullError
                                                              | JournalError):
        return EXIT_USAGE
    return EXIT_FAILED
