"""Normalised series metadata, shared by every stage of the pipeline.

NBIA serves the same facts under different names and formats depending on the API
version and the server build (``Subject ID`` in v1/v2 JSON, ``Patient ID`` in older v4
CSV, ``PatientID`` in current v4, ``Project`` for Collection before mid-2025, ``Number
of Images`` vs ``Image Count`` vs ``ImageCount``...). Everything downstream (layout,
report, the table in the UI) must see one shape, so all records go through the single
alias table below. Every field is optional because every version omits some.

Normalisation is also where server strings become data: control characters are
stripped here, once (:func:`~nbia_retriever.untrusted.plain`), so no later stage can
print a terminal escape or write a newline into a CSV row. Values that repeat across
series (collection, modality, licence...) are interned, so a 200,000-series manifest
holds one copy of each. Pure data, no I/O.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from itertools import repeat

from .untrusted import plain


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


#: canonical attribute -> the server field names that carry it (compared after
#: lower-casing and dropping spaces/underscores/punctuation).
ALIASES: dict[str, tuple[str, ...]] = {
    "series_uid": ("Series UID", "Series Instance UID", "SeriesInstanceUID"),
    "collection": ("Collection", "Project"),
    "patient_id": ("Subject ID", "Patient ID", "PatientID"),
    "study_uid": ("Study UID", "Study Instance UID", "StudyInstanceUID"),
    "study_date": ("Study Date", "StudyDate"),
    "study_description": ("Study Description", "StudyDesc"),
    "study_id": ("Study ID", "StudyID"),
    "series_description": ("Series Description", "SeriesDesc"),
    "series_number": ("Series Number", "SeriesNumber"),
    "modality": ("Modality",),
    "manufacturer": ("Manufacturer",),
    "body_part": ("Body Part Examined", "BodyPartExamined"),
    "sop_class_uid": ("SOP Class UID", "SOPClassUID"),
    "sop_class_name": ("SOP Class Name", "SOPClassName"),
    "image_count": ("Number of Images", "Image Count", "ImageCount", "NumberOfImages"),
    "file_size": ("File Size", "FileSize"),
    "license_name": ("License Name", "LicenseName"),
    "license_url": ("License URL", "License URI", "LicenseURI", "LicenseURL"),
    "third_party": ("3rd Party Analysis", "ThirdPartyAnalysis", "Third Party Analysis"),
    "data_description_uri": ("Data Description URI", "Collection URI", "DataDescriptionURI",
                             "CollectionURI"),
    "date_released": ("Date Released", "DateReleased"),
    "annotation_size": ("Annotation Size", "AnnotationSize"),
}
_LOOKUP: dict[str, str] = {_key(a): canon for canon, names in ALIASES.items() for a in names}
#: Fields whose values repeat across many series: one shared string each. The series UID
#: is shared with the manifest's (interned) copy.
_INTERNED = frozenset({
    "series_uid",
    "collection", "modality", "manufacturer", "body_part", "sop_class_uid", "sop_class_name",
    "license_name", "license_url", "third_party", "data_description_uri", "date_released",
    "study_date", "series_number", "study_description", "series_description",
})


def _to_int(value: object) -> int | None:
    """Servers send counts and sizes as strings, sometimes ``"1.2E7"`` or ``"60.0"``."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    text = str(value).strip()
    if not text:
        return None
    if text.isdigit():
        return int(text)
    try:
        number = float(text)
    except ValueError:
        return None
    if math.isnan(number) or math.isinf(number) or number < 0:
        return None
    return round(number)


class SeriesState(StrEnum):
    """The statuses of the downloads table (the Java retriever's, plus Queued).

    A ``StrEnum``: each member *is* its display string, so it serialises as itself in
    the journal, JSON events and CSV reports.
    """

    NOT_STARTED = "Not Started"
    QUEUED = "Queued"
    DOWNLOADING = "Downloading"
    PAUSED = "Paused"
    COMPLETE = "Complete"
    ERROR = "Error"
    NO_DATA = "No Data"
    NOT_AUTHORIZED = "Not Authorized"
    CANCELLED = "Cancelled"


#: States of a series that could not be downloaded (the "Retry failed series" set).
FAILED_STATES = frozenset({SeriesState.ERROR, SeriesState.NO_DATA, SeriesState.NOT_AUTHORIZED})
#: States a series ends a run in.
FINAL_STATES = frozenset({SeriesState.COMPLETE, *FAILED_STATES, SeriesState.CANCELLED})
#: Every state, in table order.
ALL_STATES: tuple[SeriesState, ...] = tuple(SeriesState)


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    """What the archive says about one series, normalised.

    Strings are ``""`` when unknown, never ``None``, so formatting code needs no guards.
    ``image_count`` and ``file_size`` are ``None`` when unknown: 0 is a real answer.
    ``extra`` keeps fields the alias table does not know, verbatim, only where a caller
    asked for them (search results); the download engine never keeps them.
    """

    series_uid: str
    collection: str = ""
    patient_id: str = ""
    study_uid: str = ""
    study_date: str = ""
    study_description: str = ""
    study_id: str = ""
    series_description: str = ""
    series_number: str = ""
    modality: str = ""
    manufacturer: str = ""
    body_part: str = ""
    sop_class_uid: str = ""
    sop_class_name: str = ""
    image_count: int | None = None
    file_size: int | None = None
    license_name: str = ""
    license_url: str = ""
    third_party: str = ""
    data_description_uri: str = ""
    date_released: str = ""
    annotation_size: int | None = None
    extra: Mapping[str, str] = field(default_factory=lambda: NO_EXTRA, compare=False,
                                     hash=False)


_INT_FIELDS = frozenset({"image_count", "file_size", "annotation_size"})
_STR_FIELDS = frozenset(f.name for f in fields(SeriesInfo)) - _INT_FIELDS - {"extra"}
INFO_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SeriesInfo) if f.name != "extra")


#: Fields whose surrounding whitespace means nothing (identifiers, codes, dates). Text
#: fields keep theirs: the Java retriever's folder names do ("Tte  Thorax  -81426").
_STRIPPED = frozenset({"series_uid", "study_uid", "study_date", "series_number", "modality",
                       "sop_class_uid", "license_url", "data_description_uri",
                       "date_released", "body_part"})


class _NoExtra(Mapping[str, str]):
    """The ``extra`` of records that keep none: one shared, immutable, empty mapping.

    200,000 series would otherwise carry 200,000 empty dicts (64 bytes each). It copies
    and pickles as itself, so ``dataclasses.asdict`` and ``copy.deepcopy`` work.
    """

    __slots__ = ()

    def __getitem__(self, key: str) -> str:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "{}"

    def __reduce__(self) -> str:
        return "NO_EXTRA"


NO_EXTRA: Mapping[str, str] = _NoExtra()


def _clean(value: object, strip: bool, intern: bool) -> str:
    text = value if type(value) is str else ("" if value is None else str(value))
    if not text.isprintable():
        text = plain(text)
    if strip:
        text = text.strip()
    return sys.intern(text) if intern and len(text) < 200 else text


def _text_column(column: Sequence[object], canon: str) -> list[str]:
    """One column of text cleaned: each distinct value once, then looked up in C.

    The common case (every value a printable string of sane length) is cleaned with
    C-level maps; anything else (None, numbers, control characters) value by value.
    """
    strip, intern = canon in _STRIPPED, canon in _INTERNED
    distinct = list(dict.fromkeys(column))
    if all(type(v) is str for v in distinct) and "".join(distinct).isprintable():  # type: ignore[arg-type]
        texts: Iterable[str] = distinct  # type: ignore[assignment]
        if strip:
            texts = map(str.strip, texts)
        if intern:
            texts = list(texts)
            if max(map(len, texts), default=0) < 200:
                texts = map(sys.intern, texts)
        table = dict(zip(distinct, texts, strict=True))
    else:
        table = {v: _clean(v, strip, intern) for v in distinct}
    return list(map(table.__getitem__, column))


def _int_column(column: Sequence[object]) -> list[int | None]:
    table = {v: _to_int(v) for v in dict.fromkeys(column)}
    return list(map(table.__getitem__, column))


class RecordShape:
    """How the columns of one answer map onto :class:`SeriesInfo`, worked out once.

    A v4 batch is a CSV of up to 10,000 rows with one header. Looking each name up once
    and cleaning the batch column by column (each distinct value of a column once: a
    batch has one collection, a few modalities, one licence) is what makes normalising
    a 200,000-series manifest cost a few microseconds per series.
    """

    __slots__ = ("_columns", "_extra", "_keep_extra", "names")

    def __init__(self, names: Sequence[str], *, keep_extra: bool = False) -> None:
        self.names = [str(n) for n in names]
        self._keep_extra = keep_extra
        columns: dict[str, list[int]] = {}
        extra: list[int] = []
        for index, name in enumerate(self.names):
            canon = _LOOKUP.get(_key(name))
            if canon is None:
                extra.append(index)
            else:
                columns.setdefault(canon, []).append(index)
        self._columns = columns
        self._extra = tuple(extra)

    def info(self, row: Sequence[object], *, series_uid: str = "") -> SeriesInfo:
        """One row (values in :attr:`names` order) as a :class:`SeriesInfo`."""
        info = self.infos([row])[0]
        if not info.series_uid and series_uid:
            return replace(info, series_uid=plain(series_uid).strip())
        return info

    def infos(self, rows: Sequence[Sequence[object]]) -> list[SeriesInfo]:
        """Many rows at once; short rows read as empty cells, long ones lose the excess."""
        if not rows:
            return []
        width = len(self.names)
        if set(map(len, rows)) != {width}:
            rows = [[*r[:width], *([None] * (width - len(r)))] for r in rows]
        table = list(zip(*rows, strict=True)) if width else []
        count = len(rows)
        values: list[Iterable[object]] = []
        for canon in INFO_FIELDS:
            indexes = self._columns.get(canon)
            if not indexes:
                values.append(repeat(None if canon in _INT_FIELDS else "", count))
                continue
            if canon in _INT_FIELDS:
                ints = [_int_column(table[i]) for i in indexes]
                values.append(ints[0] if len(ints) == 1 else
                              [next((n for n in c if n is not None), None)
                               for c in zip(*ints, strict=True)])
            else:
                texts = [_text_column(table[i], canon) for i in indexes]
                # Several columns carrying one field: the first non-empty one wins.
                values.append(texts[0] if len(texts) == 1 else
                              [next((t for t in c if t), "") for c in zip(*texts, strict=True)])
        if self._keep_extra and self._extra:
            names = [self.names[i] for i in self._extra]
            cleaned = [_text_column(table[i], "") for i in self._extra]
            values.append([dict(zip(names, c, strict=True)) for c in zip(*cleaned, strict=True)])
        else:
            values.append(repeat(NO_EXTRA, count))
        return list(map(SeriesInfo, *values))


def normalise_series_metadata(record: Mapping[str, object], *, series_uid: str = "",
                              keep_extra: bool = True) -> SeriesInfo:
    """Map one server record (any API version, JSON or CSV row) onto :class:`SeriesInfo`.

    ``series_uid`` is used when the record does not carry the UID itself. For many
    records with the same keys, :class:`RecordShape` does the same work once.

    >>> normalise_series_metadata({"Subject ID": "P1", "Number of Images": "60"}, series_uid="1.2")
    ... # doctest: +ELLIPSIS
    SeriesInfo(series_uid='1.2', ..., patient_id='P1', ..., image_count=60, ...)
    """
    shape = RecordShape(list(record), keep_extra=keep_extra)
    return shape.info(list(record.values()), series_uid=series_uid)


def normalise_records(records: Iterable[Mapping[str, object]], *,
                      keep_extra: bool = False) -> list[SeriesInfo]:
    """Many records, sharing one :class:`RecordShape` while their keys stay the same."""
    out: list[SeriesInfo] = []
    run: list[list[object]] = []
    keys: list[str] | None = None

    def flush() -> None:
        if run and keys is not None:
            out.extend(RecordShape(keys, keep_extra=keep_extra).infos(run))
        run.clear()

    for record in records:
        names = list(record)
        if names != keys:
            flush()
            keys = names
        run.append(list(record.values()))
    flush()
    return out
