"""Turning API answers into records: JSON arrays, CSV tables, empty bodies.

NBIA answers "no results" with 200 and an empty body (not ``[]``), sends 204 for an
unknown series, CSV with a header row from v4 batch metadata, and, when something
breaks, HTML error pages with status 200. A hostile server can also send JSON nested a
million levels deep (Python's parser gives up with ``RecursionError``) or a "JSON"
whose records are not objects: all of that is an :class:`ApiError` here, never an
exception that escapes a worker thread.
"""

from __future__ import annotations

import csv
import io
import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import ApiError
from ..models import RecordShape, SeriesInfo, normalise_records
from .http import Answer

#: CSV fields larger than this are refused (csv's own default is 128 KiB).
_CSV_FIELD_LIMIT = 1 << 20


def _looks_html(text: str) -> bool:
    head = text[:500].lower()
    return "<html" in head or "<!doctype html" in head


def json_records(answer: Answer, what: str) -> list[dict[str, Any]]:
    """Objects of a JSON array (or one object); malformed or hostile JSON is ApiError."""
    try:
        data = json.loads(answer.body)
    except RecursionError:
        raise ApiError(f"{what}: the JSON answer is nested too deeply") from None
    except ValueError:
        raise ApiError(f"{what}: malformed JSON") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return []
    return [d for d in data if isinstance(d, dict)]


def csv_table(text: str, what: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV answer."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    try:
        rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"), newline="")))
    except csv.Error as exc:
        raise ApiError(f"{what}: malformed CSV ({exc})") from None
    rows = [r for r in rows if r]
    if not rows:
        return [], []
    return rows[0], rows[1:]


def records(answer: Answer, what: str) -> list[dict[str, Any]]:
    """Records from a JSON array/object or CSV body; empty body and 204 give none."""
    if answer.status == 204 or not answer.body.strip():
        return []
    text = answer.text
    stripped = text.lstrip()
    if stripped[:1] in "[{":
        return json_records(answer, what)
    if _looks_html(stripped):
        raise ApiError(f"{what}: the server sent an HTML page, not data")
    header, rows = csv_table(text, what)
    return [dict(zip(header, row, strict=False)) for row in rows]


def series_infos(answer: Answer, what: str, *, keep_extra: bool = False,
                 known: Mapping[str, str] | None = None) -> list[SeriesInfo]:
    """Normalised series records of any answer shape, the fast way for CSV tables
    (``known``: see :meth:`RecordShape.infos`)."""
    if answer.status == 204 or not answer.body.strip():
        return []
    text = answer.text
    stripped = text.lstrip()
    if stripped[:1] in "[{":
        return normalise_records(json_records(answer, what), keep_extra=keep_extra)
    if _looks_html(stripped):
        raise ApiError(f"{what}: the server sent an HTML page, not data")
    header, rows = csv_table(text, what)
    if not header:
        return []
    shape = RecordShape(header, keep_extra=keep_extra)
    if "Authorized" in header:
        # Builds of mid-2025 also send rows of series the user may not see, marked 0.
        col = header.index("Authorized")
        rows = [r for r in rows if col >= len(r) or r[col].strip() != "0"]
    return shape.infos(rows, known=known)


def infos_by_uid(infos: Sequence[SeriesInfo],
                 wanted: Mapping[str, object]) -> dict[str, SeriesInfo]:
    """The records of the series asked for (``wanted``), by UID (the last one wins);
    others a server adds are dropped. One C-level pass when there are none (nearly
    always)."""
    found = dict(zip(map(_UID, infos), infos, strict=True))
    if not found.keys() <= wanted.keys():
        found = {uid: info for uid, info in found.items() if uid in wanted}
    return found


_UID = operator.attrgetter("series_uid")


def first_of(infos: Iterable[SeriesInfo], uid: str) -> SeriesInfo | None:
    for info in infos:
        if info.series_uid == uid:
            return info
    return None


def select(infos: Sequence[SeriesInfo], wanted: set[str]) -> dict[str, SeriesInfo]:
    return {i.series_uid: i for i in infos if i.series_uid in wanted}
