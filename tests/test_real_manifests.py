"""Every real manifest in ``../shared/real-manifests`` (files from public repositories, byte
for byte) reads as its ``INDEX.tsv`` says: the same number of series a correct reader finds
(the Java retriever's rule for ``.tcia``), IDC series folders for ``.s5cmd``, and a clear
one-line error that names the format for sheets of other systems (DRS, PathDB) and for
files that are no manifest at all.
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
    else:
        if fmt == "pathdb-xlsx" and importlib.util.find_spec("openpyxl") is None:
            pytest.skip("openpyxl is not installed")
        with pytest.raises(ManifestError) as info:
            read_manifest(path)
        message = str(info.value)
        assert message.startswith(str(path))
        assert "\n" not in message
        if fmt == "drs-csv":
            assert "DRS manifest (column 'drs_uri')" in message
            assert "not supported yet (issue 24)" in message
        elif fmt.startswith("pathdb-"):
            assert "PathDB image sheet (column 'imageUrl')" in message
            assert "not supported yet (issue 24)" in message
        else:
            assert fmt == "not-a-manifest"
            assert "'temp'" in message and "expected a .tcia manifest" in message


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
