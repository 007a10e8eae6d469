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
  Not even a piece of a token: a message cut to length (an excerpt of an error page,
  cut where a worker process did not know the token) may end inside one, so every run
  of :data:`FRAGMENT` or more characters of a token (anything random) goes too. A
  password is a person's words (``Collection2024!``): its pieces are ordinary text
  ("see collection list"), so it goes whole, and our own cuts (:func:`quote`) happen
  after redaction; a cut made where the password was not known (a worker process)
  ends in ``…``, and a piece of a password right before one goes as well.

Rendering as plain text (never console markup) is the front ends' part: tables and
progress lines build ``rich.text.Text`` objects, never markup strings.

Host names come from manifests too: :func:`ascii_host` is the one form a host is shown,
compared and stored in (IDNA's ASCII ``xn--`` form, so a lookalike of
``cancerimagingarchive.net`` written with a Cyrillic letter shows as the other host it
is), and refuses what cannot be a host at all; :func:`host_entry` does the same for a
``host[:port]`` the user writes in ``trusted_hosts``.
"""

from __future__ import annotations

import encodings.idna
import functools
import ipaddress
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
#: No run of this many characters of a secret survives :func:`redact` (a piece left by a
#: cut); shorter runs are too common in ordinary text to remove.
FRAGMENT = 8


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


#: What :func:`quote` ends a cut message with.
CUT = "\u2026"


class _Secrets:
    """The secrets this process holds, so that :func:`redact` can remove them.

    Thread-safe; values live only in memory and are never printed by ``repr``. Besides
    the values it keeps every :data:`FRAGMENT`-character run of its random ones, the
    tokens (a set, so finding the pieces of a token in a text costs one look-up per
    character, however long the token: a JWT is a kilobyte).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._random: set[str] = set()
        self._passwords: set[str] = set()
        # One tuple, replaced whole: a reader never sees values without their pieces.
        self._state: tuple[tuple[str, ...], frozenset[str], tuple[str, ...]] = (
            (), frozenset(), ())

    def __repr__(self) -> str:
        return f"<secrets: {len(self._state[0])}>"

    def _publish(self) -> None:
        pieces = frozenset(v[i:i + FRAGMENT] for v in self._random
                           for i in range(len(v) - FRAGMENT + 1))
        values = self._random | self._passwords
        self._state = (tuple(sorted(values, key=len, reverse=True)), pieces,
                       tuple(sorted(self._passwords, key=len, reverse=True)))

    def add(self, *values: str | None) -> None:
        """Random secrets (tokens, API keys): redacted whole and by any piece of
        :data:`FRAGMENT` characters."""
        with self._lock:
            new = {v for v in values if v and len(v) >= MIN_SECRET}
            if not new <= self._random:
                self._random |= new
                self._publish()

    def add_password(self, *values: str | None) -> None:
        """Passwords: redacted whole (also with its runs of white space made one space,
        as :func:`quote` shows text), and a piece of one cut off by :data:`CUT`."""
        with self._lock:
            new = {v for v in values if v and len(v) >= MIN_SECRET}
            new |= {" ".join(v.split()) for v in new} - {""}
            if not new <= self._passwords:
                self._passwords |= new
                self._publish()

    def discard(self, *values: str | None) -> None:
        with self._lock:
            gone = {v for v in values if v}
            gone |= {" ".join(v.split()) for v in gone}
            self._random -= gone
            self._passwords -= gone
            self._publish()

    def redact(self, text: str) -> str:
        values, pieces, passwords = self._state
        if not values or not text:
            return text
        for value in values:  # longest first: a secret inside another goes with it
            if value in text:
                text = text.replace(value, "***")
        if pieces and len(text) >= FRAGMENT:
            text = _without_pieces(text, pieces)
        if passwords and CUT in text:
            text = _without_cut_prefixes(text, passwords)
        return text


def _without_cut_prefixes(text: str, passwords: tuple[str, ...]) -> str:
    """``text`` without the start of a password that a cut (:data:`CUT`) ended: what a
    worker process, which never knows the password, leaves when it cuts an excerpt of
    a page echoing it. Only right before a cut, so ordinary words stay."""
    out: list[str] = []
    last = 0
    at = text.find(CUT)
    while at >= 0:
        longest = 0
        for password in passwords:
            for k in range(min(len(password) - 1, at - last), MIN_SECRET - 1, -1):
                if text.startswith(password[:k], at - k):
                    longest = max(longest, k)
                    break
        out += (text[last:at - longest], "***" if longest else "", CUT)
        last = at + len(CUT)
        at = text.find(CUT, last)
    out.append(text[last:])
    return "".join(out)


def _without_pieces(text: str, pieces: frozenset[str]) -> str:
    """``text`` with every run covered by :data:`FRAGMENT`-character ``pieces`` replaced
    by ``***`` (overlapping and touching pieces make one run)."""
    hits = [i for i in range(len(text) - FRAGMENT + 1) if text[i:i + FRAGMENT] in pieces]
    if not hits:
        return text
    runs: list[list[int]] = []
    for i in hits:
        if runs and i <= runs[-1][1]:
            runs[-1][1] = i + FRAGMENT
        else:
            runs.append([i, i + FRAGMENT])
    out: list[str] = []
    last = 0
    for start, end in runs:
        out += (text[last:start], "***")
        last = end
    out.append(text[last:])
    return "".join(out)


SECRETS = _Secrets()


def redact(text: str) -> str:
    """``text`` with every known secret of this process replaced by ``***``."""
    return SECRETS.redact(text)


def quote(text: str, limit: int = 200) -> str:
    """Server text fit to quote in a one-line message: plain, secret-free, one line,
    at most ``limit`` characters."""
    # plain first: a control or bidi character inside a secret must not hide it from
    # redact and then vanish; redact before the cut, so no piece of one is left.
    cleaned = " ".join(redact(plain(text)).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + CUT


# ----------------------------------------------------------------------------- hosts

#: The label separators IDNA reads as dots (the ideographic and full-width ones too).
_DOTS = re.compile("[.\u3002\uff0e\uff61]")
#: An ASCII label: letters, digits, hyphens (and the underscore of some internal hosts).
_LABEL = re.compile(r"[a-z0-9_-]+", re.ASCII)


@functools.lru_cache(maxsize=256)  # every request's origin: a handful of hosts per run
def ascii_host(host: str) -> str:
    """``host`` as DNS and TLS see it: lower case, every international label in its
    ASCII ``xn--`` form (the stdlib IDNA codec, what ``socket`` itself encodes with), an
    IPv6 address compressed and without brackets.

    Raises ValueError, saying what is wrong, for what cannot be a host: a NUL, space,
    DEL or other control or invisible character, an empty label (``a..b``, a trailing
    dot), a label over 63 characters, a character no host name holds.

    >>> ascii_host("Services.CancerImagingArchive.NET"), ascii_host("[::0:1]")
    ('services.cancerimagingarchive.net', '::1')
    >>> ascii_host("cancerim\u0430gingarchive.net")  # a Cyrillic "a"
    'xn--cancerimgingarchive-xop.net'
    """
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text).compressed
        except ValueError:
            raise ValueError("is not an IPv6 address") from None
    for char, what in (("\x00", "a NUL"), (" ", "a space"), ("\x7f", "a DEL")):
        if char in text:
            raise ValueError(f"holds {what}")
    if not text.isprintable():
        raise ValueError("holds a control or invisible character")
    labels = []
    for label in _DOTS.split(text):
        if not label:
            raise ValueError("has an empty label (two dots in a row, or one at an end)")
        if len(label) > 63:
            raise ValueError("has a label over 63 characters")
        if not label.isascii():
            try:
                label = encodings.idna.ToASCII(label).decode("ascii")
            except UnicodeError as exc:
                raise ValueError(f"has a label that is no international name ({exc})"
                                 ) from None
        label = label.lower()
        if len(label) > 63:  # its xn-- form
            raise ValueError("has a label over 63 characters")
        if _LABEL.fullmatch(label) is None:
            raise ValueError("holds a character no host name holds")
        labels.append(label)
    joined = ".".join(labels)
    if len(joined) > 253:
        raise ValueError("is longer than 253 characters")
    return joined


def host_entry(text: str) -> str:
    """A ``host`` or ``host:port`` the user wrote (``trusted_hosts``), in the form the
    messages print: :func:`ascii_host`, an IPv6 address in brackets
    (``[::1]``, ``[::1]:8443``; a bare ``::1`` is taken as a host without a port).
    ValueError as :func:`ascii_host`, or for a port that is not a number."""
    text = text.strip()
    port = ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError("has text after the ']' of its address")
            port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host = text
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"has a port that is not a number from 1 to 65535 ({port!r})")
    ascii_form = ascii_host(host)
    shown = f"[{ascii_form}]" if ":" in ascii_form else ascii_form
    return f"{shown}:{int(port)}" if port else shown
