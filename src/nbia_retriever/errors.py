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
    ├── ApiError               the server answered something we cannot use
    │   ├── NotPublicError     ... and refuses the series for good (never retried)
    │   ├── NetworkError       no answer: reset, refused, timed out, stalled
    │   └── TlsError           the certificate cannot be verified (stops the run)
    ├── AuthError              login failed or is not allowed (exit code 3)
    │   └── UntrustedHostError a password would go to a host the user did not choose
    ├── IntegrityError         a downloaded series failed verification
    │   └── UnsafeArchiveError the zip stream tried something hostile
    └── DestinationError       the download folder cannot be used safely
        ├── DiskFullError      no room left (stops the run)
        └── JournalError       the journal cannot be read or written (stops the run)
"""

from __future__ import annotations


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


class NetworkError(ApiError):
    """No usable answer arrived: connection refused or reset, a timeout, a body that
    stopped or trickled below the floor. ``timeout`` tells timeouts and stalls apart
    (the scheduler backs off on repeated ones)."""

    def __init__(self, message: str, *, timeout: bool = False):
        self.timeout = timeout
        super().__init__(message)


class TlsError(ApiError):
    """The server's TLS certificate cannot be verified.

    The same for every request, so never retried, and it stops the run rather than
    failing series one by one: ``--insecure`` is the user's explicit way out.
    """


class AuthError(NbiaError):
    """Login failed or a token could not be obtained or refreshed (CLI exit code 3)."""


class UntrustedHostError(AuthError):
    """A password or token would go to a host the user did not choose (one that only a
    manifest names, or plain http to a remote host). Nothing was sent."""


class IntegrityError(NbiaError):
    """A downloaded series failed verification: short zip, MD5 or CRC mismatch, count."""


class UnsafeArchiveError(IntegrityError):
    """A zip stream tried something hostile: path tricks, bombs, absurd sizes."""


class DestinationError(NbiaError):
    """The download folder cannot be used safely: it cannot be created, or something
    inside it is a symbolic link someone planted, or another run holds it."""


class DiskFullError(DestinationError):
    """The destination has no room for what is being written (stops the run)."""


class JournalError(DestinationError):
    """The download journal is unreadable or unwritable (stops the run; the message says
    how to recover)."""
