"""The exceptions users can catch.

One small hierarchy, in the style of httpx: everything the tool raises on purpose is an
:class:`NbiaError`, so a script can ``except NbiaError`` and print ``str(exc)``, which is
always a single line that names the file, line or series concerned. Anything else that
escapes is a bug.
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


class ApiError(NbiaError):
    """The NBIA server answered something we cannot use (status, body or shape)."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ):
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class AuthError(NbiaError):
    """Login failed or a token could not be obtained or refreshed (CLI exit code 3)."""


class NotPublicError(ApiError):
    """The server refuses a series for good (400 "not in public domain"): never retried."""


class IntegrityError(NbiaError):
    """A downloaded series failed verification: short zip, MD5 or CRC mismatch, count."""


class UnsafeArchiveError(IntegrityError):
    """A zip stream tried something hostile: path tricks, bombs, absurd sizes."""
