"""Every real manifest in ``../shared/real-manifests`` (files from public repositories, byte
for byte) reads as its ``INDEX.tsv`` says: the same number of series a correct reader finds
(the Java retriever's rule for ``.tcia``), IDC series folders for ``.s5cmd``, the files of
CRDC/Gen3 DRS and PathDB sheets, and a clear one-line error for files that are no manifest
at all.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from nbia_retriever.errors import ManifestError
from nbia_retriever.manifest import read_manifest

FOLDER = Path(__file__).resolve().parents[2] / "shared" / "real-manifests"


def _rows() -> list[dict[str, str]]:
    index = FOLDER / "INDEX.tsv"
    if not index.is_file():
        return []
    with index.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


ROWS = _rows()
pytestmark = pytest.mark.skipif(not ROWS, reason=f"no real manifests at {FOLDER}")


def test_the_index_lists_every_file() -> None:
    on_disk = {p.name for p in FOLDER.iterdir()} - {"INDEX.tsv", "README.md"}
    assert on_disk == {row["file"] for row in ROWS}


@pytest.mark.parametrize("row", ROWS, ids=[row["file"][:70] for row in ROWS])
def test_real_manifest(row: dict[str, str]) -> None:
    path = FOLDER / row["file"]
    fmt, expected = row["format"], int(row["expected"])
    if fmt in ("tcia", "csv"):
        manifest = read_manifest(path)
        assert manifest.kind == ("tcia" if fmt == "tcia" else "csv")
        assert len(manifest.series_uids) == expected
        assert manifest.crdc_uuids == ()
    elif fmt == "s5cmd":
        manifest = read_manifest(path)
        assert manifest.kind == "s5cmd"
        assert len(manifest.crdc_uuids) == expected
        assert manifest.series_uids == ()
        assert manifest.root_name == path.stem  # as databasketId names a .tcia's root
    elif fmt == "drs-csv" or fmt.startswith("pathdb-"):
        if fmt == "pathdb-xlsx" and importlib.util.find_spec("openpyxl") is None:
            pytest.skip("openpyxl is not installed")
        manifest = read_manifest(path)
        drs = fmt == "drs-csv"
        assert manifest.kind == ("drs" if drs else "pathdb")
        assert len(manifest.files) == expected
        assert (manifest.series_uids, manifest.skipped, manifest.duplicates_dropped) == \
            ((), (), 0)
        assert {f.kind for f in manifest.files} == {"drs" if drs else "url"}
        # every row's file, in order, each its own key (none is a DICOM series zip)
        assert [f.line for f in manifest.files] == list(range(2, expected + 2))
        assert all(f.key == f.uri and f.name for f in manifest.files)
        assert {f.host for f in manifest.files} == \
            {"nci-crdc.datacommons.io" if drs else "pathdb.cancerimagingarchive.net"}
    else:
        with pytest.raises(ManifestError) as info:
            read_manifest(path)
        message = str(info.value)
        assert message.startswith(str(path))
        assert "\n" not in message
        assert fmt == "not-a-manifest"
        assert "'temp'" in message and "expected a .tcia manifest" in message


def test_real_drs_and_pathdb_rows_read_as_the_go_retriever_reads_them() -> None:
    """The columns each real sheet gives, by the Go retriever's aliases: CTDC's
    ``participant_id``/``study_short_name``/``Md5sum`` (its ``File ID`` repeats the
    ``drs_uri``), ICDC's ``File Size``/``md5sum``/``Patient ID``, PathDB's
    ``collectionName``/``subjectId`` and the file name from the URL."""
    prefix = "kirbyju__TCIA_data_retriever__test_manifests__"
    ctdc = read_manifest(FOLDER / f"{prefix}CTDC-Restricted-CMB-Manifest.csv").files[0]
    assert (ctdc.uri, ctdc.object_id, ctdc.name, ctdc.patient_id, ctdc.study_description,
            ctdc.md5, ctdc.size) == (
        "drs://nci-crdc.datacommons.io/dg.4DFC/870175D4-EE9A-4A64-BF7A-6CDDB18C22BD",
        "dg.4DFC/870175D4-EE9A-4A64-BF7A-6CDDB18C22BD", "MSB-00140-06-genomic-report-CTDCv1",
        "MSB-00140", "CMB", "dd970cc07d55b06754594e8177826b93", None)
    icdc = read_manifest(FOLDER / f"{prefix}ICDC-Open-Manifest-Test.csv").files[-1]
    assert (icdc.name, icdc.size, icdc.md5, icdc.patient_id, icdc.line) == (
        "CCB010233.pdf", 39508, "7d0e472d448638b652e084c58feae270", "CCB010233", 10)
    for suffix in ("csv", "xlsx"):
        if suffix == "xlsx" and importlib.util.find_spec("openpyxl") is None:
            continue
        slide = read_manifest(FOLDER / f"{prefix}pathdb-test.{suffix}").files[25]
        assert (slide.kind, slide.name, slide.collection, slide.patient_id, slide.size,
                slide.md5, slide.line) == ("url", "MIP-PROSTATE-01-0026.tiff", "Prostate_MRI",
                                           "MIP-PROSTATE-01-0026", None, None, 27)


def test_column_header_after_the_marker_is_skipped_with_a_warning() -> None:
    name = "CBIIT__NBIA-TCIA__deploy__NBIA-Submission-Test-Data_225series_3.4gbytes.tcia"
    manifest = read_manifest(FOLDER / name)
    assert manifest.skipped == ("line 7: 'Series ID' holds no series UID (a column header?); "
                                "skipped, as the Java retriever does",)


def test_uid_above_the_marker_is_ignored_as_java_does() -> None:
    name = "lescientifik__tcia_downloader__tcia_downloader__Anti-PD-1 LungNBIA-manifest-" \
           "1555593712098.txt"
    manifest = read_manifest(FOLDER / name)
    uid = "1.3.6.1.4.1.14519.5.2.1.3098.5025.242083141114562987765795908595"
    assert manifest.series_uids == (uid,)
    assert manifest.skipped == ("line 6: a series UID above ListOfSeriesToDownload=; it is "
                                "ignored, as the Java retriever does",)


def test_idc_index_title_line_is_reported_not_fatal() -> None:
    name = "ImagingDataCommons__idc-index__tests__study_manifest_aws.s5cmd"
    manifest = read_manifest(FOLDER / name)
    assert manifest.crdc_uuids[0] == "28621ba9-1aca-4aab-a2a1-f6d2c3e2ab19"
    assert manifest.skipped == ("line 4: not an s5cmd cp or sync line: "
                                "'study_manifest_cp_command'",)
