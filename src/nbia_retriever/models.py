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
import operator
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import FrozenInstanceError, dataclass
from enum import StrEnum
from itertools import repeat
from typing import TypeVar

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
    # v4's getSeriesMetadata has only the flag ("1": the series has annotation files):
    # read as a size of 1 byte, "some", what the engine asks getDCMImage for (v1/v2 also
    # send "Annotation Size", which comes first and wins).
    "annotation_size": ("Annotation Size", "AnnotationSize", "AnnotationsFlag"),
}
_LOOKUP: dict[str, str] = {_key(a): canon for canon, names in ALIASES.items() for a in names}
#: Fields whose values repeat across many series: one shared string each. (The series UID
#: is unique; :meth:`RecordShape.infos` shares the caller's copy instead, see ``known``.)
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


#: The state string "Interrupted" had in journals written before issue 25.
LEGACY_CANCELLED = "Cancelled"


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
    #: Stopped by the user (Ctrl-C, quit) or by what stopped the run: it resumes on the
    #: next run. "Cancelled" until issue 25 (it read as if the user had dropped the
    #: series); journals of then still say so, and :meth:`_missing_` reads it.
    INTERRUPTED = "Interrupted"
    CANCELLED = "Interrupted"  # the old name, an alias

    @classmethod
    def _missing_(cls, value: object) -> SeriesState | None:
        """``SeriesState("Cancelled")``: the state string of journals before issue 25."""
        return cls.INTERRUPTED if value == LEGACY_CANCELLED else None


#: States of a series that could not be downloaded (the "Retry failed series" set).
FAILED_STATES = frozenset({SeriesState.ERROR, SeriesState.NO_DATA, SeriesState.NOT_AUTHORIZED})
#: States a series ends a run in.
FINAL_STATES = frozenset({SeriesState.COMPLETE, *FAILED_STATES, SeriesState.CANCELLED})
#: Every state, in table order.
ALL_STATES: tuple[SeriesState, ...] = tuple(SeriesState)


#: The fields of :class:`SeriesInfo`, in the order of its constructor's arguments.
INFO_FIELDS: tuple[str, ...] = (
    "series_uid", "collection", "patient_id", "study_uid", "study_date", "study_description",
    "study_id", "series_description", "series_number", "modality", "manufacturer",
    "body_part", "sop_class_uid", "sop_class_name", "image_count", "file_size",
    "license_name", "license_url", "third_party", "data_description_uri", "date_released",
    "annotation_size",
)
#: Where each field lives (see :class:`SeriesInfo`): the series' own, its study's, and
#: those a whole collection or scanner shares.
_OWN = ("series_uid", "series_description", "series_number", "image_count", "file_size")
_STUDY = ("patient_id", "study_uid", "study_date", "study_description", "study_id")
_COMMON = ("collection", "modality", "manufacturer", "body_part", "sop_class_uid",
           "sop_class_name", "license_name", "license_url", "third_party",
           "data_description_uri", "date_released", "annotation_size", "extra")


@dataclass(slots=True, eq=False, repr=False)
class _Common:
    """Fields one collection (or one scanner of it) shares: one object for many series."""

    collection: str
    modality: str
    manufacturer: str
    body_part: str
    sop_class_uid: str
    sop_class_name: str
    license_name: str
    license_url: str
    third_party: str
    data_description_uri: str
    date_released: str
    annotation_size: int | None
    extra: Mapping[str, str]


@dataclass(slots=True, eq=False, repr=False)
class _Study:
    """Fields the series of one study share, and their :class:`_Common`."""

    patient_id: str
    study_uid: str
    study_date: str
    study_description: str
    study_id: str
    common: _Common


class SeriesInfo:
    """What the archive says about one series, normalised; immutable.

    Strings are ``""`` when unknown, never ``None``, so formatting code needs no guards.
    ``image_count`` and ``file_size`` are ``None`` when unknown: 0 is a real answer.
    ``extra`` keeps fields the alias table does not know, verbatim, only where a caller
    asked for them (search results); the download engine never keeps them. Equality and
    hash are over :data:`INFO_FIELDS` (not ``extra``).

    A 1,000,000-series download holds one per series, so it is small: the series' own
    fields, and one reference to what its study shares, which refers to what its
    collection shares (``RecordShape.infos`` makes one of each per batch): about 110
    bytes a series instead of 224 for 23 slots. Every field reads as an attribute all
    the same.
    """

    __slots__ = ("_study", "file_size", "image_count", "series_description", "series_number",
                 "series_uid")
    series_uid: str
    series_description: str
    series_number: str
    image_count: int | None
    file_size: int | None
    _study: _Study

    def __init__(self, series_uid: str, collection: str = "", patient_id: str = "",
                 study_uid: str = "", study_date: str = "", study_description: str = "",
                 study_id: str = "", series_description: str = "", series_number: str = "",
                 modality: str = "", manufacturer: str = "", body_part: str = "",
                 sop_class_uid: str = "", sop_class_name: str = "",
                 image_count: int | None = None, file_size: int | None = None,
                 license_name: str = "", license_url: str = "", third_party: str = "",
                 data_description_uri: str = "", date_released: str = "",
                 annotation_size: int | None = None,
                 extra: Mapping[str, str] | None = None) -> None:
        common = _Common(collection, modality, manufacturer, body_part, sop_class_uid,
                         sop_class_name, license_name, license_url, third_party,
                         data_description_uri, date_released, annotation_size,
                         NO_EXTRA if extra is None else extra)
        study = _Study(patient_id, study_uid, study_date, study_description, study_id, common)
        for name, value in (("series_uid", series_uid),
                            ("series_description", series_description),
                            ("series_number", series_number), ("image_count", image_count),
                            ("file_size", file_size), ("_study", study)):
            object.__setattr__(self, name, value)

    # What the study and the collection share, read through.
    @property
    def patient_id(self) -> str:
        return self._study.patient_id

    @property
    def study_uid(self) -> str:
        return self._study.study_uid

    @property
    def study_date(self) -> str:
        return self._study.study_date

    @property
    def study_description(self) -> str:
        return self._study.study_description

    @property
    def study_id(self) -> str:
        return self._study.study_id

    @property
    def collection(self) -> str:
        return self._study.common.collection

    @property
    def modality(self) -> str:
        return self._study.common.modality

    @property
    def manufacturer(self) -> str:
        return self._study.common.manufacturer

    @property
    def body_part(self) -> str:
        return self._study.common.body_part

    @property
    def sop_class_uid(self) -> str:
        return self._study.common.sop_class_uid

    @property
    def sop_class_name(self) -> str:
        return self._study.common.sop_class_name

    @property
    def license_name(self) -> str:
        return self._study.common.license_name

    @property
    def license_url(self) -> str:
        return self._study.common.license_url

    @property
    def third_party(self) -> str:
        return self._study.common.third_party

    @property
    def data_description_uri(self) -> str:
        return self._study.common.data_description_uri

    @property
    def date_released(self) -> str:
        return self._study.common.date_released

    @property
    def annotation_size(self) -> int | None:
        return self._study.common.annotation_size

    @property
    def extra(self) -> Mapping[str, str]:
        return self._study.common.extra

    # Value semantics, as a frozen dataclass has them.
    def values(self) -> tuple[object, ...]:
        """The fields' values, in :data:`INFO_FIELDS` order."""
        return _ALL_FIELDS(self)

    def to_dict(self) -> dict[str, object]:
        """Every field by name, ``extra`` as a plain dict (JSON-ready)."""
        data: dict[str, object] = dict(zip(INFO_FIELDS, self.values(), strict=True))
        data["extra"] = dict(self.extra)
        return data

    def replace(self, **changes: object) -> SeriesInfo:
        """A copy with ``changes``, of the same class (what :func:`dataclasses.replace`
        does)."""
        unknown = set(changes) - _FIELD_SET
        if unknown:
            raise TypeError(f"SeriesInfo has no field {sorted(unknown)[0]!r}")
        values: dict[str, object] = dict(zip(INFO_FIELDS, self.values(), strict=True))
        values["extra"] = self.extra
        values.update(changes)
        return type(self)(**values)  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self.values() == other.values()

    def __hash__(self) -> int:
        return hash(self.values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in
                          (*zip(INFO_FIELDS, self.values(), strict=True),
                           ("extra", self.extra)))
        return f"SeriesInfo({shown})"

    def __reduce__(self) -> tuple[type[SeriesInfo], tuple[object, ...]]:
        return type(self), (*self.values(), self.extra)

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")


_ALL_FIELDS = operator.attrgetter(*INFO_FIELDS)
_FIELD_SET = frozenset((*INFO_FIELDS, "extra"))


class _Draft:
    """A mutable twin of :class:`SeriesInfo` (the same slots) for building batches.

    ``SeriesInfo`` is immutable, so its constructor sets each slot with
    ``object.__setattr__``. A batch is built as drafts (plain slot stores) that then
    *become* ``SeriesInfo`` by ``__class__`` assignment, which CPython allows between
    classes of identical slot layout. Nobody ever holds a draft: :func:`_build_infos` is
    the only user, and everyone else sees ``SeriesInfo`` objects equal to what
    ``SeriesInfo(...)`` makes (a test says so).
    """

    __slots__ = SeriesInfo.__slots__

    def __init__(self, series_uid: str, series_description: str, series_number: str,
                 image_count: int | None, file_size: int | None, study: _Study) -> None:
        self.series_uid = series_uid
        self.series_description = series_description
        self.series_number = series_number
        self.image_count = image_count
        self.file_size = file_size
        self._study = study


def _build_infos(columns: dict[str, Iterable[object]], *, share: bool) -> list[SeriesInfo]:
    """SeriesInfo objects from columns (one iterable per field, and ``extra``).

    With ``share``, rows with equal common fields get one :class:`_Common` and rows with
    equal study fields one :class:`_Study`: the key of a row is made of the columns that
    are not :class:`_Same` (each distinct key once, looked up in C). Without, every row
    gets its own (``extra`` dicts are not hashable).
    """
    if not share:
        commons: Iterable[_Common] = map(_Common, *(columns[name] for name in _COMMON))
        studies: Iterable[_Study] = map(_Study, *(columns[name] for name in _STUDY), commons)
    else:  # (``extra`` is NO_EXTRA throughout, and a Mapping is not hashable)
        commons = _shared(_Common, [columns[name] for name in _COMMON[:-1]], NO_EXTRA)
        studies = _shared(_Study, [*(columns[name] for name in _STUDY), commons])
    infos = list(map(_Draft, *(columns[name] for name in _OWN), studies))
    for info in infos:
        info.__class__ = SeriesInfo  # type: ignore[assignment]
    return infos  # type: ignore[return-value]


_T = TypeVar("_T")


def _shared(make: Callable[..., _T], columns: list[Iterable[object]],
            *last: object) -> Iterable[_T]:
    """``map(make, *columns, ...)`` (``last`` appended to every call), one object per
    distinct row; all columns one value throughout (:class:`_Same`) make one object."""
    if all(isinstance(c, _Same) for c in columns):
        count = columns[0].count  # type: ignore[attr-defined]
        return _Same(make(*(c.value for c in columns), *last), count)  # type: ignore[attr-defined, return-value]
    keys = list(zip(*columns, strict=True))
    made = {key: make(*key, *last) for key in dict.fromkeys(keys)}
    return map(made.__getitem__, keys)


_INT_FIELDS = frozenset({"image_count", "file_size", "annotation_size"})
_STR_FIELDS = frozenset(INFO_FIELDS) - _INT_FIELDS


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


class _Same:
    """A column whose every cell is ``value`` (a batch has one collection, one licence):
    known without reading it, so :func:`_build_infos` shares it without a key per row."""

    __slots__ = ("count", "value")

    def __init__(self, value: object, count: int) -> None:
        self.value, self.count = value, count

    def __iter__(self) -> Iterator[object]:
        return repeat(self.value, self.count)


def _text_column(column: Sequence[object], canon: str) -> list[str] | _Same:
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
    if len(table) == 1:
        return _Same(table[distinct[0]], len(column))
    return list(map(table.__getitem__, column))


def _int_column(column: Sequence[object]) -> list[int | None] | _Same:
    table = {v: _to_int(v) for v in dict.fromkeys(column)}
    if len(table) == 1:
        return _Same(next(iter(table.values())), len(column))
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
            return info.replace(series_uid=plain(series_uid).strip())
        return info

    def infos(self, rows: Sequence[Sequence[object]], *,
              known: Mapping[str, str] | None = None) -> list[SeriesInfo]:
        """Many rows at once; short rows read as empty cells, long ones lose the excess.

        ``known`` maps series UIDs the caller already holds to themselves (the UIDs a
        batch asked for, from the manifest): a row's UID equal to one of them *is* that
        string object, so a 1,000,000-series download holds each UID once, not twice
        (100 MB), without interning them all (another 40 MB for the interned table).
        """
        if not rows:
            return []
        width = len(self.names)
        if set(map(len, rows)) != {width}:
            rows = [[*r[:width], *([None] * (width - len(r)))] for r in rows]
        # The columns this shape reads, and no others (a v4 answer has 40, we use 20).
        used = sorted({i for indexes in self._columns.values() for i in indexes}
                      | (set(self._extra) if self._keep_extra else set()))
        table: dict[int, Sequence[object]] = {}
        if len(used) > 1:
            table = dict(zip(used, zip(*map(operator.itemgetter(*used), rows), strict=True),
                             strict=True))
        elif used:
            table = {used[0]: [row[used[0]] for row in rows]}
        count = len(rows)
        values: dict[str, Iterable[object]] = {}
        for canon in INFO_FIELDS:
            indexes = self._columns.get(canon)
            if not indexes:
                values[canon] = _Same(None if canon in _INT_FIELDS else "", count)
                continue
            if canon in _INT_FIELDS:
                ints = [_int_column(table[i]) for i in indexes]
                values[canon] = (ints[0] if len(ints) == 1 else
                                 [next((n for n in c if n is not None), None)
                                  for c in zip(*ints, strict=True)])
            else:
                texts = [_text_column(table[i], canon) for i in indexes]
                # Several columns carrying one field: the first non-empty one wins.
                column = (texts[0] if len(texts) == 1 else
                          [next((t for t in c if t), "") for c in zip(*texts, strict=True)])
                if known is not None and canon == "series_uid":
                    column = list(map(known.get, column, column))  # type: ignore[arg-type]
                values[canon] = column
        if self._keep_extra and self._extra:
            names = [self.names[i] for i in self._extra]
            cleaned = [_text_column(table[i], "") for i in self._extra]
            values["extra"] = [dict(zip(names, c, strict=True))
                               for c in zip(*cleaned, strict=True)]
            return _build_infos(values, share=False)
        values["extra"] = _Same(NO_EXTRA, count)
        return _build_infos(values, share=True)


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


# -- files that are not NBIA series (issue 24: CRDC/Gen3 DRS objects, PathDB slides) --------

#: Where a bare DRS id (``dg.4DFC/<uuid>``, no ``drs://HOST/``) lives: the Go retriever
#: and tcia_utils both prepend this host.
DEFAULT_DRS_HOST = "nci-crdc.datacommons.io"


def is_file_uid(uid: str) -> bool:
    """True for the key of a :class:`FileItem` that is a plain file (a ``drs://`` URI or
    an ``https://`` URL): a DICOM UID holds only digits and dots, so a ``:`` can never
    make one of those look like a file, nor a file like a series.

    >>> is_file_uid("1.3.6.1.4.1.9328.50.1.2"), is_file_uid("drs://h/dg.4DFC/x")
    (False, True)
    """
    return ":" in uid


@dataclass(frozen=True, slots=True)
class FileItem:
    """One row of a DRS or PathDB manifest: a file to fetch by URL, not a series to ask an
    NBIA server for.

    ``kind`` is ``"drs"`` (``uri`` is ``drs://HOST/<object id>``, normalised: a bare id
    gets :data:`DEFAULT_DRS_HOST`) or ``"url"`` (``uri`` is the PathDB ``imageUrl``, an
    ``http(s)://`` URL). ``key`` is what the engine and the journal call the item: the
    row's SeriesInstanceUID when the file is a DICOM series zip (``<UID>.zip``, as General
    Commons names TCIA's series; the item is then published as that series), else
    ``uri`` itself (see :func:`is_file_uid`). Strings are ``""`` when the sheet has no
    such column; ``size`` and ``md5`` are None when it does not give them (PathDB never
    does). Every string is the sheet's, untrusted: layout and naming sanitise them.
    """

    kind: str
    uri: str
    key: str
    #: The file's name as the sheet gives it (``name``/``filename``), else the URI's last
    #: path segment.
    name: str
    collection: str = ""
    patient_id: str = ""
    study_uid: str = ""
    study_date: str = ""
    study_description: str = ""
    modality: str = ""
    size: int | None = None
    md5: str | None = None
    #: 1-based line (or spreadsheet row) the item came from, for messages.
    line: int = 0

    @property
    def host(self) -> str:
        """The DRS host (``drs://HOST/...``) or the URL's host, lower-case."""
        rest = self.uri.partition("://")[2]
        return rest.partition("/")[0].rpartition("@")[2].lower()

    @property
    def object_id(self) -> str:
        """A DRS object's id (``dg.4DFC/<uuid>``: the URI's path without its leading
        ``/``); ``""`` for a URL."""
        if self.kind != "drs":
            return ""
        return self.uri.partition("://")[2].partition("/")[2]

    @property
    def is_series(self) -> bool:
        """A DICOM series zip, published as a series (its key is its UID)."""
        return not is_file_uid(self.key)
