"""Text that came from somebody else: the server, a manifest, a shared folder.

Three rules, applied where such text enters (metadata normalisation, error messages
quoting a server, zip entry names) and again where it leaves (files, terminals):

* :func:`plain` drops C0/C1 control characters (ESC among them, so no terminal escape
  sequence survives) and bidirectional overrides (which disguise text on screen);
  whitespace controls become a space so words stay apart.
* :func:`csv_cell` defuses spreadsheet formulas: a cell a spreadsheet would evaluate
  (``=``, ``+``, ``-``, ``@``, tab or CR first, and not a plain number) gets a leading
  ``'``, the convention Excel, LibreOffice and Google Sheets all honour.
* :data:`SECRETS` knows the password and tokens of this process and :func:`redact`
  removes them from any text before it is printed or stored: a hostile server that
  echoes the bearer token in an error page must not get it into a log or a journal.

Rendering as plain text (never console markup) is the front ends' part: tables and
progress lines build ``rich.text.Text`` objects, never markup strings.
"""

from __future__ import annotations

import re
import threading

_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_DROP = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f" + _BIDI + "]")
_SPACE = re.compile("[\t\n\v\f\r\u2028\u2029]")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_FORMULA_START = frozenset("=+-@\t\r")
#: Secrets shorter than this are not redacted (the guest's empty password; replacing
#: one or two characters everywhere would destroy the text for nothing).
MIN_SECRET = 4


def plain(text: str) -> str:
    """``text`` without control characters: safe to print on a terminal or in a log.

    >>> plain("CT\\x1b[2J\\tchest\\x00")
    'CT[2J chest'
    """
    if text.isprintable():
        return text
    return _DROP.sub("", _SPACE.sub(" ", text))


def csv_cell(text: str) -> str:
    """A CSV cell that no spreadsheet evaluates as a formula (and that is :func:`plain`).

    >>> csv_cell("=HYPERLINK(\\"http://x\\")"), csv_cell("-5"), csv_cell("-chest")
    ('\\'=HYPERLINK("http://x")', '-5', "'-chest")
    """
    text = plain(text) if not text.isprintable() else text
    if text and text[0] in _FORMULA_START and _NUMBER.fullmatch(text) is None:
        return "'" + text
    return text


class _Secrets:
    """The secrets this process holds, so that :func:`redact` can remove them.

    Thread-safe; values live only in memory and are never printed by ``repr``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"<secrets: {len(self._values)}>"

    def add(self, *values: str | None) -> None:
        with self._lock:
            new = {v for v in values if v and len(v) >= MIN_SECRET}
            if not new <= self._values:
                self._values = self._values | new

    def discard(self, *values: str | None) -> None:
        with self._lock:
            self._values = self._values - {v for v in values if v}

    def redact(self, text: str) -> str:
        values = self._values
        if not values or not text:
            return text
        for value in sorted(values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, "***")
        return text


SECRETS = _Secrets()


def redact(text: str) -> str:
    """``text`` with every known secret of this process replaced by ``***``."""
    return SECRETS.redact(text)


def quote(text: str, limit: int = 200) -> str:
    """Server text fit to quote in a one-line message: plain, secret-free, one line,
    at most ``limit`` characters."""
    cleaned = " ".join(plain(redact(text)).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"
