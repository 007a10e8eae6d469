"""Where a series lands below the download root (reference section 4).

The descriptive layout is the Java Data Retriever's (GUI), character for character, so
trees made by either tool are the same tree and the scripts and tutorials that walk
Java trees work on ours (``docs/NBIA-SOURCE-FACTS.md`` section 7 has the Java source)::

    <Collection>/<PatientID>/<study>/<series>
    <study>  = [<StudyDate MM-dd-yyyy>-][<clean(StudyID)>-]
               [<clean(StudyDescription)[:53]>-]<last 5 of StudyUID>
    <series> = [<SeriesNumber as decimal(22,6)>-][<clean(SeriesDescription)[:53]>-]
               <last 5 of SeriesUID>

* ``clean(v)`` (the server's ``cleanStr``): drop every character outside
  ``[a-zA-Z0-9 .-]``; empty, or nothing left, gives ``NA``. Applied to StudyID and the
  descriptions, whatever the API sent (v4 sends raw text, v1/v2 stripped text without
  the ``NA``): the name never depends on which API answered.
* A part that is exactly ``null`` (or a description that is exactly ``-``) is left out,
  as Java's ``getPartOfName``/``getDescPartOfName`` do; an absent date or series number
  too. The series number reads ``1.000000``, as the server's decimal(22,6) prints it.

Java sanitises nothing else, and breaks on patient IDs such as ``..`` or ``CON``, on
``/`` in a collection name, on paths longer than Windows allows. Our additions apply only
where a name would be unsafe or too long, so a name that needs no change is left exactly
as Java writes it: every component is made safe on Linux, macOS and Windows at once (a
download made on a Linux cluster gets copied to laptops), and the whole series path
stays within :data:`MAX_SERIES_PATH` characters. Everything is a pure function of the
metadata, so a re-run (resume) computes the very same folders.

Component rules (:func:`sanitize_component`):

* Unicode NFC (macOS and Linux would otherwise hold two visually equal names);
* ``/`` and ``\\`` become ``-`` (the Java tool's choice for ``/``); ``< > : " | ? *``,
  control characters (C0, DEL, C1), U+2028/U+2029 and bidirectional-override controls
  (which can disguise a name) become ``_``; lone surrogates too;
* no leading whitespace, no trailing whitespace or dot (Windows strips them silently,
  merging names), so never ``.`` or ``..``; a leading ``.`` becomes ``_`` so nothing is
  hidden and no component can be ``.nbia``, the journal's folder;
* Windows device names (CON, PRN, AUX, NUL, COM0-9, LPT0-9, their superscript-digit
  variants, CONIN$, CONOUT$), alone or before an extension, any case: ``_`` is added
  right after the device name (``CON`` -> ``CON_``, ``nul.txt`` -> ``nul_.txt``);
* at most 255 bytes of UTF-8 (the limit of ext4, APFS and NTFS alike);
* never empty: an empty result is replaced by the fallback (``"NA"``, as the Java tool
  prints empty parts).

Besides: a collection folder never reads ``metadata.csv`` and a patient folder never
reads ``LICENSE`` (any case), since the engine writes those files exactly there.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from datetime import date
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import PurePosixPath

from .errors import NbiaError
from .models import SeriesInfo

__all__ = [
    "DESCRIPTION_LENGTH",
    "FALLBACK",
    "MAX_COMPONENT_BYTES",
    "MAX_SERIES_PATH",
    "UID_SUFFIX_LENGTH",
    "FolderPlanner",
    "Layout",
    "collision_key",
    "fit_component",
    "format_series_number",
    "java_clean",
    "java_clean_uri",
    "normalise_date",
    "root_folder_name",
    "sanitize_component",
    "series_relpath",
    "series_relpath_variant",
    "series_relpaths",
]

#: Longest series path (``Collection/Patient/Study/Series``) in characters: leaves the
#: root, the file name and a destination folder some room under Windows' 260.
MAX_SERIES_PATH = 240
#: Per-component limit of ext4, APFS and NTFS (bytes of UTF-8).
MAX_COMPONENT_BYTES = 255
#: The Java tool keeps this many characters of a description.
DESCRIPTION_LENGTH = 53
#: "last 5 of the UID", dots included.
UID_SUFFIX_LENGTH = 5
#: Replaces a component that would be empty (no collection, no patient ID...).
FALLBACK = "NA"
#: Longest root folder name: real ones look like ``manifest-1724796815128``.
MAX_ROOT_NAME = 64
#: A UID kept whole (classic layout, disambiguation) is capped here; longer means hostile.
_MAX_UID_PART = 64


#: Entries of each cache of folder-name parts. Parts repeat in runs (a manifest lists a
#: study's series together, a patient's studies together), so a small cache hits as
#: often as a big one, and 200,000 series do not keep 200,000 cached strings.
_CACHE = 4096


class Layout(StrEnum):
    """Folder layouts below ``Collection/PatientID``."""

    DESCRIPTIVE = "descriptive"
    CLASSIC = "classic"


# ----------------------------------------------------------------------------- components

_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_TABLE: dict[int, str] = {code: "_" for code in (*range(0x20), *range(0x7F, 0xA0))}
_TABLE.update({ord(ch): "_" for ch in '<>:"|?*\u2028\u2029' + _BIDI})
_TABLE.update({ord("/"): "-", ord("\\"): "-"})
_SURROGATES = re.compile("[\ud800-\udfff]")
_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{port}{n}" for port in ("COM", "LPT") for n in (*"0123456789", "¹", "²", "³")]
)
#: Names the engine itself writes at a given depth (0 = below the root, 1 = in a
#: collection folder): a series folder must never take them.
_TAKEN_AT_DEPTH: dict[int, frozenset[str]] = {
    0: frozenset({"metadata.csv"}),
    1: frozenset({"license"}),
}


def _clean(text: str) -> str:
    """Character-level mapping only (NFC, separators, forbidden and control characters)."""
    text = unicodedata.normalize("NFC", text).translate(_TABLE)
    if not text.isascii():
        text = _SURROGATES.sub("_", text)
    return text


def _trim(text: str) -> str:
    """No leading whitespace; no trailing whitespace or dots (Windows drops them)."""
    text = text.lstrip()
    end = len(text)
    while end and (text[end - 1] == "." or text[end - 1].isspace()):
        end -= 1
    return text[:end]


def _cut_bytes(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", errors="ignore")


def _unreserve(text: str) -> str:
    """``CON`` -> ``CON_``, ``con.tar.gz`` -> ``con_.tar.gz``: Windows opens the device."""
    stem, dot, rest = text.partition(".")
    core = stem.rstrip(" ")
    if core.upper() in _DEVICES:
        return f"{core}_{stem[len(core):]}{dot}{rest}"
    return text


def _finish(text: str) -> str:
    """Component-level rules on an already :func:`_clean`-ed string; may return ""."""
    text = _trim(text)
    if len(text.encode("utf-8")) > MAX_COMPONENT_BYTES:
        text = _trim(_cut_bytes(text, MAX_COMPONENT_BYTES))
    if text.startswith("."):
        text = "_" + text[1:]
    text = _unreserve(text)
    if len(text.encode("utf-8")) > MAX_COMPONENT_BYTES:  # the device "_" tipped it over
        text = _trim(_cut_bytes(text, MAX_COMPONENT_BYTES))
    if not unicodedata.is_normalized("NFC", text):  # a cut can split a composable pair
        text = _trim(unicodedata.normalize("NFC", text))
    return text


#: Components that need no change: ASCII letters, digits, space, ".", "-", "_", "$", not
#: starting with "." or a space, not ending with "." or a space (what Java's cleaned
#: parts nearly always are). Such a text is returned as it is, without the full rules.
_PLAIN = re.compile(r"[A-Za-z0-9_$-][A-Za-z0-9 ._$-]*", re.ASCII)


def _already_safe(text: str) -> bool:
    return (len(text) <= MAX_COMPONENT_BYTES and _PLAIN.fullmatch(text) is not None
            and text[-1] not in ". " and _unreserve(text) == text)


def sanitize_component(text: str, *, fallback: str = FALLBACK, max_len: int | None = None) -> str:
    """One path component, safe on Linux, macOS and Windows (rules: module docstring).

    ``max_len`` caps the length in characters before the trailing trim. The result is
    never empty unless ``fallback`` is ``""``; the fallback itself is sanitised too.
    The function is idempotent.
    """
    if (max_len is None or len(text) <= max_len) and text and _already_safe(text):
        return text
    cleaned = _clean(text)
    if max_len is not None:
        cleaned = cleaned[: max(max_len, 0)]
    result = _finish(cleaned)
    if result or not fallback:
        return result
    return _finish(_clean(fallback)) or FALLBACK


def fit_component(head: str, tail: str) -> str:
    """``head + tail`` in at most :data:`MAX_COMPONENT_BYTES` bytes, ``head`` cut to make
    room: a suffix that makes a name unique (``_2.xml``) or marks it must never push a
    name the file system took past what it takes. Both parts are already sanitised;
    ``tail`` is short. With no ``tail``, the cut end is trimmed like any component's."""
    room = MAX_COMPONENT_BYTES - len(tail.encode("utf-8"))
    if len(head.encode("utf-8")) <= room:
        return head + tail
    head = _cut_bytes(head, max(room, 0))
    if not unicodedata.is_normalized("NFC", head):  # a cut can split a composable pair
        head = unicodedata.normalize("NFC", head)
    return head + tail if tail else _trim(head)


def root_folder_name(manifest_root_name: str) -> str:
    """The download root's folder name (``databasketId`` minus ``.tcia``, sanitised).

    Capped at :data:`MAX_ROOT_NAME` characters so that the root never eats the path
    budget the series folders need; ``"manifest"`` when nothing usable is left.
    """
    name = manifest_root_name.strip()
    if name.lower().endswith(".tcia"):
        name = name[: -len(".tcia")]
    return sanitize_component(name, fallback="manifest", max_len=MAX_ROOT_NAME)


# ----------------------------------------------------------------------------- values

_DATE_FORMS = [
    re.compile(pattern, re.ASCII)
    for pattern in (
        # DICOM DA, and the date of a DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX)
        r"(?P<y>\d{4})(?P<m>\d{2})(?P<d>\d{2})(?:\d{2,6}(?:\.\d{1,6})?)?(?:[+-]\d{4})?",
        r"(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})",
        r"(?P<y>\d{4})/(?P<m>\d{1,2})/(?P<d>\d{1,2})",
        r"(?P<y>\d{4})\.(?P<m>\d{2})\.(?P<d>\d{2})",  # ACR-NEMA style DA
        r"(?P<m>\d{1,2})-(?P<d>\d{1,2})-(?P<y>\d{4})",  # NBIA v1/v2 JSON
        r"(?P<m>\d{1,2})/(?P<d>\d{1,2})/(?P<y>\d{4})",  # US spreadsheets
    )
]
_TIME_SPLIT = re.compile(r"[\sT]", re.ASCII)


@functools.lru_cache(maxsize=_CACHE)
def normalise_date(text: str) -> str:
    """Any date form NBIA serves -> ``MM-DD-YYYY`` (the Java folder format); invalid -> "".

    Accepted: ``YYYYMMDD``, ``YYYY-MM-DD``, ``YYYY/MM/DD``, ``YYYY.MM.DD``, ``MM-DD-YYYY``,
    ``MM/DD/YYYY``, each optionally followed by a time (``2001-05-03 00:00:00.0``,
    ``2001-05-03T00:00:00``), and DICOM DT (``20010503120000``). The calendar is checked:
    ``02-30-2001`` gives "", so no folder ever carries an impossible date.
    """
    head = _TIME_SPLIT.split(text.strip(), maxsplit=1)[0]
    for form in _DATE_FORMS:
        match = form.fullmatch(head)
        if match is None:
            continue
        try:
            day = date(int(match["y"]), int(match["m"]), int(match["d"]))
        except ValueError:
            return ""
        return f"{day.month:02d}-{day.day:02d}-{day.year:04d}"
    return ""


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_NOT_CLEAN = re.compile(r"[^a-zA-Z0-9 .-]")
#: Java's ``[^a-zA-Z0-9 .-/:]``: inside a character class ``.-/`` is the *range* from
#: ``.`` to ``/``, so ``-`` itself is dropped from URIs. Faithful, quirk included.
_NOT_CLEAN_URI = re.compile(r"[^a-zA-Z0-9 ./:]")


@functools.lru_cache(maxsize=_CACHE)
def java_clean(text: str) -> str:
    """The server's ``cleanStr``: keep ``[a-zA-Z0-9 .-]``; nothing left gives ``NA``.

    >>> java_clean("Recon 2: w/ contrast"), java_clean(""), java_clean("é")
    ('Recon 2 w contrast', 'NA', 'NA')
    """
    out = _NOT_CLEAN.sub("", text)
    return out or FALLBACK


def java_clean_uri(text: str) -> str:
    """The server's ``cleanURIStr`` (Data Description URI in metadata.csv)."""
    out = _NOT_CLEAN_URI.sub("", text)
    return out or FALLBACK


@functools.lru_cache(maxsize=_CACHE)
def format_series_number(text: str) -> str:
    """A series number as the server's decimal(22,6) prints it: ``"1"`` -> ``"1.000000"``.

    This is the one way a series number is printed (folders, tables, reports). Empty
    stays empty; anything that is not a plain number, or a number no decimal(22,6) could
    hold, is returned stripped (the layout cleans it like any other text).
    """
    text = text.strip()
    if not text or _NUMBER.fullmatch(text) is None:
        return text
    try:
        number = Decimal(text)
    except InvalidOperation:  # an exponent too large even for Decimal
        return text
    if number and not -7 <= number.adjusted() <= 15:
        return text
    if number == 0:
        number = Decimal(0)  # no "-0.000000"
    return f"{number:.6f}"


def _java_part(text: str) -> str:
    """Java's ``getPartOfName``: nothing for an empty value or the text ``null``."""
    return "" if text in ("", "null") else text


def _java_desc(text: str) -> str:
    """Java's ``getDescPartOfName`` (after ``cleanStr``): ``/`` -> ``-``; nothing for
    ``null`` or ``-``; else the first 53 characters."""
    text = text.replace("/", "-")
    if text in ("", "null", "-"):
        return ""
    return text[:DESCRIPTION_LENGTH]


# ----------------------------------------------------------------------------- paths


@functools.lru_cache(maxsize=_CACHE)
def _piece(text: str, limit: int | None = None) -> str:
    """A part of a component: cleaned and trimmed; component rules come after joining."""
    cleaned = _clean(text).strip()
    if limit is not None:
        cleaned = cleaned[:limit]
    return _trim(cleaned)


def _uid_part(uid: str) -> str:
    """A UID kept whole; a hostile one (too long, non-ASCII) is cut and hashed instead."""
    piece = _piece(uid)
    if len(piece) <= _MAX_UID_PART and piece.isascii():
        return piece
    digest = hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    head = _trim(piece.encode("ascii", "ignore").decode("ascii")[: _MAX_UID_PART - 17])
    return f"{head}-{digest}" if head else digest


def _suffix(uid: str, variant: int) -> str:
    """Mode 0: last 5 characters (Java); 1: the whole UID; 2: the whole UID plus a hash."""
    uid = uid.strip()
    if variant == 0:
        return _piece(uid[-UID_SUFFIX_LENGTH:])
    if variant == 1:
        return _uid_part(uid)
    digest = hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{_uid_part(uid)}-{digest}"


def _join(parts: Iterable[str]) -> str:
    return "-".join(filter(None, parts))


@functools.lru_cache(maxsize=_CACHE)
def _component(text: str, depth: int) -> str:
    result = sanitize_component(text)
    if result.casefold() in _TAKEN_AT_DEPTH.get(depth, ()):
        result += "_"
    return result


_Fields = dict[str, str]
_Builder = Callable[[_Fields], tuple[str, str, str, str]]

#: Floors: collection and patient keep at least one character of their own.
_FLOOR = {"collection": 1, "patient": 1}
#: What gives way, in order, when the whole path is too long.
_SHRINK_TOTAL = ("series_desc", "study_desc", "patient", "collection", "study_id", "number")
#: What gives way when one component exceeds MAX_COMPONENT_BYTES.
_SHRINK_COMPONENT = (("collection",), ("patient",), ("study_desc", "study_id"),
                     ("series_desc", "number"))


def _build_descriptive(f: _Fields) -> tuple[str, str, str, str]:
    return (
        _component(f["collection"], 0),
        _component(f["patient"], 1),
        _component(_join((f["date"], f["study_id"], f["study_desc"], f["study_sfx"])), 2),
        _component(_join((f["number"], f["series_desc"], f["series_sfx"])), 3),
    )


def _build_classic(f: _Fields) -> tuple[str, str, str, str]:
    return (
        _component(f["collection"], 0),
        _component(f["patient"], 1),
        _component(f["study_sfx"], 2),
        _component(f["series_sfx"], 3),
    )


def _drop(value: str, excess: int, floor: int, *, in_bytes: bool) -> str:
    """``value`` shortened from its end by at least ``excess`` characters (or bytes)."""
    if in_bytes:
        keep, dropped = len(value), 0
        while keep > floor and dropped < excess:
            keep -= 1
            dropped += len(value[keep].encode("utf-8"))
    else:
        keep = max(floor, len(value) - excess)
    return _trim(value[:keep])


def _fit(fields: _Fields, build: _Builder) -> tuple[str, str, str, str]:
    """Shorten fields, in the documented order, until every limit holds.

    Deterministic (no dependence on anything but ``fields``) and terminating: each round
    strictly shortens one field, and the parts that never shrink (dates, UID suffixes)
    are bounded far below the limits.
    """
    while True:
        parts = build(fields)
        names: Sequence[str] = ()
        excess, in_bytes = 0, False
        for index, part in enumerate(parts):
            over = len(part.encode("utf-8")) - MAX_COMPONENT_BYTES
            if over > 0:
                names, excess, in_bytes = _SHRINK_COMPONENT[index], over, True
                break
        else:
            total = sum(map(len, parts)) + len(parts) - 1
            if total <= MAX_SERIES_PATH:
                return parts
            names, excess = _SHRINK_TOTAL, total - MAX_SERIES_PATH
        for name in names:
            floor = _FLOOR.get(name, 0)
            if len(fields[name]) > floor:
                fields[name] = _drop(fields[name], excess, floor, in_bytes=in_bytes)
                break
        else:  # pragma: no cover - unreachable: the fixed parts are bounded
            raise NbiaError(f"series {fields['uid']}: no folder name fits the path limits")


def _relpath(info: SeriesInfo, layout: Layout, variant: int) -> PurePosixPath:
    return PurePosixPath(_relpath_text(info, layout, variant))


#: Last five characters of a UID that need no cleaning at the end of a safe component.
_PLAIN_TAIL = re.compile(r"[0-9.]*[0-9]", re.ASCII)


@functools.lru_cache(maxsize=_CACHE)
def _study_head(date: str, study_id: str, description: str) -> tuple[str, bool]:
    """``<date>-<StudyID>-<description>`` of a study folder (a few distinct values per
    collection) and whether it stays a safe component with ``-<digits>`` appended."""
    head = _join((normalise_date(date), _java_part(java_clean(study_id)),
                  _java_desc(java_clean(description))))
    return head, bool(head) and _already_safe(head)


def _study_component(date: str, study_id: str, description: str, study_uid: str) -> str:
    """The study folder's name: its cached head plus the UID's last five characters when
    both are plain (as :func:`_series_component`), else by the component rules."""
    head, safe = _study_head(date, study_id, description)
    if safe:
        tail = study_uid.strip()[-UID_SUFFIX_LENGTH:]
        if _PLAIN_TAIL.fullmatch(tail) is not None:
            return f"{head}-{tail}"
    return _component.__wrapped__(_join((head, _suffix(study_uid, 0))), 2)


def _series_number_part(text: str) -> str:
    number = format_series_number(text)
    if number and _NUMBER.fullmatch(number) is None:
        number = java_clean(number)
    return _java_part(number)


@functools.lru_cache(maxsize=_CACHE)
def _series_head(number: str, description: str) -> tuple[str, bool]:
    """``<number>-<description>`` of a series folder (a few distinct values per archive)
    and whether it is a safe component that stays safe with ``-<digits>`` appended."""
    head = _join((_series_number_part(number), _java_desc(java_clean(description))))
    return head, bool(head) and _already_safe(head)


#: The parts :meth:`FolderPlanner.take_many` works out once per distinct value.
_STUDY_OF = operator.attrgetter("_study")  # shared by the series of one study
_HEAD_FIELDS = operator.attrgetter("series_number", "series_description")
#: A series head shorter than this cannot make its component too long with a UID tail.
_SAFE_HEAD = MAX_COMPONENT_BYTES // 4 - UID_SUFFIX_LENGTH - 1


def _ascii_only(text: str | None) -> str | None:
    return text if text is not None and text.isascii() else None


def _short_safe_head(number: str, description: str) -> str | None:
    """The series head when ``<head>-<plain tail>`` needs no rule at all, else None."""
    head, safe = _series_head(number, description)
    return head if safe and len(head) < _SAFE_HEAD else None


def _series_component(info: SeriesInfo, variant: int) -> str:
    """The series folder's name; unique per series, so not cached itself (its head is).
    A safe head plus a plain UID tail (digits and dots, ending in a digit) is safe as it
    stands; anything else goes through the component rules."""
    head, safe = _series_head(info.series_number, info.series_description)
    if variant == 0 and safe:
        tail = info.series_uid.strip()[-UID_SUFFIX_LENGTH:]
        if _PLAIN_TAIL.fullmatch(tail) is not None:
            return f"{head}-{tail}"
    return _component.__wrapped__(_join((head, _suffix(info.series_uid, variant))), 3)


def _too_long(part: str) -> bool:
    return len(part) > MAX_COMPONENT_BYTES // 4 and len(part.encode("utf-8")) > \
        MAX_COMPONENT_BYTES


def _prefix(collection: str, patient: str, study: str) -> str | None:
    """``Collection/Patient/Study`` from its components; None when one is too long."""
    if _too_long(collection) or _too_long(patient) or _too_long(study):
        return None
    return f"{collection}/{patient}/{study}"


@functools.lru_cache(maxsize=_CACHE)
def _study_prefix(collection: str, patient_id: str, date: str, study_id: str,
                  description: str, study_uid: str) -> str | None:
    """``Collection/Patient/Study`` of the descriptive layout, once per study (a few
    series share it); None when a component hits its limit."""
    return _prefix(_component(_piece(collection), 0), _component(_piece(patient_id), 1),
                   _study_component(date, study_id, description, study_uid))




def _descriptive_fast(info: SeriesInfo, variant: int) -> str | None:
    """The descriptive relpath when no limit is hit (nearly always), from cached parts;
    None when something must be shortened (the full rules of :func:`_fit` apply)."""
    prefix = _study_prefix(info.collection, info.patient_id, info.study_date, info.study_id,
                           info.study_description, info.study_uid)
    if prefix is None:
        return None
    series = _series_component(info, variant)
    if len(prefix) + len(series) >= MAX_SERIES_PATH or _too_long(series):
        return None
    return f"{prefix}/{series}"


def _relpath_text(info: SeriesInfo, layout: Layout, variant: int) -> str:
    """The relpath as ``a/b/c/d`` text: what the engine keeps (a ``PurePosixPath`` per
    series would cost a third of planning a large manifest)."""
    if layout is Layout.DESCRIPTIVE:
        fast = _descriptive_fast(info, variant)
        if fast is not None:
            return fast
    return _relpath_rules(info, layout, variant)


def _relpath_rules(info: SeriesInfo, layout: Layout, variant: int) -> str:
    """The relpath by the full rules (:func:`_fit`); the fast path must agree with it."""
    fields: _Fields = {
        "uid": info.series_uid,
        "collection": _piece(info.collection),
        "patient": _piece(info.patient_id),
        "date": "",
        "study_id": "",
        "study_desc": "",
        "number": "",
        "series_desc": "",
    }
    if layout is Layout.CLASSIC:
        fields["study_sfx"] = _uid_part(info.study_uid.strip())
        fields["series_sfx"] = _suffix(info.series_uid, max(variant, 1))
        build: _Builder = _build_classic
    else:
        fields.update(
            date=normalise_date(info.study_date),
            study_id=_java_part(java_clean(info.study_id)),
            study_desc=_java_desc(java_clean(info.study_description)),
            study_sfx=_suffix(info.study_uid, 0),
            number=_series_number_part(info.series_number),
            series_desc=_java_desc(java_clean(info.series_description)),
            series_sfx=_suffix(info.series_uid, variant),
        )
        build = _build_descriptive
    return "/".join(_fit(fields, build))


def series_relpath(info: SeriesInfo, layout: Layout | str = Layout.DESCRIPTIVE) -> PurePosixPath:
    """``Collection/PatientID/<study>/<series>`` relative to the download root.

    Descriptive (default): the Java GUI's names (module docstring). Classic:
    ``StudyInstanceUID/SeriesInstanceUID``. Every component is made safe only where it
    needs to be; over :data:`MAX_SERIES_PATH` characters, the series description gives
    way first, then the study description, the patient ID, the collection (the UID
    suffixes never do).

    Like the Java tool, two series of one study with equal number, description and last
    five UID characters get the same folder: :class:`FolderPlanner` (and
    :func:`series_relpaths`) resolve such clashes.
    """
    return _relpath(info, Layout(layout), 0)


def collision_key(path: PurePosixPath | str) -> str:
    """Windows and macOS compare names case-insensitively: so do we."""
    text = str(path)
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFC", text).casefold()


def series_relpath_variant(info: SeriesInfo, layout: Layout | str, variant: int) -> PurePosixPath:
    """The folder of a series in one of its variants (0: the Java name; 1: the whole
    series UID instead of its last five characters; 2: the whole UID plus a hash)."""
    return _relpath(info, Layout(layout), variant)


def _digest(key: str) -> bytes:
    """A stable (process-independent) 64-bit digest of a collision key."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()


#: A bucket of :class:`_DigestSet` holds 512 digests before it becomes a set (honest
#: manifests put about 15 in each, 1,000,000 series).
_BUCKET_BYTES = 6 * 512


class _DigestSet:
    """A set of 64-bit digests in about 10 bytes each (a ``set`` of ints takes 80).

    The first two bytes choose one of 65,536 buckets; a bucket is the other six bytes of
    its digests, concatenated (a 1,000,000-series manifest puts about 15 in each, a
    90-byte ``find``). 70 MB of a 1,000,000-series plan, at the same speed.
    """

    __slots__ = ("_buckets", "_full")

    def __init__(self) -> None:
        self._buckets: list[bytes | None] = [b""] * 65536
        # Buckets past _BUCKET_BYTES, as sets: a server that crafts descriptions so
        # that many folders fall in one bucket must not make each add copy and search
        # an ever longer bucket (quadratic). None in _buckets marks them.
        self._full: dict[int, set[bytes]] = {}

    def add(self, digest: bytes) -> bool:
        """Add ``digest``; False if it was there already."""
        index, rest = digest[0] << 8 | digest[1], digest[2:]
        bucket = self._buckets[index]
        if bucket is None:
            full = self._full[index]
            if rest in full:
                return False
            full.add(rest)
            return True
        at = bucket.find(rest)
        while at >= 0:
            if at % 6 == 0:
                return False
            at = bucket.find(rest, at + 1)  # a match across two entries is none
        if len(bucket) < _BUCKET_BYTES:
            self._buckets[index] = bucket + rest
        else:
            self._full[index] = {bucket[i:i + 6] for i in range(0, len(bucket), 6)} | {rest}
            self._buckets[index] = None
        return True


class FolderPlanner:
    """Chooses folders for series one at a time, in manifest order; no two alike.

    A series gets its Java name unless an earlier one took it (case-insensitively); it
    then carries its whole UID instead of the last five characters (and, should even
    that clash with hostile metadata, a hash of it too). Deciding in manifest order, one
    series at a time, is what lets a download plan its first batch and start before the
    last batch of metadata has arrived, and still name every folder the same on every
    run: the name of a series depends only on the series before it in the manifest,
    never on the order in which the server's answers arrived. Folders already used (a
    resumed download's complete series) are passed to :meth:`reserve` first.
    """

    def __init__(self, layout: Layout | str = Layout.DESCRIPTIVE) -> None:
        self.layout = Layout(layout)
        # 64-bit digests of the collision keys, not the keys: a tenth of the memory. A
        # collision of two digests only gives one series the longer, whole-UID name:
        # never two series one folder.
        self._taken = _DigestSet()

    def reserve(self, relpaths: Iterable[PurePosixPath | str]) -> None:
        for path in relpaths:
            self._taken.add(_digest(collision_key(path)))

    def take(self, info: SeriesInfo) -> tuple[str, int]:
        """The folder for ``info`` (``a/b/c/d`` text) and the variant it needed (0 = the
        Java name)."""
        for variant in (0, 1, 2):
            path = _relpath_text(info, self.layout, variant)
            if self._taken.add(_digest(collision_key(path))):
                return path, variant
        # Only an equal UID could still clash, and a manifest holds each UID once.
        raise NbiaError(f"series {info.series_uid}: every folder name for it is taken")

    def take_many(self, infos: Sequence[SeriesInfo]) -> list[tuple[str, int]]:
        """:meth:`take` for each of ``infos``, in order, with the same answers.

        A metadata batch's Java names are worked out together: each distinct study
        prefix and series head once (a few series share each), then one short loop per
        series (its UID tail, the clash check). Anything off the common path (a part
        that needs cleaning or shortening, a clash) goes through :meth:`take`.
        """
        if self.layout is not Layout.DESCRIPTIVE:
            return [self.take(info) for info in infos]
        # Series of one study share one record (SeriesInfo's own): its fields once.
        studies = list(map(_STUDY_OF, infos))
        fields = {study: (study.common.collection, study.patient_id, study.study_date,
                          study.study_id, study.study_description, study.study_uid)
                  for study in dict.fromkeys(studies)}
        collection_of = {c: _component(_piece(c), 0) for c in {k[0] for k in fields.values()}}
        patient_of = {p: _component(_piece(p), 1) for p in {k[1] for k in fields.values()}}
        # A prefix that is ASCII and a head that is safe and short enough make the whole
        # path ASCII (a plain tail is digits and dots) and its last component valid.
        prefix_of = {study: _ascii_only(_prefix(collection_of[k[0]], patient_of[k[1]],
                                                _study_component(*k[2:])))
                     for study, k in fields.items()}
        heads = list(map(_HEAD_FIELDS, infos))
        head_of = {key: _short_safe_head(*key) for key in dict.fromkeys(heads)}
        plain, add, blake2b = _PLAIN_TAIL.fullmatch, self._taken.add, hashlib.blake2b
        out: list[tuple[str, int]] = []
        for info, prefix, head in zip(infos, map(prefix_of.__getitem__, studies),
                                      map(head_of.__getitem__, heads), strict=True):
            if prefix is not None and head is not None:
                tail = info.series_uid.strip()[-UID_SUFFIX_LENGTH:]
                if plain(tail) is not None:
                    path = f"{prefix}/{head}-{tail}"
                    # The clash check, as take() does it (an ASCII key is its lower case).
                    if len(path) <= MAX_SERIES_PATH and add(
                            blake2b(path.lower().encode(), digest_size=8).digest()):
                        out.append((path, 0))
                        continue
            out.append(self.take(info))
        return out


def series_relpaths(
    infos: Iterable[SeriesInfo], layout: Layout | str = Layout.DESCRIPTIVE
) -> dict[str, PurePosixPath]:
    """Folders for a whole download, in order: series UID -> relpath, no two alike.

    :class:`FolderPlanner` over ``infos``: the first series of a clash keeps the Java
    name, later ones carry their whole UID. Later duplicates of a UID are ignored.
    """
    planner = FolderPlanner(layout)
    paths: dict[str, PurePosixPath] = {}
    for info in infos:
        if info.series_uid not in paths:
            paths[info.series_uid] = PurePosixPath(planner.take(info)[0])
    return paths
