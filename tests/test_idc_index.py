"""The IDC index (``nbia_retriever.idc.index``): small parquet files written here with
duckdb in idc-index-data's column names and types, read through the real child process;
plus one lookup in the installed idc-index-data (skipped when it is not installed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

duckdb = pytest.importorskip("duckdb")

from nbia_retriever.errors import NbiaError  # noqa: E402
from nbia_retriever.idc.index import (  # noqa: E402
    IdcIndex,
    IdcSeries,
    IndexUnavailable,
    license_of,
    resolve_manifest,
)
from nbia_retriever.manifest import parse_manifest  # noqa: E402

# idc-index-data's *_schema.json (25.0.5), column -> duckdb type (STRING, INTEGER, FLOAT).
IDC_INDEX = {
    "collection_id": "VARCHAR", "analysis_result_id": "VARCHAR", "PatientID": "VARCHAR",
    "SeriesInstanceUID": "VARCHAR", "StudyInstanceUID": "VARCHAR", "source_DOI": "VARCHAR",
    "PatientAge": "VARCHAR", "PatientSex": "VARCHAR", "StudyDate": "VARCHAR",
    "StudyDescription": "VARCHAR", "BodyPartExamined": "VARCHAR", "Modality": "VARCHAR",
    "SOPClassUID": "VARCHAR", "sop_class_name": "VARCHAR", "TransferSyntaxUID": "VARCHAR",
    "transfer_syntax_name": "VARCHAR", "PhotometricInterpretation": "VARCHAR",
    "PixelRepresentation": "VARCHAR", "Manufacturer": "VARCHAR",
    "ManufacturerModelName": "VARCHAR", "SeriesDate": "VARCHAR", "SeriesDescription": "VARCHAR",
    "SeriesNumber": "VARCHAR", "instanceCount": "BIGINT", "license_short_name": "VARCHAR",
    "series_init_idc_version": "BIGINT", "series_revised_idc_version": "BIGINT",
    "aws_bucket": "VARCHAR", "crdc_series_uuid": "VARCHAR", "series_aws_url": "VARCHAR",
    "series_size_MB": "DOUBLE",
}
COLLECTIONS_INDEX = {
    "collection_name": "VARCHAR", "collection_id": "VARCHAR", "cancer_types": "VARCHAR",
    "tumor_locations": "VARCHAR", "subjects": "BIGINT", "species": "VARCHAR",
    "sources": "STRUCT(source_id VARCHAR, source_title VARCHAR)[]",
    "supporting_data": "VARCHAR", "program_id": "VARCHAR", "status": "VARCHAR",
    "updated": "VARCHAR", "description": "VARCHAR",
}
PRIOR_VERSIONS_INDEX = {
    "collection_id": "VARCHAR", "PatientID": "VARCHAR", "SeriesInstanceUID": "VARCHAR",
    "StudyInstanceUID": "VARCHAR", "Modality": "VARCHAR", "gcs_bucket": "VARCHAR",
    "crdc_series_uuid": "VARCHAR", "series_size_MB": "DOUBLE", "series_aws_url": "VARCHAR",
    "aws_bucket": "VARCHAR", "min_idc_version": "BIGINT", "max_idc_version": "BIGINT",
}
VERSION_METADATA_INDEX = {"idc_version": "BIGINT", "version_timestamp": "VARCHAR"}


def write_table(path: Path, schema: Mapping[str, str], rows: Sequence[Mapping[str, Any]],
                ) -> None:
    """A parquet file with exactly ``schema``'s columns; absent values are NULL."""
    con = duckdb.connect()
    columns = ", ".join(f'"{name}" {kind}' for name, kind in schema.items())
    con.execute(f"CREATE TABLE t ({columns})")
    if rows:
        marks = ", ".join("?" for _ in schema)
        con.executemany(f"INSERT INTO t VALUES ({marks})",
                        [[row.get(name) for name in schema] for row in rows])
    con.table("t").write_parquet(str(path))
    con.close()


def uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{n}"


def uuid_of(text: str) -> str:
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, text))


def current_row(n: int, **extra: Any) -> dict[str, Any]:
    series = uid(n)
    row = {
        "collection_id": "lidc_idri", "PatientID": f"LIDC-IDRI-{n:04d}",
        "SeriesInstanceUID": series, "StudyInstanceUID": uid(1000 + n),
        "source_DOI": "10.7937/K9/TCIA.2015.LO9QL9SX", "StudyDate": "2000-01-31",
        "StudyDescription": "Chest", "Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "sop_class_name": "CT Image Storage", "Manufacturer": "GE MEDICAL SYSTEMS",
        "BodyPartExamined": "CHEST", "SeriesDescription": f"Series {n}", "SeriesNumber": "3",
        "instanceCount": 10 + n, "license_short_name": "CC BY 3.0",
        "series_init_idc_version": 2, "series_revised_idc_version": 22,
        "aws_bucket": "idc-open-data", "crdc_series_uuid": uuid_of(f"series:{series}"),
        "series_size_MB": 5.25,
    }
    row["series_aws_url"] = f"s3://{row['aws_bucket']}/{row['crdc_series_uuid']}/*"
    row.update(extra)
    return row


def prior_row(n: int, version_tag: str, first: int, last: int, **extra: Any) -> dict[str, Any]:
    series = uid(n)
    row = {
        "collection_id": "lidc_idri", "PatientID": f"LIDC-IDRI-{n:04d}",
        "SeriesInstanceUID": series, "StudyInstanceUID": uid(1000 + n), "Modality": "CT",
        "gcs_bucket": "public-datasets-idc", "crdc_series_uuid": uuid_of(version_tag),
        "series_size_MB": 1.5, "aws_bucket": "idc-open-data",
        "min_idc_version": first, "max_idc_version": last,
    }
    row["series_aws_url"] = f"s3://{row['aws_bucket']}/{row['crdc_series_uuid']}/*"
    row.update(extra)
    return row


COLLECTIONS = [{"collection_id": "lidc_idri", "collection_name": "LIDC-IDRI",
                "sources": [{"source_id": "x", "source_title": "y"}]},
               {"collection_id": "other", "collection_name": "Other-Coll"}]


def make_index(folder: Path, current: Sequence[Mapping[str, Any]] = (),
               prior: Sequence[Mapping[str, Any]] = (), *, version: int | None = 22,
               collections: Sequence[Mapping[str, Any]] = COLLECTIONS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_table(folder / "idc_index.parquet", IDC_INDEX, current)
    write_table(folder / "collections_index.parquet", COLLECTIONS_INDEX, collections)
    write_table(folder / "prior_versions_index.parquet", PRIOR_VERSIONS_INDEX, prior)
    if version is not None:
        write_table(folder / "version_metadata_index.parquet", VERSION_METADATA_INDEX,
                    [{"idc_version": v, "version_timestamp": "2025-01-01"}
                     for v in range(1, version + 1)])
    return folder


@pytest.fixture
def standard(tmp_path: Path) -> Path:
    """Series 1-3 current; 2 revised (an older version in prior); 4 removed (two
    versions in prior, the later one on two rows: it moved buckets)."""
    return make_index(
        tmp_path / "index",
        current=[current_row(1), current_row(2, series_revised_idc_version=20),
                 current_row(3, collection_id="other", license_short_name="CC BY-NC 4.0",
                             StudyDate="20010503", series_size_MB=None)],
        prior=[prior_row(2, "2-old", 1, 19),
               prior_row(4, "4-v1", 1, 9),
               prior_row(4, "4-v2", 10, 14, aws_bucket="idc-open-data"),
               prior_row(4, "4-v2", 15, 18, aws_bucket="idc-open-data-two",
                         gcs_bucket="idc-open-idc1")],
    )


# ----------------------------------------------------------------------------- lookups


def test_current_series_and_its_nbia_shaped_info(standard: Path) -> None:
    index = IdcIndex.open(standard)
    assert index.version == 22
    found = index.by_series_uid([uid(1), uid(3), uid(99), "not a uid"])
    assert set(found) == {uid(1), uid(3)}
    one = found[uid(1)]
    assert (one.current, one.version, one.bucket, one.instance_count) == (True, 22,
                                                                          "idc-open-data", 11)
    assert one.crdc_series_uuid == uuid_of(f"series:{uid(1)}")
    assert one.url == f"s3://idc-open-data/{one.crdc_series_uuid}/*"
    info = one.info()
    assert (info.series_uid, info.collection, info.patient_id) == (uid(1), "LIDC-IDRI",
                                                                   "LIDC-IDRI-0001")
    assert (info.study_date, info.series_number, info.modality) == ("01-31-2000", "3", "CT")
    assert (info.image_count, info.file_size) == (11, 5_250_000)
    assert info.license_name == "Creative Commons Attribution 3.0 Unported License"
    assert info.license_url == "https://creativecommons.org/licenses/by/3.0/"
    assert info.data_description_uri == "https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX"
    assert (info.manufacturer, info.sop_class_name) == ("GE MEDICAL SYSTEMS", "CT Image Storage")
    three = found[uid(3)].info()
    assert (three.collection, three.study_date, three.file_size) == ("Other-Coll",
                                                                     "05-03-2001", None)
    assert three.license_url == "https://creativecommons.org/licenses/by-nc/4.0/"


def test_a_bare_uid_is_the_current_version_even_when_revised(standard: Path) -> None:
    found = IdcIndex.open(standard).by_series_uid([uid(2)])
    assert found[uid(2)].current
    assert found[uid(2)].crdc_series_uuid == uuid_of(f"series:{uid(2)}")
    assert found[uid(2)].version == 20


def test_a_removed_series_is_its_last_version(standard: Path) -> None:
    removed = IdcIndex.open(standard).by_series_uid([uid(4)])[uid(4)]
    assert (removed.current, removed.crdc_series_uuid) == (False, uuid_of("4-v2"))
    assert (removed.version, removed.bucket) == (18, "idc-open-data-two")  # where it moved
    assert (removed.instance_count, removed.size_bytes) == (None, 1_500_000)
    assert removed.collection == "LIDC-IDRI"


def test_by_crdc_uuid_current_and_prior(standard: Path) -> None:
    index = IdcIndex.open(standard)
    wanted = [uuid_of(f"series:{uid(1)}"), uuid_of("2-old"), uuid_of("4-v1"),
              uuid_of("nowhere"), "NOT-A-UUID"]
    found = index.by_crdc_uuid(wanted)
    assert set(found) == set(wanted[:3])
    assert found[wanted[0]].current and found[wanted[0]].series_uid == uid(1)
    old = found[wanted[1]]
    assert (old.current, old.series_uid, old.version, old.instance_count) == (False, uid(2),
                                                                              19, None)
    # the old version takes the series' current metadata: it lands in the same folder
    assert (old.series_description, old.study_date) == ("Series 2", "2000-01-31")
    assert old.size_bytes == 1_500_000  # but its own size
    assert found[wanted[2]].version == 9 and found[wanted[2]].series_description == ""


def test_license_names() -> None:
    assert license_of("CC BY 4.0") == ("Creative Commons Attribution 4.0 International "
                                       "License", "https://creativecommons.org/licenses/by/4.0/")
    assert license_of("CC BY-NC-ND 3.0") == (
        "Creative Commons Attribution-NonCommercial-NoDerivs 3.0 Unported License",
        "https://creativecommons.org/licenses/by-nc-nd/3.0/")
    nlm = "National Library of Medicine Terms and Conditions; May 21, 2019"
    assert license_of(nlm)[0] == nlm and license_of(nlm)[1].startswith("https://www.nlm.nih")
    assert license_of("TCIA Restricted") == ("TCIA Restricted", "")


# ----------------------------------------------------------------------------- untrusted


def test_rows_that_are_not_plainly_shaped_are_skipped_and_counted(tmp_path: Path) -> None:
    folder = make_index(tmp_path / "bad", current=[
        current_row(1, aws_bucket="evil.example/x?y="),
        current_row(2, crdc_series_uuid="../../etc"),
        current_row(3, crdc_series_uuid=uuid_of("3").upper()),
        current_row(4, instanceCount=None),
        current_row(5, aws_bucket="ab"),
        current_row(6, StudyDescription="CT\x1b[2J chest\x00", PatientID="P\u202e6"),
    ], prior=[prior_row(7, "7", 1, 3, aws_bucket="Bad_Bucket")])
    index = IdcIndex.open(folder)
    found = index.by_series_uid([uid(n) for n in range(1, 8)])
    assert set(found) == {uid(6)}
    assert found[uid(6)].study_description == "CT[2J chest"
    assert found[uid(6)].patient_id == "P6"
    assert index.rejected == 6
    assert any("aws_bucket 'evil.example/x?y=' is not a bucket name" in r
               for r in index.reasons)
    assert all("\n" not in r and "\x1b" not in r for r in index.reasons)
    assert all(r.startswith(str(folder)) for r in index.reasons)


def test_huge_text_is_cut_in_the_child(tmp_path: Path) -> None:
    folder = make_index(tmp_path / "big", current=[current_row(1, SeriesDescription="x" * 200_000)])
    series = IdcIndex.open(folder).by_series_uid([uid(1)])[uid(1)]
    assert series.series_description == "x" * 1024


def test_a_uuid_row_must_hold_a_uid(tmp_path: Path) -> None:
    folder = make_index(tmp_path / "bad", current=[
        current_row(1, SeriesInstanceUID="../../x", crdc_series_uuid=uuid_of("a"))])
    index = IdcIndex.open(folder)
    assert index.by_crdc_uuid([uuid_of("a")]) == {}
    assert index.rejected == 1 and "not a DICOM UID" in index.reasons[0]


def test_odd_folder_names_are_parameters_not_sql(tmp_path: Path) -> None:
    folder = make_index(tmp_path / "o'brien\"; DROP TABLE x; --", current=[current_row(1)])
    assert set(IdcIndex.open(folder).by_series_uid([uid(1)])) == {uid(1)}


@pytest.mark.parametrize("name", ["idc_index.parquet", "collections_index.parquet",
                                  "prior_versions_index.parquet"])
def test_a_missing_file_is_one_line(tmp_path: Path, name: str) -> None:
    folder = make_index(tmp_path / "i", current=[current_row(1)])
    (folder / name).unlink()
    with pytest.raises(IndexUnavailable) as info:
        IdcIndex.open(folder)
    assert str(info.value).startswith(f"{folder / name}: missing")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, NbiaError)


def test_a_missing_column_names_the_file_and_column(tmp_path: Path) -> None:
    folder = tmp_path / "i"
    make_index(folder, current=[current_row(1)])
    schema = {k: v for k, v in IDC_INDEX.items() if k != "crdc_series_uuid"}
    write_table(folder / "idc_index.parquet", schema, [current_row(1)])
    with pytest.raises(IndexUnavailable) as info:
        IdcIndex.open(folder)
    assert str(info.value) == (f"{folder / 'idc_index.parquet'}: no column 'crdc_series_uuid' "
                               "(not an idc-index-data index file?)")


def test_a_file_that_is_not_parquet(tmp_path: Path) -> None:
    folder = make_index(tmp_path / "i", current=[current_row(1)])
    (folder / "prior_versions_index.parquet").write_bytes(b"<html>not found</html>\n" * 20)
    with pytest.raises(IndexUnavailable) as info:
        IdcIndex.open(folder)
    message = str(info.value)
    assert message.startswith(f"{folder / 'prior_versions_index.parquet'}: ")
    assert "\n" not in message


def test_no_folder_and_no_version_file(tmp_path: Path) -> None:
    with pytest.raises(IndexUnavailable, match="not a folder"):
        IdcIndex.open(tmp_path / "nowhere")
    folder = make_index(tmp_path / "i", current=[current_row(1)], version=None)
    assert IdcIndex.open(folder).version is None


def test_without_duckdb(standard: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "duckdb", None)  # as if not installed
    with pytest.raises(IndexUnavailable, match=r"needs duckdb \(pip install "):
        IdcIndex.open(standard)


def test_optional_columns_may_be_absent(tmp_path: Path) -> None:
    folder = tmp_path / "i"
    make_index(folder)
    schema = {k: v for k, v in IDC_INDEX.items()
              if k not in ("Manufacturer", "source_DOI", "sop_class_name")}
    write_table(folder / "idc_index.parquet", schema, [current_row(1)])
    info = IdcIndex.open(folder).by_series_uid([uid(1)])[uid(1)].info()
    assert (info.manufacturer, info.data_description_uri, info.sop_class_name) == ("", "", "")
    assert info.image_count == 11


def test_the_parent_never_imports_duckdb(standard: Path) -> None:
    code = ("import sys; from pathlib import Path; from nbia_retriever.idc.index import IdcIndex;"
            f"i = IdcIndex.open(Path({str(standard)!r}));"
            f"print(len(i.by_series_uid([{uid(1)!r}])), 'duckdb' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["1", "False"]


def test_the_child_answers_a_bad_request_in_one_line(standard: Path) -> None:
    out = subprocess.run([sys.executable, "-P", "-m", "nbia_retriever.idc._lookup"],
                         input=b"{not json", capture_output=True, check=True)
    assert json.loads(out.stdout)["error"].startswith("bad request")
    files = {name: str(standard / f"{name}.parquet")
             for name in ("idc_index", "collections_index", "prior_versions_index")}
    request = {"op": "series", "files": files,
               "current": {'x"; DROP': "str"}, "prior": {}, "keys": []}
    out = subprocess.run([sys.executable, "-P", "-m", "nbia_retriever.idc._lookup"],
                         input=json.dumps(request).encode(), capture_output=True, check=True)
    assert "bad column request" in json.loads(out.stdout)["error"]


# ----------------------------------------------------------------------------- manifests


def test_resolve_an_s5cmd_manifest(standard: Path) -> None:
    index = IdcIndex.open(standard)
    text = "\n".join([
        "# IDC portal manifest",
        f"cp s3://idc-open-data/{uuid_of('2-old')}/* .",             # uid 2, old version
        f"cp s3://idc-open-data/{uuid_of(f'series:{uid(1)}')}/* .",   # uid 1, current
        f"cp s3://idc-open-data/{uuid_of('nowhere')}/* .",            # unknown
        f"cp s3://idc-open-data/{uuid_of(f'series:{uid(2)}')}/* .",   # uid 2 again: dropped
        uid(3),                                                       # a bare UID
    ])
    manifest = parse_manifest(text, source="cohort.s5cmd")
    resolved = resolve_manifest(manifest, index)
    assert resolved.uids == [uid(2), uid(1), uid(3)]
    assert set(resolved.pinned) == {uid(2), uid(1)}
    assert not resolved.pinned[uid(2)].current
    assert resolved.pinned[uid(2)].crdc_series_uuid == uuid_of("2-old")
    assert resolved.unknown == [uuid_of("nowhere")]
    assert resolved.dropped == [uuid_of(f"series:{uid(2)}")]


def test_other_manifests_do_not_read_the_index(tmp_path: Path) -> None:
    folder = make_index(tmp_path / "i", current=[current_row(1)])
    index = IdcIndex.open(folder)
    for path in folder.iterdir():
        path.unlink()  # any read would now fail
    manifest = parse_manifest(f"ListOfSeriesToDownload=\n{uid(1)}\n{uid(2)}\n")
    resolved = resolve_manifest(manifest, index)
    assert (resolved.uids, resolved.pinned, resolved.unknown) == ([uid(1), uid(2)], {}, [])


# ----------------------------------------------------------------------------- the real index


def _installed_schema(name: str) -> list[str] | None:
    spec = importlib.util.find_spec("idc_index_data")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / f"{name}_schema.json"
    return [c["name"] for c in json.loads(path.read_text())["columns"]]


real = pytest.mark.skipif(importlib.util.find_spec("idc_index_data") is None,
                          reason="idc-index-data is not installed")


@real
def test_the_schemas_here_are_idc_index_datas() -> None:
    for name, schema in (("idc_index", IDC_INDEX), ("collections_index", COLLECTIONS_INDEX),
                         ("prior_versions_index", PRIOR_VERSIONS_INDEX),
                         ("version_metadata_index", VERSION_METADATA_INDEX)):
        assert set(_installed_schema(name) or ()) >= set(schema) - {"sources"}, name


#: Series of 4D-Lung, with the uuid of their version in IDC v2-v25 (a later release may
#: revise them: the uuid then names a prior version, which still resolves).
KNOWN = {
    "1.3.6.1.4.1.14519.5.2.1.6834.5010.155488857019753544209698582121":
        "085e85b3-3780-47f6-8538-585bcca95336",
    "1.3.6.1.4.1.14519.5.2.1.6834.5010.237212468600614955862231738999":
        "f9917c52-a74e-4cc8-8c2a-4df77e82a19c",
}


@real
def test_the_installed_index_finds_known_series() -> None:
    index = IdcIndex.open(None)
    assert index.version is not None and index.version >= 20
    found = index.by_series_uid(KNOWN)
    assert set(found) == set(KNOWN)
    for series in found.values():
        assert isinstance(series, IdcSeries) and series.current
        assert series.collection == "4D-Lung" and series.bucket.startswith("idc-open-data")
        assert series.instance_count is not None and series.instance_count > 0
        info = series.info()
        assert info.license_name.startswith("Creative Commons") and info.study_date
    back = index.by_crdc_uuid(KNOWN.values())
    assert {crdc: s.series_uid for crdc, s in back.items()} == {v: k for k, v in KNOWN.items()}
    assert index.rejected == 0


def test_one_child_answers_the_opening_and_the_lookups_and_a_gone_one_is_replaced(
        standard: Path) -> None:
    """Python and duckdb start once for a run's index work (the opening's column check,
    then its lookups); a child that ended meanwhile (idle, or killed) is replaced and
    the lookup answers the same."""
    index = IdcIndex.open(standard)
    child = index._reader._child
    assert child is not None and child.poll() is None
    assert set(index.by_series_uid([uid(1), uid(2)])) == {uid(1), uid(2)}
    assert set(index.by_crdc_uuid([uuid_of("2-old")])) == {uuid_of("2-old")}
    assert index._reader._child is child  # the same process answered all three
    child.kill()
    child.wait()
    assert set(index.by_series_uid([uid(3)])) == {uid(3)}
    second = index._reader._child
    assert second is not None and second is not child
    index.release()  # a run's index work is done: the child's memory goes now
    assert second.poll() is not None and index._reader._child is None
    assert set(index.by_series_uid([uid(1)])) == {uid(1)}  # after release(): a new one
    index.release()


def test_the_child_ends_when_its_parent_closes_the_pipe(standard: Path) -> None:
    index = IdcIndex.open(standard)
    child = index._reader._child
    assert child is not None and child.stdin is not None
    child.stdin.close()  # what the parent's exit does
    assert child.wait(timeout=60) == 0
