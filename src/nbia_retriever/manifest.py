"""Reading and writing the lists of series to download.

Five inputs are accepted, told apart by content, not by file name:

* ``.tcia`` manifests as the TCIA portal writes them (reference section 1): Java-properties
  style ``key=value`` header lines, a ``ListOfSeriesToDownload=`` marker, one UID a line;
* ``.s5cmd`` manifests as the IDC portal and idc-index write them (reference section 10 B):
  ``cp s3://BUCKET/<crdc_series_uuid>/* DEST`` lines, one IDC series version each; they
  name series by IDC's ``crdc_series_uuid``, which only the IDC index turns into a
  SeriesInstanceUID (``nbia_retriever.idc.index.resolve_manifest``);
* spreadsheets (CSV/TSV/semicolon, or ``.xlsx`` when openpyxl is installed) with a
  ``SeriesInstanceUID`` / ``Series Instance UID`` / ``Series UID`` column;
* sheets of files fetched by URL (issue 24, reference section 10 C-E): a CRDC/Gen3 DRS
  manifest (a ``drs_uri`` column, or ``File ID``, ``guid``...) or a PathDB image list
  (``imageUrl``), read into :attr:`Manifest.files` with the Go retriever's column
  aliases; a sheet with series UIDs too is read row by row (a row with a URI is a file,
  one with only a UID a series);
* plain lists, one UID a line.

Some lines are skipped instead of failing the whole file, as the Java retriever or s5cmd
would skip them, and each is reported in :attr:`Manifest.skipped` (``"line 6: ..."``) so a
front end can say so: a column header right after the ``.tcia`` marker, a UID above the
marker, an ``.s5cmd`` line that names no IDC series folder (a ``gs://`` URI, another
command), a DRS or image URL cell that cannot be used (an ``http://`` URL where a DRS
URI belongs, a ``drs://user@host/...``, a control character).

Every line that should hold a UID is checked, because a manifest that is silently read
wrong (an HTML error page saved as ``.tcia``, a spreadsheet column of row numbers) turns
into a download of nothing, or of the wrong thing, hours later. Errors name the file and
the 1-based line.

UID rule (DICOM PS3.5 section 9.1): digits and dots, at least two components, no empty
component, at most 64 characters. The standard also forbids leading zeros in a component
("0" itself excepted). We *accept* leading zeros when reading: such UIDs exist in the wild
(non-conforming devices), the server matches UIDs as plain strings, and refusing one would
block a series the archive does serve. They are still unambiguous DICOM-shaped strings, so
the check keeps its real purpose: rejecting lines that are not UIDs at all.
:func:`is_valid_uid` with ``strict=True`` applies the full rule.

Pure functions apart from :func:`read_manifest` / :func:`write_manifest`.
"""

from __future__ import annotations

import csv
import datetime
import importlib
import os
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from urllib.parse import unquote, urlsplit, urlunsplit

from .errors import ManifestError, NbiaError
from .models import DEFAULT_DRS_HOST, FileItem
from .ondisk import atomic_write_text
from .untrusted import ascii_host, host_entry, plain

__all__ = [
    "DEFAULT_DOWNLOAD_URL",
    "DEFAULT_RETRIES",
    "MARKER",
    "MAX_SKIPPED",
    "UID_COLUMNS",
    "Manifest",
    "api_base_from_download_url",
    "format_manifest",
    "is_crdc_uuid",
    "is_s3_bucket",
    "is_valid_uid",
    "parse_manifest",
    "read_manifest",
    "write_manifest",
]

#: The public TCIA DownloadServlet, as current portal manifests carry it.
DEFAULT_DOWNLOAD_URL = "https://nbia.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet"
#: ``noOfrRetry`` when the manifest does not say (the Java tool's default).
DEFAULT_RETRIES = 4
#: The line after which the UIDs start (matched case-insensitively when reading).
MARKER = "ListOfSeriesToDownload="
#: Spreadsheet column headers that hold the series UID (compared after lower-casing and
#: dropping spaces, ``_`` and ``-``).
UID_COLUMNS = ("SeriesInstanceUID", "Series Instance UID", "Series UID")

_MARKER_KEY = "listofseriestodownload"
_MAX_UID = 64
_SERVLET_PATH = "/nbia-download/servlet/downloadservlet"
_API_PATH = "/nbia-api/services"
#: Deleting every character a UID may contain: a UID is valid only if nothing is left.
_UID_BYTES = b"0123456789.\n"
_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})
_STANDARD_KEYS = ("downloadServerUrl", "includeAnnotation", "noOfrRetry", "databasketId",
                  "manifestVersion")
#: :attr:`Manifest.skipped` keeps this many reasons (a file of 100,000 ``gs://`` lines
#: must not become 100,000 warnings); the last one then counts the rest.
MAX_SKIPPED = 100
#: What an S3 bucket name may be (AWS's rule, simplified to its character set and length):
#: anything else in a manifest or an index is not used in a URL.
_S3_BUCKET = re.compile(r"[a-z0-9.-]{3,63}", re.ASCII)
#: IDC's ``crdc_series_uuid``: a lower-case UUID, as IDC writes every one.
_CRDC_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                        re.ASCII)
#: The line almost every ``.s5cmd`` manifest is made of (``cp s3://BUCKET/<uuid>/* .``),
#: read by one regular expression: 200,000 lines in 0.3 s instead of 0.7 s.
_S5CMD_PLAIN = re.compile(r"(?:cp|sync)[ \t]+s3://([a-z0-9.-]{3,63})/([0-9a-f]{8}-[0-9a-f]{4}-"
                          r"[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/\*?[ \t]+[^\s\"'\\]+",
                          re.ASCII)
_S5CMD_PLAIN_LINES = re.compile("^" + _S5CMD_PLAIN.pattern + r"[ \t]*$", re.ASCII | re.MULTILINE)
#: The s5cmd commands whose source is a download (``mv`` and ``rm`` would change the bucket).
_S5CMD_VERBS = frozenset({"cp", "sync"})
_URI_SCHEMES = ("s3://", "gs://")
#: What a sheet lacks when none of its columns is known (the Go retriever's words).
_NO_COLUMN = "without a 'drs_uri', 'imageUrl', 'SeriesInstanceUID' or 'Series UID' column"
#: The columns of a DRS or PathDB sheet, by the Go retriever's ``normalize()`` of their
#: header (lower case, letters and digits only: ``File ID``, ``file_id`` and ``fileid`` are
#: one name), each with the field it fills. Where a sheet has several columns for one
#: field, the one listed first here wins, row by row, when it is not empty (the CTDC sheet
#: gives both ``drs_uri`` and ``File ID``; the Go code took whichever came last).
_FILE_ALIASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("drs", ("drsuri", "fileid", "guid", "fileguid", "drsguid", "access")),
    ("url", ("imageurl", "wsiimageurl")),
    ("name", ("name", "filename")),
    ("collection", ("collection", "collectionname")),
    ("patient_id", ("patient", "patientid", "subject", "subjectid", "participantid")),
    ("study_uid", ("studyuid", "studyinstanceuid", "studyid")),
    ("study_description", ("studydescription", "studydesc", "studyshortname")),
    ("study_date", ("studydate",)),
    ("modality", ("modality",)),
    ("size", ("filesize", "filesizebytes", "size")),
    ("md5", ("md5sum", "md5")),
)
_FILE_COLUMNS = {alias: (field_name, rank) for field_name, aliases in _FILE_ALIASES
                 for rank, alias in enumerate(aliases)}
#: ``access`` is a DRS id in the Go retriever's tests, and the access *level*
#: (``open``/``controlled``) in other sheets: it is read only where nothing else could be.
_WEAK_ALIASES = frozenset({"access"})
#: A DRS object id: unreserved URL characters and %-escapes, in ``/``-separated segments
#: (``dg.4DFC/<uuid>``). Nothing that could change the request it is put into (``?``,
#: ``#``, ``@``, spaces); ``.``/``..`` segments are refused apart (see :func:`_drs_id_ok`).
_DRS_ID = re.compile(r"(?:[A-Za-z0-9._~-]|%[0-9A-Fa-f]{2})+(?:/(?:[A-Za-z0-9._~-]|%[0-9A-Fa-f]"
                     r"{2})+)*", re.ASCII)
_ANY_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                       r"[0-9a-fA-F]{12}", re.ASCII)
_MD5 = re.compile(r"[0-9a-fA-F]{32}", re.ASCII)
_WHOLE = re.compile(r"[0-9]{1,19}(?:\.0*)?", re.ASCII)
_BLANK = re.compile(r"\s", re.UNICODE)
#: Longer URIs are not a row of any real sheet (and not worth a request).
_MAX_URI = 2048


def _column_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if not (ch.isspace() or ch in "_-\ufeff\"'"))


_UID_COLUMN_KEYS = frozenset(_column_key(c) for c in UID_COLUMNS)


def is_s3_bucket(text: str) -> bool:
    """Whether ``text`` is plainly an S3 bucket name (``[a-z0-9.-]{3,63}``).

    Bucket names come from manifests and index files, both untrusted: only a name of this
    shape is ever put into a URL (no ``/``, ``?``, ``@`` or ``..`` tricks)."""
    return _S3_BUCKET.fullmatch(text) is not None and ".." not in text


def is_crdc_uuid(text: str) -> bool:
    """Whether ``text`` is an IDC ``crdc_series_uuid``: a lower-case 8-4-4-4-12 hex UUID."""
    return _CRDC_UUID.fullmatch(text) is not None


class _Skipped:
    """The reasons for lines not read, at most :data:`MAX_SKIPPED` of them kept."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.count = 0

    def add(self, line: int, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < MAX_SKIPPED:
            self.reasons.append(f"line {line}: {reason}")

    def result(self) -> tuple[str, ...]:
        if self.count <= MAX_SKIPPED:
            return tuple(self.reasons)
        kept = MAX_SKIPPED - 1
        return (*self.reasons[:kept], f"{self.count - kept:,} more lines skipped")


@dataclass(frozen=True)
class Manifest:
    """A parsed list of series, in manifest order, without duplicates.

    ``headers`` keeps every header key exactly as written (``noOfrRetry`` typo included),
    so nothing the server or a newer portal adds is lost; the properties interpret the
    few that matter. Spreadsheets and plain lists have no headers.
    """

    series_uids: tuple[str, ...]
    headers: dict[str, str] = field(default_factory=dict, hash=False)
    source: str | None = None
    duplicates_dropped: int = 0
    #: ``"tcia"``, ``"csv"``, ``"xlsx"``, ``"list"``, ``"s5cmd"``, or ``"drs"`` /
    #: ``"pathdb"`` for a sheet (CSV, TSV or XLSX) with a DRS / image URL column (mixed
    #: with series rows or not): what the input turned out to be.
    kind: str = "tcia"
    #: IDC series versions (``crdc_series_uuid``, lower-case) of an ``.s5cmd`` manifest,
    #: in order, without duplicates; ``()`` for every other kind. Its ``series_uids``
    #: hold only the bare UID lines s5cmd manifests may also carry (usually none).
    crdc_uuids: tuple[str, ...] = ()
    #: Files of a DRS or PathDB sheet (``drs_uri``/``imageUrl`` columns), in order,
    #: without duplicates (by :attr:`~nbia_retriever.models.FileItem.key`); ``()`` for
    #: every other kind. A mixed sheet's SeriesInstanceUID rows stay in ``series_uids``.
    files: tuple[FileItem, ...] = ()
    #: Lines not read, one short reason each, naming the line (``"line 6: ..."``): what
    #: a front end shows as warnings. At most :data:`MAX_SKIPPED` entries (the last one
    #: then counts the rest).
    skipped: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """Every item of the run, as the engine and the view know them: the series, then
        the files' keys (a mixed sheet's rows: :attr:`series_uids`, then :attr:`files`)."""
        if not self.files:
            return self.series_uids
        return self.series_uids + tuple(item.key for item in self.files)

    def file_by_key(self) -> dict[str, FileItem]:
        """:attr:`files` by :attr:`~nbia_retriever.models.FileItem.key`, for the engine,
        which knows an item by its key only. Built once and kept (a 100,000-row sheet is
        asked once per item): do not change the dict."""
        table: dict[str, FileItem] | None = self.__dict__.get("_file_by_key")
        if table is None:
            table = {item.key: item for item in self.files}
            object.__setattr__(self, "_file_by_key", table)
        return table

    def header(self, key: str) -> str | None:
        """A header value, exact key first, then case-insensitively; ``None`` if absent."""
        if key in self.headers:
            return self.headers[key]
        folded = key.casefold()
        for name, value in self.headers.items():
            if name.casefold() == folded:
                return value
        return None

    def _present(self, key: str) -> str | None:
        value = self.header(key)
        return value if value else None

    @property
    def download_server_url(self) -> str | None:
        """``downloadServerUrl``, or ``None`` (callers then use :data:`DEFAULT_DOWNLOAD_URL`);
        an international host in its ASCII form (:func:`ascii_url`)."""
        value = self._present("downloadServerUrl")
        return None if value is None else ascii_url(value)

    @property
    def retries(self) -> int:
        """``noOfrRetry`` as an int; 4 when absent or empty.

        :func:`parse_manifest` already rejected bad values with the line number; this only
        raises for a :class:`Manifest` built by hand with a bad header.
        """
        value = self._present("noOfrRetry")
        if value is None:
            return DEFAULT_RETRIES
        parsed = _parse_retries(value)
        if parsed is None:
            raise ManifestError(f"noOfrRetry must be a whole number >= 0, got {value!r}",
                                source=self.source)
        return parsed

    @property
    def databasket_id(self) -> str | None:
        return self._present("databasketId")

    @property
    def version(self) -> str | None:
        """``manifestVersion`` (``"3.0"`` today; absent, 1.0 and 2.0 are legacy)."""
        return self._present("manifestVersion")

    @property
    def include_annotation(self) -> bool:
        """``includeAnnotation``; true when absent (the portal's default)."""
        value = self._present("includeAnnotation")
        if value is None:
            return True
        parsed = _parse_bool(value)
        if parsed is None:
            raise ManifestError(f"includeAnnotation must be true or false, got {value!r}",
                                source=self.source)
        return parsed

    @property
    def root_name(self) -> str:
        """Name of the download's root folder, not yet sanitised (layout does that).

        ``databasketId`` minus ``.tcia`` like the Java tool, else the file's stem, else
        ``"manifest"`` for text that came from nowhere.
        """
        basket = self.databasket_id
        if basket:
            stem = _strip_suffix(basket.strip(), ".tcia")
            if stem:
                return stem
        if self.source and not (self.source.startswith("<") and self.source.endswith(">")):
            stem = PurePath(self.source.replace("\\", "/")).stem
            if stem:
                return stem
        return "manifest"


def _strip_suffix(text: str, suffix: str) -> str:
    return text[: -len(suffix)] if text.lower().endswith(suffix) else text


def _parse_retries(value: str) -> int | None:
    text = value.strip()
    if text.startswith("+"):
        text = text[1:]
    if not text or not text.isascii() or not text.isdigit() or len(text) > 9:
        return None
    return int(text)


def _parse_bool(value: str) -> bool | None:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


# ----------------------------------------------------------------------------- UIDs


def is_valid_uid(text: str, *, strict: bool = False) -> bool:
    """Whether ``text`` is a DICOM UID (see the module docstring for the rule).

    ``strict`` also rejects components with leading zeros, as PS3.5 9.1 does.
    """
    if (
        not text
        or len(text) > _MAX_UID
        or not text.isascii()
        or not text.replace(".", "").isdigit()
        or text[0] == "."
        or text[-1] == "."
        or ".." in text
        or "." not in text
    ):
        return False
    if strict:
        return not any(len(part) > 1 and part[0] == "0" for part in text.split("."))
    return True


_OK, _STRIPPABLE, _OTHER = 0, 1, 2


#: Lines checked by one C-level pass of :func:`_check_bulk` (bounds its copies).
_BULK = 20_000


def _check_bulk(items: list[str]) -> int:
    """:func:`_check_block` over blocks of :data:`_BULK` items: the joined and encoded
    copies stay a megabyte whatever the manifest's size."""
    worst = _OK
    for start in range(0, len(items), _BULK):
        verdict = _check_block(items[start:start + _BULK])
        if verdict == _OTHER:
            return _OTHER
        worst = max(worst, verdict)
    return worst


def _check_block(items: list[str]) -> int:
    """Whether every non-empty item is a valid UID, checked in bulk at C speed.

    Joining and one ``bytes.translate`` replace a per-item character check that costs
    ten times more in Python: this is what keeps a 200,000-line manifest fast.
    Returns ``_OK``; ``_STRIPPABLE`` when the only other characters are spaces, tabs and
    commas (worth one ``strip`` pass); else ``_OTHER`` (use the per-line path).
    """
    text = "\n".join(items)
    if not text.isascii() or text.count("\n") != len(items) - 1:
        return _OTHER
    data = text.encode("ascii")
    rest = data.translate(None, _UID_BYTES)
    if rest:
        return _OTHER if rest.translate(None, b" \t,") else _STRIPPABLE
    if b".." in data:
        return _OTHER
    for item in items:
        if item and (len(item) > _MAX_UID or "." not in item or item[0] == "." or item[-1] == "."):
            return _OTHER
    return _OK


def _clean_uid_line(line: str) -> str:
    """What a UID line holds once the tolerated noise is gone.

    Tolerated: surrounding whitespace (CR of CRLF included), trailing commas (spreadsheet
    exports), surrounding quotes, and ``#`` comments (whole-line or trailing).
    """
    if "#" in line:
        line = line.split("#", 1)[0]
    return line.strip().strip(",;\"'").strip()


def _uid_error(text: str, source: str, line: int, *, first: bool = False) -> ManifestError:
    shown = text if len(text) <= 80 else text[:77] + "..."
    why = "longer than 64 characters" if len(text) > _MAX_UID else "not a DICOM UID"
    message = f"{why}: {shown!r}"
    if first:
        message += (" (expected a .tcia manifest, an .s5cmd manifest, a CSV/TSV with a "
                    "SeriesInstanceUID, drs_uri or imageUrl column, or one series UID per "
                    "line)")
    return ManifestError(message, source=source, line=line)


class _Collector:
    """Keeps the first occurrence of each UID, in order, and counts the rest."""

    def __init__(self) -> None:
        self.seen: dict[str, None] = {}
        self.duplicates = 0

    def uids(self) -> tuple[str, ...]:
        """The UIDs, in order (the metadata of a series later shares these very string
        objects: see ``RecordShape.infos(known=...)``)."""
        return tuple(self.seen)

    def add_lines(self, lines: list[str], start: int, source: str) -> None:
        """Add ``lines[start:]``, one UID a line (``lines[i]`` is line ``i + 1``).

        200,000 lines must take well under half a second. Clean files (digits, dots and
        newlines only: what the portal writes) are checked in bulk by C-level bytes
        operations; anything else goes through the per-line loop, which also finds the
        exact line of an error.
        """
        if not self._add_clean(lines, start):
            self._add_each(lines, start, source)

    def _add_clean(self, lines: list[str], start: int) -> bool:
        body = lines[start:]
        verdict = _check_bulk(body)
        if verdict == _STRIPPABLE:
            body = [line.strip(" \t,") for line in body]  # trailing commas, spaces
            verdict = _check_bulk(body)
        if verdict != _OK:
            return False
        before = len(self.seen)
        if before:
            self.seen.update(dict.fromkeys(body))
        else:
            self.seen = dict.fromkeys(body)  # no second copy of a 200,000-key dict
        if "" in self.seen:
            del self.seen[""]
        added = len(self.seen) - before
        self.duplicates += len(body) - body.count("") - added
        return True

    def _add_each(self, lines: list[str], start: int, source: str) -> None:
        seen = self.seen
        dups = 0
        for index in range(start, len(lines)):
            text = lines[index]
            if "#" in text or "," in text or '"' in text or "'" in text or ";" in text:
                text = _clean_uid_line(text)
            else:
                text = text.strip()
            if not text:
                continue
            if (
                len(text) > _MAX_UID
                or not text.isascii()
                or not text.replace(".", "").isdigit()
                or text[0] == "."
                or text[-1] == "."
                or ".." in text
                or "." not in text
            ):
                raise _uid_error(text, source, index + 1, first=not seen and not dups)
            if text in seen:
                dups += 1
            else:
                seen[text] = None
        self.duplicates += dups

    def add(self, text: str, source: str, line: int) -> None:
        text = text.strip().strip(",;\"'").strip()
        if not text:
            return
        if not is_valid_uid(text):
            raise _uid_error(text, source, line)
        if text in self.seen:
            self.duplicates += 1
        else:
            self.seen[text] = None


# ----------------------------------------------------------------------------- parsing


def _split_lines(text: str) -> list[str]:
    """Lines as an editor numbers them: LF, CRLF, or lone CR (very old Mac files)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n") if "\n" in text else text.replace("\r", "\n")
    return text.split("\n")


def _is_comment(stripped: str) -> bool:
    return stripped.startswith("#") or stripped.startswith("!")


def _unescape(value: str) -> str:
    r"""Undo Java-properties escapes (``https\://``), as ``Properties.store`` writes them."""
    if "\\" not in value:
        return value
    out: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch != "\\":
            out.append(ch)
            continue
        nxt = next(chars, None)
        if nxt is None:
            break  # a line continuation; manifests never use one: drop it
        out.append({"t": "\t", "n": "\n", "r": "\r", "f": "\f"}.get(nxt, nxt))
    return "".join(out)


def parse_manifest(text: str, *, source: str = "<manifest>", kind: str | None = None,
                   ) -> Manifest:
    """Parse manifest text of any supported kind (detected from the content).

    ``kind="s5cmd"`` reads the text as an ``.s5cmd`` manifest whatever it looks like
    (:func:`read_manifest` passes it for a ``.s5cmd`` file name); otherwise the content
    decides. Raises :class:`ManifestError` naming ``source`` and the 1-based line for
    anything that is not a UID where one belongs, for a bad
    ``noOfrRetry``/``includeAnnotation``, and when no series is listed at all.
    """
    if "\x00" in text:
        # UTF-16 without a BOM that was decoded as UTF-8 or Latin-1 on the way here (e.g.
        # ``Path.read_text()``): ASCII text with a NUL every other character.
        raw = b""
        for codec, errors in (("latin-1", "strict"), ("utf-8", "surrogateescape")):
            try:
                raw = text.encode(codec, errors)
                break
            except UnicodeEncodeError:
                continue
        if _utf16_without_bom(raw) is not None:
            text = _decode(raw, source)
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _split_lines(text)
    first = _first_meaningful(lines)
    if first is None:
        raise ManifestError("no series listed (the file is empty)", source=source)
    if kind == "s5cmd" or _looks_s5cmd(lines, first):
        return _parse_s5cmd(lines, source)
    stripped = lines[first].strip()
    if "=" in stripped.split("#", 1)[0]:
        return _parse_tcia(lines, first, source)
    if is_valid_uid(_clean_uid_line(stripped)):
        collector = _Collector()
        try:
            collector.add_lines(lines, first, source)
        except ManifestError:
            if _find_marker(lines, first) is None:
                raise
            # UIDs above the marker, then a .tcia's list: read as Java reads it
            return _parse_tcia(lines, first, source)
        return _finish(collector, {}, source, "list", None)
    spreadsheet = _parse_delimited(lines, first, source)
    if spreadsheet is not None:
        return spreadsheet
    raise _uid_error(_clean_uid_line(stripped) or stripped, source, first + 1, first=True)


def _first_meaningful(lines: list[str]) -> int | None:
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not _is_comment(stripped):
            return index
    return None


def _find_marker(lines: list[str], start: int) -> int | None:
    """The index of the ``ListOfSeriesToDownload=`` line at or after ``start``, if any."""
    for index in range(start, len(lines)):
        stripped = lines[index].lstrip()
        if stripped[:1] in ("L", "l") and "=" in stripped \
                and stripped.split("=", 1)[0].strip().lower() == _MARKER_KEY:
            return index
    return None


_DIGIT = re.compile(r"[0-9]", re.ASCII)


def _parse_tcia(lines: list[str], start: int, source: str) -> Manifest:
    """A ``.tcia`` manifest, read as the Java retriever reads it where that is safe.

    Java loads the whole file as properties and takes the series from the lines after
    the marker, keeping only the digits and dots of each (``getSeriesList``). So a UID
    above the marker (a hand-edited file) is ignored, and so is a column header right
    after it (``Series ID``, CBIIT's own test manifest): both are skipped here too, and
    reported in :attr:`Manifest.skipped`. Any other line that is not a UID stays an
    error: keeping digits out of garbage would download the wrong thing silently.
    """
    headers: dict[str, str] = {}
    collector = _Collector()
    skipped = _Skipped()
    marker_line: int | None = None
    marker_below: int | None = -1  # -1: not looked for yet
    body = len(lines)
    for index in range(start, len(lines)):
        stripped = lines[index].strip()
        if not stripped or _is_comment(stripped):
            continue
        if "=" not in stripped:
            if is_valid_uid(_clean_uid_line(stripped)):
                if marker_below == -1:
                    marker_below = _find_marker(lines, index + 1)
                if marker_below is None:
                    body = index  # no marker: the list starts at the first UID
                    break
                skipped.add(index + 1, f"a series UID above {MARKER}; it is ignored, "
                                       "as the Java retriever does")
                continue
            raise ManifestError(
                f"expected key=value or {MARKER}, got {_shorten(stripped)!r}",
                source=source, line=index + 1,
            )
        key, value = stripped.split("=", 1)
        key = key.strip()
        if key.lower() == _MARKER_KEY:
            marker_line = index + 1
            body = index + 1
            for part in value.split(","):  # tolerate UIDs on the marker line itself
                collector.add(part, source, index + 1)
            break
        # Trailing commas: spreadsheet exports add them to every line, headers included.
        value = _unescape(value.strip().rstrip(",").rstrip())
        _check_header(key, value, source, index + 1)
        headers[key] = value
    if marker_line is not None and not collector.seen:
        body = _skip_column_header(lines, body, skipped)
    collector.add_lines(lines, body, source)
    return _finish(collector, headers, source, "tcia", marker_line, skipped)


def _skip_column_header(lines: list[str], body: int, skipped: _Skipped) -> int:
    """Where the UIDs start after the marker: past lines that hold no digit at all (a
    column header such as ``Series ID``), each reported. Only before the first UID: such
    a line further down is an error, as any other line that is not a UID."""
    while body < len(lines):
        text = _clean_uid_line(lines[body])
        if text and _DIGIT.search(text) is not None:
            break
        if text:
            skipped.add(body + 1, f"{_shorten(text)!r} holds no series UID (a column "
                                  "header?); skipped, as the Java retriever does")
        body += 1
    return body


def _check_header(key: str, value: str, source: str, line: int) -> None:
    folded = key.casefold()
    if folded == "noofrretry" and value.strip() and _parse_retries(value) is None:
        raise ManifestError(f"noOfrRetry must be a whole number >= 0, got {value!r}",
                            source=source, line=line)
    if folded == "includeannotation" and value.strip() and _parse_bool(value) is None:
        raise ManifestError(f"includeAnnotation must be true or false, got {value!r}",
                            source=source, line=line)


def _finish(collector: _Collector, headers: dict[str, str], source: str, kind: str,
            marker_line: int | None, skipped: _Skipped | None = None) -> Manifest:
    if not collector.seen:
        problem = "no series listed"
        if marker_line is not None:
            problem += f" after {MARKER}"
        version = headers.get("manifestVersion", "")
        if kind == "tcia" and version.strip() in ("", "1.0", "2.0"):
            problem += " (a legacy manifest whose list stayed on the server is not supported)"
        raise ManifestError(problem, source=source, line=marker_line)
    return Manifest(series_uids=collector.uids(), headers=headers, source=source,
                    duplicates_dropped=collector.duplicates, kind=kind,
                    skipped=() if skipped is None else skipped.result())


# ----------------------------------------------------------------------------- .s5cmd


def _is_s5cmd_line(stripped: str) -> bool:
    """A line of s5cmd's command file: ``cp``/``sync`` with arguments, or a bare URI."""
    parts = stripped.split(None, 1)
    head = parts[0].lower()
    if head in _S5CMD_VERBS:
        return len(parts) > 1
    return head.startswith(_URI_SCHEMES) and len(parts) == 1


def _looks_s5cmd(lines: list[str], first: int) -> bool:
    """Whether the text is an ``.s5cmd`` manifest: its first line (after ``#`` comments
    and blank lines) is a ``cp``/``sync``/``s3://`` line, or one title word (idc-index's
    own test manifests start with ``study_manifest_cp_command``) followed by one."""
    words = 0
    for index in range(first, len(lines)):
        stripped = lines[index].strip()
        if not stripped or stripped.startswith("#"):
            continue
        if _is_s5cmd_line(stripped):
            return True
        words += 1
        if words > 1 or "=" in stripped or len(stripped.split()) != 1 \
                or any(ch in stripped for ch in ",;\t") \
                or is_valid_uid(_clean_uid_line(stripped)):
            return False
    return False


def _series_folder(uri: str) -> tuple[str | None, str]:
    """``(crdc_series_uuid, "")`` for ``s3://BUCKET/<uuid>/*`` (or ``.../<uuid>/`` or
    ``.../<uuid>``), else ``(None, why)``."""
    scheme, _, rest = uri.partition("://")
    bucket, _, path = rest.partition("/")
    if path.endswith("/*"):
        path = path[:-2]
    elif path.endswith("/"):
        path = path[:-1]
    if scheme == "s3" and is_crdc_uuid(path) and is_s3_bucket(bucket):
        return path, ""
    shown = repr(_shorten(uri))
    if scheme.lower() != "s3":
        return None, (f"{shown} is a Google Cloud Storage URI; only s3:// series folders "
                      "are read")
    if not is_s3_bucket(bucket):
        return None, f"{shown} does not start with an S3 bucket name"
    return None, f"{shown} is not an IDC series folder (s3://BUCKET/<crdc_series_uuid>/*)"


def _plain_s5cmd(lines: list[str]) -> list[str] | None:
    """The uuids of a manifest made only of plain lines (:data:`_S5CMD_PLAIN`), comments
    and blank lines, found by one regular expression over the whole text at C speed;
    None for anything else (the line by line reader then finds what is what)."""
    text = "\n".join(lines)
    found = _S5CMD_PLAIN_LINES.findall(text)
    if not found:
        return None
    meaningful = len(lines) - text.count("\n#") - (1 if text.startswith("#") else 0)
    meaningful -= sum(1 for line in lines if not line.strip())
    if len(found) != meaningful or any(".." in bucket for bucket in {b for b, _ in found}):
        return None
    return [uuid for _, uuid in found]


def _parse_s5cmd(lines: list[str], source: str) -> Manifest:
    """An ``.s5cmd`` manifest (reference section 10 B): the IDC series folders its
    ``cp``/``sync`` lines (any flags, any destination, quoted or not) or bare ``s3://``
    lines copy, in order; lone UID lines too, as TCIA's Go retriever reads them.

    Nothing else is fatal, because IDC's own tools skip it too: a ``gs://`` URI, another
    command, a title line. Each is reported in :attr:`Manifest.skipped`. The bucket a
    line names is not kept: the IDC index says where each version lives.
    """
    plain = _plain_s5cmd(lines)
    if plain is not None:
        uuids = dict.fromkeys(plain)
        return Manifest(series_uids=(), headers={}, source=source,
                        duplicates_dropped=len(plain) - len(uuids), kind="s5cmd",
                        crdc_uuids=tuple(uuids))
    uuids = {}
    bare = _Collector()
    skipped = _Skipped()
    duplicates = 0
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _S5CMD_PLAIN.fullmatch(stripped)
        if match is not None and ".." not in match[1]:
            if match[2] in uuids:
                duplicates += 1
            else:
                uuids[match[2]] = None
            continue
        number = index + 1
        if '"' in stripped or "'" in stripped or "\\" in stripped:
            try:
                tokens = shlex.split(stripped)  # quoted destinations with spaces
            except ValueError:  # an unbalanced quote: s5cmd would refuse it, we look on
                tokens = stripped.split()
        else:
            tokens = stripped.split()  # shlex costs 25 us a line: 5 s for 200,000
        if not tokens:
            continue
        verb = tokens[0].lower()
        uri: str | None
        if verb in _S5CMD_VERBS and len(tokens) > 1:
            uri = next((t for t in tokens[1:] if t.lower().startswith(_URI_SCHEMES)), None)
            if uri is None:
                skipped.add(number, f"a {verb} line without an s3:// source: "
                                    f"{_shorten(stripped)!r}")
                continue
        elif len(tokens) == 1 and verb.startswith(_URI_SCHEMES):
            uri = tokens[0]
        elif len(tokens) == 1 and is_valid_uid(_clean_uid_line(tokens[0])):
            bare.add(tokens[0], source, number)
            continue
        else:
            skipped.add(number, f"not an s5cmd cp or sync line: {_shorten(stripped)!r}")
            continue
        uuid, why = _series_folder(uri)
        if uuid is None:
            skipped.add(number, why)
        elif uuid in uuids:
            duplicates += 1
        else:
            uuids[uuid] = None
    if not uuids and not bare.seen:
        first = f"; {skipped.reasons[0]}" if skipped.reasons else ""
        raise ManifestError("no IDC series folder (cp s3://BUCKET/<crdc_series_uuid>/* DEST) "
                            f"in this .s5cmd manifest{first}", source=source)
    return Manifest(series_uids=bare.uids(), headers={}, source=source,
                    duplicates_dropped=duplicates + bare.duplicates, kind="s5cmd",
                    crdc_uuids=tuple(uuids), skipped=skipped.result())


def _shorten(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------- spreadsheets


def _uid_column(cells: Iterable[object]) -> int | None:
    for position, cell in enumerate(cells):
        if cell is not None and _column_key(str(cell)) in _UID_COLUMN_KEYS:
            return position
    return None


def _parse_delimited(lines: list[str], header: int, source: str) -> Manifest | None:
    """CSV/TSV/semicolon spreadsheet whose header row is ``lines[header]``, else None.

    The delimiter is the one that makes the header row show a UID column, trying the
    most frequent candidate first: sturdier than csv.Sniffer on one-column files.
    """
    header_text = lines[header]
    candidates = sorted("\t,;|", key=lambda d: -header_text.count(d))
    for delimiter in candidates:
        try:
            row = next(csv.reader([header_text], delimiter=delimiter), [])
        except csv.Error:  # e.g. a bare carriage return: not a spreadsheet header
            continue
        column = _uid_column(row)
        sheet = _FileSheet.from_header(row, column, source, header + 1)
        if sheet is not None:
            return _read_file_rows(sheet, lines, header, delimiter)
        if column is None:
            continue
        collector = _Collector()

        def rows(delim: str = delimiter) -> Iterator[tuple[int, list[str]]]:
            # Comments become empty lines so csv's line numbers stay the file's.
            body = (
                "" if _is_comment(line.strip()) else line
                for line in lines[header + 1:]
            )
            reader = csv.reader(body, delimiter=delim)
            for cells in reader:
                yield header + 1 + reader.line_num, cells

        # ``search --csv`` writes the server in a column (spreadsheets and pandas read
        # it as any column): one value on every row makes it the manifest's server.
        server_column = next((i for i, name in enumerate(row)
                              if _column_key(name) == "downloadserverurl"), None)
        servers: set[str] = set()
        try:
            for line, cells in rows():
                if column < len(cells):
                    collector.add(cells[column], source, line)
                if server_column is not None and server_column < len(cells) and \
                        cells[server_column].strip():
                    servers.add(cells[server_column].strip())
        except csv.Error as exc:
            raise ManifestError(f"unreadable spreadsheet row: {exc}", source=source) from None
        if not collector.seen:
            raise ManifestError(f"no series listed in column {row[column].strip()!r}",
                                source=source, line=header + 1)
        headers = {"downloadServerUrl": servers.pop()} if len(servers) == 1 else {}
        return Manifest(series_uids=collector.uids(), headers=headers, source=source,
                        duplicates_dropped=collector.duplicates, kind="csv")
    if any(d in header_text for d in "\t,;|"):
        raise ManifestError(f"spreadsheet {_NO_COLUMN}: {_shorten(header_text.strip())!r}",
                            source=source, line=header + 1)
    return None


# ----------------------------------------------------------------------------- DRS, PathDB


def _normalize(name: str) -> str:
    """A column header as the Go retriever compares it: lower case, letters and digits
    only (``File ID``, ``file_id`` and ``"fileid"`` are one name)."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _cell(value: object) -> str:
    """A cell as text: CSV gives strings, openpyxl numbers and dates too (a size, a study
    date); a whole float (``49150.0``) reads as the integer it is."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, datetime.datetime):
        return value.date().isoformat() if value.time() == datetime.time() \
            else value.isoformat(sep=" ")
    if isinstance(value, datetime.date):
        return value.isoformat()
    return str(value)


def _drs_id_ok(object_id: str) -> bool:
    """Whether ``object_id`` may go into ``/user/data/download/<id>``: the characters of
    :data:`_DRS_ID`, and no ``.``/``..`` segment even %-encoded (``drs://HOST/../../user/
    credentials/...`` would point the bearer token at another endpoint of that host)."""
    if _DRS_ID.fullmatch(object_id) is None:
        return False
    return not any(part in (".", "..") for part in unquote(object_id).split("/"))


def _bad_text(text: str) -> str | None:
    """Why a URI cell cannot be used as it is (a control character, a space), or None."""
    if len(text) > _MAX_URI:
        return f"is longer than {_MAX_URI:,} characters"
    if not text.isprintable():
        return "holds a control character"
    if _BLANK.search(text) is not None:
        return "holds a space"
    if "\\" in text:
        return "holds a backslash"
    return None


def _drs_uri(text: str) -> tuple[str | None, str]:
    """``(drs://HOST/ID, "")`` for a DRS URI or a bare id, else ``(None, why)``.

    A bare id (``dg.4DFC/<uuid>``, or a lone UUID) lives on :data:`DEFAULT_DRS_HOST`, as
    the Go retriever and tcia_utils have it. The host is the one the Gen3 API key may be
    sent to, so it is checked as a host name (no ``user@``, no compact
    ``drs://PREFIX:ID``) and kept in the one form hosts are compared in (lower case,
    IDNA ASCII).
    """
    bad = _bad_text(text)
    if bad is not None:
        return None, bad
    scheme, sep, rest = text.partition("://")
    if not sep:
        if text[:4].lower() == "drs:":
            return None, "is not a DRS URI (drs://HOST/ID)"
        if not _drs_id_ok(text) or ("/" not in text and _ANY_UUID.fullmatch(text) is None):
            return None, "is not a DRS URI or id (drs://HOST/ID, or dg.4DFC/<uuid>)"
        return f"drs://{DEFAULT_DRS_HOST}/{text}", ""
    if scheme.lower() in ("http", "https"):
        return None, "is an http(s) URL, not a DRS URI (drs://HOST/ID)"
    if scheme.lower() != "drs":
        return None, "is not a DRS URI (drs://HOST/ID)"
    authority, _, object_id = rest.partition("/")
    if not authority:
        return None, "names no host"
    if "@" in authority:
        return None, "names a user before its host (drs://USER@HOST/...): refused"
    if not authority.startswith("[") and ":" in authority \
            and not authority.rpartition(":")[2].isdigit():
        return None, ("is a compact DRS id (drs://PREFIX:ID): write it as drs://HOST/ID "
                      "or PREFIX/ID")
    if not object_id:
        return None, "names no object (drs://HOST/ID)"
    try:
        host = host_entry(authority)
    except ValueError as exc:
        return None, f"has a host that {exc}"
    if not _drs_id_ok(object_id):
        return None, "has an object id with characters no DRS id holds"
    return f"drs://{host}/{object_id}", ""


def _image_url(text: str) -> tuple[str | None, str]:
    """``(URL, "")`` for an ``http(s)://HOST/...`` image URL (scheme and host in the one
    form hosts are compared in), else ``(None, why)``. A user name or password in it is
    refused: it would end up in logs and in the CSV of what was fetched."""
    bad = _bad_text(text)
    if bad is not None:
        return None, bad
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None, "is not a valid URL"
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return None, "is not an http(s) URL"
    if "@" in parts.netloc:
        return None, "holds a user name or password: refused"
    if not parts.hostname:
        return None, "names no host"
    try:
        host = host_entry(parts.netloc.removesuffix(":") if port is None else parts.netloc)
    except ValueError as exc:
        return None, f"has a host that {exc}"
    return urlunsplit((scheme, host, parts.path or "/", parts.query, "")), ""


def _zip_uid(name: str) -> str | None:
    """The SeriesInstanceUID of a file named ``<UID>.zip`` (how General Commons names
    TCIA's series), else None."""
    if len(name) > 4 and name[-4:].lower() == ".zip" and is_valid_uid(name[:-4]):
        return name[:-4]
    return None


def _size_value(text: str) -> int | None:
    text = text.strip()
    return int(text.partition(".")[0]) if _WHOLE.fullmatch(text) is not None else None


class _FileSheet:
    """The rows of a DRS or PathDB sheet (and of a mixed one), read into
    :class:`~nbia_retriever.models.FileItem` objects as they come: one pass, no row kept.

    A row with a URI is a file; a row of a mixed sheet with a SeriesInstanceUID and no
    URI is a series. A URI that cannot be used skips its row, with the reason in
    :attr:`Manifest.skipped`: one bad row must not cost the others, and the reason
    names the line so the sheet can be mended. A size or MD5 that is not one keeps the
    row (the transfer then has no such check, or DRS's own), with a warning.
    """

    def __init__(self, names: list[str], columns: dict[str, list[int]],
                 series_column: int | None, source: str, header_line: int) -> None:
        self.names = names
        self.columns = columns
        self.drs = columns.get("drs", [])
        self.url = columns.get("url", [])
        self.series_column = series_column
        self.source = source
        self.header_line = header_line
        self.files: dict[str, FileItem] = {}
        self.series = _Collector()
        self.skipped = _Skipped()
        self.duplicates = 0
        self.kind = "drs" if self.drs else "pathdb"

    @classmethod
    def from_header(cls, cells: Sequence[object], series_column: int | None, source: str,
                    header_line: int) -> _FileSheet | None:
        """The reader for a header with a DRS or image URL column, else None."""
        names = [plain(_cell(cell)).strip() for cell in cells]
        ranked: dict[str, list[tuple[int, int]]] = {}
        weak: list[int] = []
        for index, name in enumerate(names):
            key = _normalize(name)
            found = _FILE_COLUMNS.get(key)
            if found is not None:
                ranked.setdefault(found[0], []).append((found[1], index))
                if key in _WEAK_ALIASES:
                    weak.append(index)
        columns = {name: [index for _, index in sorted(pairs)]
                   for name, pairs in ranked.items()}
        if weak and (series_column is not None or columns.get("url")
                     or len(columns.get("drs", ())) > len(weak)):
            columns["drs"] = [index for index in columns["drs"] if index not in weak]
        if not columns.get("drs") and not columns.get("url"):
            return None
        return cls(names, columns, series_column, source, header_line)

    def _first(self, cells: Sequence[object], field_name: str) -> tuple[str, int]:
        """The first non-empty cell of a field's columns (stripped), and its column."""
        for index in self.columns.get(field_name, ()):
            if index < len(cells):
                value = cells[index]
                text = (value if type(value) is str else _cell(value)).strip()
                if text:
                    return text, index
        return "", -1

    def _text(self, cells: Sequence[object], field_name: str) -> str:
        if field_name not in self.columns:  # most sheets have a few of the fields
            return ""
        return plain(self._first(cells, field_name)[0]).strip()

    def _what(self, index: int) -> str:
        return repr(_shorten(self.names[index])) if self.names[index] else \
            f"column {index + 1}"

    def add(self, line: int, cells: Sequence[object]) -> None:
        """Read one row (``line`` is its 1-based line or sheet row)."""
        text, index = self._first(cells, "drs")
        kind = "drs"
        if not text:
            text, index = self._first(cells, "url")
            kind = "url"
        if not text:
            self._no_uri(line, cells)
            return
        uri, why = _drs_uri(text) if kind == "drs" else _image_url(text)
        if uri is None:
            self.skipped.add(line, f"{self._what(index)} {_shorten(_redact(text))!r} {why}; "
                                   "row skipped")
            return
        # The last path segment, decoded (``c%2Fd`` -> ``d``); the host for a bare URL.
        last = unquote(uri.partition("://")[2].partition("?")[0].rstrip("/")
                       .rpartition("/")[2]).rpartition("/")[2]
        last = plain(last).strip() or uri.partition("://")[2].partition("/")[0]
        name = self._text(cells, "name") or last
        key = _zip_uid(name) or _zip_uid(last) or uri
        if key in self.files or key in self.series.seen:
            self.duplicates += 1
            return
        self.files[key] = FileItem(
            kind=kind, uri=uri, key=key, name=name,
            collection=self._text(cells, "collection"),
            patient_id=self._text(cells, "patient_id"),
            study_uid=self._text(cells, "study_uid"),
            study_date=self._text(cells, "study_date"),
            study_description=self._text(cells, "study_description"),
            modality=self._text(cells, "modality"),
            size=self._size(line, cells), md5=self._md5(line, cells), line=line,
        )

    def _no_uri(self, line: int, cells: Sequence[object]) -> None:
        """A row without a URI: a series of a mixed sheet, a blank row, or skipped."""
        if self.series_column is not None and self.series_column < len(cells):
            value = cells[self.series_column]
            if value is not None and not isinstance(value, str):
                # Excel turned the UID into a number: digits are already lost.
                raise ManifestError(f"a number ({value!r}), not a UID: store the column "
                                    "as text", source=self.source, line=line)
            uid = (value or "").strip().strip(",;\"'").strip()
            if uid:
                if uid in self.files:
                    self.duplicates += 1
                else:
                    self.series.add(uid, self.source, line)
                return
        if any(_cell(cell).strip() for cell in cells):
            wanted = [self.names[i] or f"column {i + 1}" for i in self.drs + self.url]
            if self.series_column is not None:
                wanted.append(self.names[self.series_column])
            self.skipped.add(line, f"no {' or '.join(map(repr, wanted[:3]))} value; "
                                   "row skipped")

    def _size(self, line: int, cells: Sequence[object]) -> int | None:
        text, index = self._first(cells, "size")
        if not text:
            return None
        size = _size_value(text)
        if size is None:
            self.skipped.add(line, f"{self._what(index)} {_shorten(plain(text))!r} is not "
                                   "a size in bytes; the row is kept, its size unchecked")
        return size

    def _md5(self, line: int, cells: Sequence[object]) -> str | None:
        text, index = self._first(cells, "md5")
        if not text:
            return None
        if _MD5.fullmatch(text) is None:
            self.skipped.add(line, f"{self._what(index)} {_shorten(plain(text))!r} is not "
                                   "an MD5 (32 hex digits); the row is kept, its MD5 "
                                   "unchecked")
            return None
        return text.lower()

    def manifest(self) -> Manifest:
        if not self.files and not self.series.seen:
            what = " or ".join(repr(_shorten(self.names[i])) for i in (self.drs + self.url)[:2])
            first = f"; {self.skipped.reasons[0]}" if self.skipped.reasons else ""
            raise ManifestError(f"no file listed in column {what}{first}",
                                source=self.source, line=self.header_line)
        return Manifest(series_uids=self.series.uids(), headers={}, source=self.source,
                        duplicates_dropped=self.duplicates + self.series.duplicates,
                        kind=self.kind, files=tuple(self.files.values()),
                        skipped=self.skipped.result())


def _read_file_rows(sheet: _FileSheet, lines: list[str], header: int,
                    delimiter: str) -> Manifest:
    """The data rows of a delimited DRS/PathDB sheet, each numbered by the line it
    starts on (a quoted cell may span lines)."""
    reader = csv.reader(iter(lines[header + 1:]), delimiter=delimiter)
    first = header + 2
    try:
        for cells in reader:
            if cells:
                sheet.add(first, cells)
            first = header + 2 + reader.line_num
    except csv.Error as exc:
        raise ManifestError(f"unreadable spreadsheet row: {exc}", source=sheet.source,
                            line=first) from None
    return sheet.manifest()


def _read_xlsx(path: Path, source: str) -> Manifest:
    try:
        openpyxl = importlib.import_module("openpyxl")
    except ImportError:
        raise ManifestError(
            "reading .xlsx needs openpyxl: `pip install openpyxl`, or save the sheet as CSV",
            source=source,
        ) from None
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types for a damaged file
        raise ManifestError(f"cannot read the workbook: {exc}".splitlines()[0],
                            source=source) from None
    try:
        sheet = book.active if book.active is not None else book.worksheets[0]
        collector = _Collector()
        column: int | None = None
        files: _FileSheet | None = None
        for number, cells in enumerate(sheet.iter_rows(values_only=True), start=1):
            if files is not None:
                files.add(number, cells)
                continue
            if column is None:
                column = _uid_column(cells)
                files = _FileSheet.from_header(cells, column, source, number)
                if column is None and files is None and number >= 50:
                    break
                continue
            if column < len(cells) and cells[column] is not None:
                value = cells[column]
                if not isinstance(value, str):
                    # Excel turned the UID into a number: digits are already lost.
                    raise ManifestError(
                        f"a number ({value!r}), not a UID: store the column as text",
                        source=source, line=number,
                    )
                collector.add(value, source, number)
    finally:
        book.close()
    if files is not None:
        return files.manifest()
    if column is None:
        raise ManifestError(f"first sheet {_NO_COLUMN}", source=source)
    if not collector.seen:
        raise ManifestError("no series listed in the first sheet", source=source)
    return Manifest(series_uids=collector.uids(), headers={}, source=source,
                    duplicates_dropped=collector.duplicates, kind="xlsx")


def _utf16_without_bom(data: bytes) -> str | None:
    """``"utf-16-le"`` or ``"utf-16-be"`` for UTF-16 text without a BOM, else None.

    Such files (Windows tools' "Unicode" output with its BOM cut off, scripts that write
    ``utf-16-le``) are mostly ASCII, so most of every other byte is NUL: at odd offsets
    for little endian, at even ones for big endian, and almost none at the others (a
    character U+xx00). UTF-8 text has no NUL at all, and binary data (zip, DICOM) has
    NULs with no such rhythm.
    """
    sample = data[:4096]
    if len(sample) < 4 or b"\x00" not in sample:
        return None
    pairs = len(sample) // 2
    even_nul = sample[0:2 * pairs:2].count(0)
    odd_nul = sample[1:2 * pairs:2].count(0)
    if odd_nul >= 0.6 * pairs and even_nul <= 0.05 * pairs:
        return "utf-16-le"
    if even_nul >= 0.6 * pairs and odd_nul <= 0.05 * pairs:
        return "utf-16-be"
    return None


def _decode(data: bytes, source: str) -> str:
    """UTF-8 (BOM or not), UTF-16 with a BOM (Excel's "Unicode text") or without one
    (told by its NUL bytes, see :func:`_utf16_without_bom`), else Latin-1.

    Latin-1 as the last resort because a CSV exported on Windows in cp1252 with an accent
    in a description column must still yield its ASCII UID column.
    """
    encoding = ("utf-16" if data.startswith((b"\xff\xfe", b"\xfe\xff"))
                else _utf16_without_bom(data))
    if encoding is not None:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as exc:
            kind = {"utf-16-le": "little endian, no BOM; ", "utf-16-be": "big endian, no BOM; "}
            raise ManifestError(f"not valid UTF-16 text ({kind.get(encoding, '')}byte "
                                f"{exc.start + 1}: {exc.reason})", source=source) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if b"\x00" in data:
        hint = " (it looks like a zip/xlsx file)" if data.startswith(b"PK\x03\x04") else ""
        raise ManifestError(f"binary file, not a manifest{hint}", source=source)
    return data.decode("latin-1")


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read a manifest, spreadsheet or UID list from disk (see :func:`parse_manifest`); a
    ``.s5cmd`` file is read as an s5cmd manifest whatever its first lines look like."""
    file = Path(path)
    source = str(path)
    suffix = file.suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        return _read_xlsx(file, source)
    if suffix == ".xls":
        raise ManifestError("old .xls workbooks are not supported: save as .xlsx or CSV",
                            source=source)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read: {exc.strerror or exc}", source=source) from None
    text = _decode(data, source)
    del data  # a 1,000,000-line manifest: 63 MB not to keep twice while parsing
    return parse_manifest(text, source=source,
                          kind="s5cmd" if suffix == ".s5cmd" else None)


# ----------------------------------------------------------------------------- writing


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\")


def format_manifest(
    series_uids: Iterable[str],
    *,
    download_server_url: str = DEFAULT_DOWNLOAD_URL,
    include_annotation: bool = True,
    retries: int = DEFAULT_RETRIES,
    databasket_id: str | None = None,
    version: str = "3.0",
    extra_headers: Mapping[str, str] | None = None,
) -> str:
    """A v3.0 ``.tcia`` manifest that :func:`parse_manifest` reads back exactly.

    Duplicate UIDs are dropped (first kept), as reading would drop them. Header values are
    stripped, as reading strips them. Anything that could not survive the round trip
    (an invalid UID, a line break in a value, a key that looks like a comment or the
    marker) is a :class:`ManifestError` instead of a manifest that reads differently.
    """
    source = "<format_manifest>"
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ManifestError(f"retries must be an int >= 0, got {retries!r}", source=source)
    headers: dict[str, str] = {
        "downloadServerUrl": download_server_url,
        "includeAnnotation": "true" if include_annotation else "false",
        "noOfrRetry": str(retries),
    }
    if databasket_id is not None:
        headers["databasketId"] = databasket_id
    if version:
        headers["manifestVersion"] = version
    standard = {k.casefold() for k in _STANDARD_KEYS}
    for key, value in (extra_headers or {}).items():
        if key.strip().casefold() in standard:
            raise ManifestError(f"header {key!r} must be given by its own argument",
                                source=source)
        headers[key] = value
    out: list[str] = []
    for key, value in headers.items():
        key, value = key.strip(), value.strip()
        bad_key = (not key or "=" in key or "\\" in key or _is_comment(key)
                   or key.lower() == _MARKER_KEY or _has_break(key) or key[0] == "\ufeff")
        if bad_key:
            raise ManifestError(f"header key {key!r} cannot be written", source=source)
        if _has_break(value):
            raise ManifestError(f"header {key!r}: a value cannot span lines", source=source)
        if value.endswith(","):
            raise ManifestError(f"header {key!r}: a value cannot end with a comma (readers "
                                "drop trailing commas)", source=source)
        out.append(f"{key}={_escape(value)}")
    out.append(MARKER)
    uids = [uid.strip() for uid in series_uids]
    if _check_bulk(uids) != _OK or "" in uids:
        for uid in uids:
            if not is_valid_uid(uid):
                raise ManifestError(f"not a DICOM UID: {_shorten(uid)!r}", source=source)
    seen = dict.fromkeys(uids)
    if not seen:
        raise ManifestError("no series to write", source=source)
    out.extend(seen)
    out.append("")
    return "\n".join(out)


def _has_break(text: str) -> bool:
    return "\n" in text or "\r" in text


def write_manifest(
    path: str | os.PathLike[str],
    series_uids: Iterable[str],
    *,
    download_server_url: str = DEFAULT_DOWNLOAD_URL,
    include_annotation: bool = True,
    retries: int = DEFAULT_RETRIES,
    databasket_id: str | None = None,
    version: str = "3.0",
    extra_headers: Mapping[str, str] | None = None,
) -> Path:
    """Write a ``.tcia`` manifest atomically (temp file + rename); returns the path.

    ``databasket_id`` defaults to the file name, as the portal names both alike, so the
    download root folder matches the manifest's name.
    """
    target = Path(path)
    try:
        text = format_manifest(
            series_uids, download_server_url=download_server_url,
            include_annotation=include_annotation, retries=retries,
            databasket_id=databasket_id if databasket_id is not None else target.name,
            version=version, extra_headers=extra_headers,
        )
    except ManifestError as exc:
        raise ManifestError(exc.problem, source=str(path)) from None
    try:
        atomic_write_text(target, text, newline="\n")
    except OSError as exc:
        raise ManifestError(f"cannot write: {exc.strerror or exc}", source=str(path)) from None
    return target


# ----------------------------------------------------------------------------- URLs


def _redact(url: str) -> str:
    """The URL without any ``user:password@`` part: error messages end up in logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}{sep}{netloc}{slash}{tail}"


def ascii_url(url: str) -> str:
    """``url`` with an international host in its ASCII ``xn--`` form, so that wherever
    it is shown a lookalike of a known host shows as the other host it is. Any other URL
    comes back as it is (one whose host cannot be is refused where it is used:
    :func:`api_base_from_download_url`)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return url
    if not host or host.isascii():
        return url
    try:
        host = ascii_host(host)
    except ValueError:
        return url
    user, at, _ = parts.netloc.rpartition("@")
    netloc = f"{user}{at}{host}" + ("" if port is None else f":{port}")
    return urlunsplit(parts._replace(netloc=netloc))


def api_base_from_download_url(url: str) -> str:
    """The REST API base (``<scheme>://<host>[:port][/prefix]/nbia-api/services/``).

    ``.../nbia-download/servlet/DownloadServlet`` becomes ``.../nbia-api/services/``,
    keeping any path prefix before it (servers hosted below a path). A URL already
    pointing into ``/nbia-api/services`` is cut back to that base; any other path gives
    the host's root base. Query, fragment and credentials are dropped. No API version is
    added: the client picks it. Not http(s) -> :class:`NbiaError`.
    """
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise NbiaError(f"download server URL {_redact(text)!r} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise NbiaError(
            f"download server URL {_redact(text)!r} is not an http(s) URL with a host"
        )
    try:  # a host that cannot be is refused here, before any request
        ascii_form = ascii_host(parts.hostname)
    except ValueError as exc:
        raise NbiaError(f"download server URL {_redact(text)!r}: the host {exc}") from None
    if parts.hostname.isascii():
        host = parts.netloc.rpartition("@")[2]
        if port is None and host.endswith(":"):
            host = host[:-1]
    else:  # shown from here on in its ASCII (xn--) form
        host = ascii_form + ("" if port is None else f":{port}")
    path = parts.path
    lowered = path.lower()
    prefix = ""
    for marker in (_SERVLET_PATH, _API_PATH):
        index = lowered.find(marker)
        if index >= 0:
            prefix = path[:index].rstrip("/")
            break
    return f"{scheme}://{host}{prefix}{_API_PATH}/"
