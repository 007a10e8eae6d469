"""SeriesInfo keeps the value semantics of a frozen record while sharing what series have
in common (their study's fields, their collection's), and batches built column-wise by
RecordShape are the same values as records built one by one."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbia_retriever.models import (
    INFO_FIELDS,
    NO_EXTRA,
    RecordShape,
    SeriesInfo,
    normalise_series_metadata,
)

_TEXT = st.sampled_from(["", "CT", "ct ", "NLST", "1.2.840.1", "x" * 210, "P\x1b[31m1", " a "])
_COUNT = st.sampled_from(["", "0", "12", "1.2E3", "-1", "x", None])
_NAMES = ["SeriesInstanceUID", "Collection", "PatientID", "StudyInstanceUID", "StudyDate",
          "StudyDesc", "StudyID", "SeriesDescription", "SeriesNumber", "Modality",
          "Manufacturer", "BodyPartExamined", "ImageCount", "FileSize", "LicenseName",
          "Project", "Unknown Column"]


def _row() -> st.SearchStrategy[list[object]]:
    return st.lists(_TEXT | _COUNT, min_size=len(_NAMES), max_size=len(_NAMES))


@settings(max_examples=300, deadline=None)
@given(st.lists(_row(), max_size=8), st.booleans())
def test_a_batch_is_the_records_one_by_one(rows: list[list[object]], extra: bool) -> None:
    """Column-wise, shared, or one at a time: equal values, field by field."""
    shape = RecordShape(_NAMES, keep_extra=extra)
    batch = shape.infos(rows)
    single = [shape.infos([row])[0] for row in rows]
    by_record = [normalise_series_metadata(dict(zip(_NAMES, row, strict=True)),
                                           keep_extra=extra) for row in rows]
    assert batch == single == by_record
    for a, b in zip(batch, by_record, strict=True):
        assert type(a) is SeriesInfo
        assert a.values() == b.values() and dict(a.extra) == dict(b.extra)
        assert hash(a) == hash(b)


def test_series_of_one_study_share_its_record() -> None:
    header = ["SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Collection"]
    rows = [["1.1", "9.1", "P", "C"], ["1.2", "9.1", "P", "C"], ["1.3", "9.2", "P", "C"]]
    a, b, c = RecordShape(header).infos(rows)
    assert a._study is b._study and a._study is not c._study
    assert a._study.common is c._study.common
    assert (a.study_uid, c.study_uid, c.collection) == ("9.1", "9.2", "C")


def test_known_uids_are_shared_not_copied() -> None:
    uid = "".join(["1.2.", "3"])  # a string object of its own
    (info,) = RecordShape(["SeriesInstanceUID"]).infos([["1.2.3"]], known={uid: uid})
    assert info.series_uid is uid


def test_it_behaves_like_a_frozen_dataclass() -> None:
    info = SeriesInfo("1.2.3", collection="C", patient_id="P", image_count=3,
                      extra={"k": "v"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.collection = "D"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.series_uid = "1"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del info.file_size
    assert info == SeriesInfo("1.2.3", collection="C", patient_id="P", image_count=3)
    assert info != SeriesInfo("1.2.3", collection="C", patient_id="Q", image_count=3)
    assert info != ("1.2.3",) and info.extra == {"k": "v"}
    assert {info, SeriesInfo("1.2.3", collection="C", patient_id="P", image_count=3)} == {info}
    for clone in (pickle.loads(pickle.dumps(info)), copy.copy(info), copy.deepcopy(info)):
        assert clone == info and dict(clone.extra) == {"k": "v"}
    moved = info.replace(patient_id="Q", file_size=9)
    assert (moved.patient_id, moved.file_size, moved.collection, info.patient_id) == \
        ("Q", 9, "C", "P")
    with pytest.raises(TypeError):
        info.replace(colection="typo")
    assert repr(SeriesInfo("1.2")).startswith("SeriesInfo(series_uid='1.2', collection='', ")
    assert repr(SeriesInfo("1.2")).endswith(", annotation_size=None, extra={})")
    assert list(info.to_dict()) == [*INFO_FIELDS, "extra"]
    assert SeriesInfo("1").extra is NO_EXTRA


def test_a_subclass_keeps_its_class() -> None:
    class Mine(SeriesInfo):
        __slots__ = ()

    mine = Mine("1.2", collection="C")
    assert mine == Mine("1.2", collection="C") and mine != SeriesInfo("1.2", collection="C")
    assert type(mine.replace(collection="D")) is Mine
    assert type(copy.copy(mine)) is Mine
