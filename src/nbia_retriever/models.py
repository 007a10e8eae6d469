"""Normalised series metadata, shared by every stage of the pipeline.

NBIA serves the same facts under different names and formats depending on the API
version (``Subject ID`` in v1/v2 JSON, ``Patient ID`` in v4 CSV, ``Number of Images`` vs
``Image Count``, dates as ``MM-DD-YYYY`` or ``YYYY-MM-DD``...). Everything downstream
(layout, report, the table in the UI) must see one shape, so all records go through the
single alias table below. Every field is optional because every version omits some.
Pure data, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields


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
    "sop_class_name": ("SOP Class Name",),
    "image_count": ("Number of Images", "Image Count", "ImageCount", "NumberOfImages"),
    "file_size": ("File Size", "FileSize"),
    "license_name": ("License Name", "LicenseName"),
    "license_url": ("License URL", "License URI", "LicenseURI", "LicenseURL"),
    "third_party": ("3rd Party Analysis", "ThirdPartyAnalysis", "Third Party Analysis"),
    "data_description_uri": ("Data Description URI", "Collection URI", "DataDescriptionURI"),
    "date_released": ("Date Released", "DateReleased"),
    "annotation_size": ("Annotation Size", "AnnotationSize"),
}
_LOOKUP: dict[str, str] = {_key(a): canon for canon, names in ALIASES.items() for a in names}


def _to_int(value: object) -> int | None:
    """Servers send counts and sizes as strings, sometimes ``"1.2E7"`` or ``"60.0"``."""
    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    if math.isnan(number) or math.isinf(number) or number < 0:
        return None
    return round(number)


@dataclass(frozen=True)
class SeriesInfo:
    """What the archive says about one series, normalised.

    Strings are ``""`` when unknown, never ``None``, so formatting code needs no guards.
    ``image_count`` and ``file_size`` are ``None`` when unknown: 0 is a real answer.
    ``extra`` keeps any fields the alias table does not know, verbatim.
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


_INT_FIELDS = {"image_count", "file_size", "annotation_size"}
_STR_FIELDS = {f.name for f in fields(SeriesInfo)} - _INT_FIELDS - {"extra"}


def normalise_series_metadata(record: Mapping[str, object], *, series_uid: str = "") -> SeriesInfo:
    """Map one server record (any API version, JSON or CSV row) onto :class:`SeriesInfo`.

    ``series_uid`` is used when the record does not carry the UID itself.

    >>> normalise_series_metadata({"Subject ID": "P1", "Number of Images": "60"}, series_uid="1.2")
    ... # doctest: +ELLIPSIS
    SeriesInfo(series_uid='1.2', ..., patient_id='P1', ..., image_count=60, ...)
    """
    values: dict[str, object] = {}
    extra: dict[str, str] = {}
    for name, value in record.items():
        canon = _LOOKUP.get(_key(str(name)))
        if canon is None:
            extra[str(name)] = "" if value is None else str(value)
            continue
        if canon in values and values[canon] not in ("", None):
            continue  # first non-empty alias wins
        if canon in _INT_FIELDS:
            values[canon] = _to_int(value)
        else:
            values[canon] = "" if value is None else str(value).strip()
    uid = str(values.pop("series_uid", "") or "") or series_uid
    return SeriesInfo(series_uid=uid, extra=extra, **values)  # type: ignore[arg-type]


class SeriesState:
    """The statuses of the downloads table (the Java retriever's, plus Queued).

    Plain string constants rather than an Enum so that they serialise as themselves in
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

    FAILED = frozenset({ERROR, NO_DATA, NOT_AUTHORIZED})
    FINAL = frozenset({COMPLETE, ERROR, NO_DATA, NOT_AUTHORIZED, CANCELLED})
    ALL = (NOT_STARTED, QUEUED, DOWNLOADING, PAUSED, COMPLETE, ERROR, NO_DATA,
           NOT_AUTHORIZED, CANCELLED)
