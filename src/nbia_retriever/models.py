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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum

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
#: Fields whose values repeat across many series: one shared string each.
_INTERNED = frozenset({
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
    extra: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


_INT_FIELDS = frozenset({"image_count", "file_size", "annotation_size"})
_STR_FIELDS = frozenset(f.name for f in fields(SeriesInfo)) - _INT_FIELDS - {"extra"}
INFO_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SeriesInfo) if f.name != "extra")


#: Fields whose surrounding whitespace means nothing (identifiers, codes, dates). Text
#: fields keep theirs: the Java retriever's folder names do ("Tte  Thorax  -81426").
_STRIPPED = frozenset({"series_uid", "study_uid", "study_date", "series_number", "modality",
                       "sop_class_uid", "license_url", "data_description_uri",
                       "date_released", "body_part"})


def _text(value: object, canon: str) -> str:
    text = "" if value is None else str(value)
    text = plain(text)
    if canon in _STRIPPED:
        text = text.strip()
    return sys.intern(text) if canon in _INTERNED and len(text) < 200 else text


class RecordShape:
    """How the columns of one answer map onto :class:`SeriesInfo`, worked out once.

    A v4 batch is a CSV of up to 10,000 rows with one header: looking each column name
    up once, instead of once per row, is most of what makes normalising a
    200,000-series manifest cost microseconds per series.
    """

    __slots__ = ("_columns", "_keep_extra", "names")

    def __init__(self, names: Sequence[str], *, keep_extra: bool = False) -> None:
        self.names = [str(n) for n in names]
        self._keep_extra = keep_extra
        seen: set[str] = set()
        columns: list[tuple[int, str | None]] = []
        for index, name in enumerate(self.names):
            canon = _LOOKUP.get(_key(name))
            if canon is not None and canon in seen:
                # A second alias of a field already mapped: first non-empty wins, below.
                columns.append((index, "+" + canon))
                continue
            if canon is not None:
                seen.add(canon)
            columns.append((index, canon))
        self._columns = columns

    def info(self, row: Sequence[object], *, series_uid: str = "") -> SeriesInfo:
        """One row (values in :attr:`names` order) as a :class:`SeriesInfo`."""
        values: dict[str, object] = {}
        extra: dict[str, str] = {}
        width = len(row)
        for index, canon in self._columns:
            value = row[index] if index < width else None
            if canon is None:
                if self._keep_extra:
                    extra[self.names[index]] = "" if value is None else plain(str(value))
                continue
            if canon[0] == "+":  # a later alias: only if the first one was empty
                canon = canon[1:]
                if values.get(canon) not in ("", None):
                    continue
            if canon in _INT_FIELDS:
                values[canon] = _to_int(value)
            else:
                values[canon] = _text(value, canon)
        uid = str(values.pop("series_uid", "") or "") or plain(series_uid).strip()
        return SeriesInfo(series_uid=uid, extra=extra, **values)  # type: ignore[arg-type]


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
    shape: RecordShape | None = None
    keys: list[str] | None = None
    for record in records:
        names = list(record)
        if shape is None or names != keys:
            shape, keys = RecordShape(names, keep_extra=keep_extra), names
        out.append(shape.info(list(record.values())))
    return out
