"""The synthetic archive generator: the on-disk contract the reference server relies on,
determinism, and the presence of every awkward case the client must survive."""

from __future__ import annotations

import io
import re
import tomllib
import tracemalloc
import zlib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from nbia_retriever.errors import NbiaError
from nbia_retriever.server.synth import (
    ALL_MANIFEST,
    ARCHIVE_TOML,
    PUBLIC_MANIFEST,
    ArchiveSummary,
    SynthError,
    generate_archive,
    synth_command,
)

ALL_CASES = {
    "multi-acquisition",
    "acquisition-absent",
    "instance-absent",
    "duplicate-instance",
    "sparse-instances",
    "special-characters",
    "unicode",
    "long-description",
    "empty-descriptions",
    "series-number-absent",
}


@pytest.fixture(scope="module")
def default_archive(tmp_path_factory: pytest.TempPathFactory) -> ArchiveSummary:
    return generate_archive(tmp_path_factory.mktemp("synth") / "archive")


def _read_all(summary: ArchiveSummary) -> dict[str, list[Dataset]]:
    return {s.series_uid: [pydicom.dcmread(f) for f in s.files] for s in summary.series}


def _text(ds: Dataset, keyword: str) -> str:
    """A string element as one string; a backslash makes pydicom split LO into values."""
    value = ds.get(keyword, "")
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _cases(series: Iterable[list[Dataset]]) -> set[str]:
    """Which awkward cases the given series exhibit, judged from the headers alone."""
    found: set[str] = set()
    for images in series:
        acquisitions = [ds.get("AcquisitionNumber") for ds in images]
        instances = [ds.get("InstanceNumber") for ds in images]
        if len({a for a in acquisitions if a is not None}) >= 2:
            found.add("multi-acquisition")
        if all(a is None for a in acquisitions):
            found.add("acquisition-absent")
        if any(i is None for i in instances) and any(i is not None for i in instances):
            found.add("instance-absent")
        pairs = [(a, i) for a, i in zip(acquisitions, instances, strict=True) if i is not None]
        if len(pairs) != len(set(pairs)):
            found.add("duplicate-instance")
        if {3, 10, 250} <= {int(i) for i in instances if i is not None}:
            found.add("sparse-instances")
        if "SeriesNumber" not in images[0]:
            found.add("series-number-absent")
        for ds in images[:1]:
            texts = [_text(ds, "StudyDescription"), _text(ds, "SeriesDescription")]
            if any(all(c in t for c in '/:*?<>|\\') for t in texts):
                found.add("special-characters")
            if any(not t.isascii() for t in texts):
                assert ds.SpecificCharacterSet == "ISO_IR 192"
                found.add("unicode")
            if any(len(t) > 53 for t in texts):
                found.add("long-description")
            if not texts[0] and not texts[1] and not _text(ds, "StudyID"):
                found.add("empty-descriptions")
    return found


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _manifest_uids(path: Path) -> tuple[dict[str, str], list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    marker = lines.index("ListOfSeriesToDownload=")
    headers = dict(line.split("=", 1) for line in lines[:marker])
    return headers, [line for line in lines[marker + 1 :] if line]


def test_same_seed_gives_identical_bytes_and_another_seed_other_uids(tmp_path: Path) -> None:
    first = generate_archive(tmp_path / "a", seed=7)
    second = generate_archive(tmp_path / "b", seed=7)
    third = generate_archive(tmp_path / "c", seed=8)
    tree = _tree(first.root)
    assert len(tree) == first.total_files + 3  # toml and two manifests
    assert tree == _tree(second.root)
    uids = {s.series_uid for s in first.series} | {s.study_uid for s in first.series}
    other = {s.series_uid for s in third.series} | {s.study_uid for s in third.series}
    assert not uids & other
    assert _tree(third.root).keys().isdisjoint(k for k in tree if k.endswith(".dcm"))


def test_counts_layout_and_headers_match_parameters(tmp_path: Path) -> None:
    summary = generate_archive(
        tmp_path / "out", collections=3, patients=2, studies=2, series=1, images=4, rows=16,
        columns=24,
    )
    assert len(summary.series) == 3 * 2 * 2 * 1
    assert summary.total_files == len(summary.series) * 4 == len(list(summary.root.rglob("*.dcm")))
    assert summary.total_bytes == sum(p.stat().st_size for p in summary.root.rglob("*.dcm"))
    assert len({s.series_uid for s in summary.series}) == len(summary.series)
    patients: dict[str, set[str]] = defaultdict(set)
    studies: dict[str, set[str]] = defaultdict(set)
    for s in summary.series:
        assert s.images == len(s.files) == 4
        assert s.nbytes == sum(f.stat().st_size for f in s.files)
        patients[s.collection].add(s.patient_id)
        studies[s.patient_id].add(s.study_uid)
        for f in s.files:
            rel = f.relative_to(summary.root).parts
            assert rel[0] == s.collection and rel[2:4] == (s.study_uid, s.series_uid)
            assert re.fullmatch(r"[A-Za-z0-9._-]+", rel[1])
            ds = pydicom.dcmread(f)
            assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (
                s.patient_id, s.study_uid, s.series_uid)
            assert (ds.Rows, ds.Columns, len(ds.PixelData)) == (16, 24, 16 * 24 * 2)
    assert sorted(patients) == ["SYNTH-CT-A", "SYNTH-CT-B", "SYNTH-CT-C"]
    assert all(len(p) == 2 for p in patients.values())
    assert all(len(st) == 2 for st in studies.values())


def test_files_are_proper_ct_part10_files(default_archive: ArchiveSummary) -> None:
    sops = set()
    for s in default_archive.series:
        pixels = set()
        for f in s.files:
            raw = f.read_bytes()
            assert raw[128:132] == b"DICM"
            ds = pydicom.dcmread(f)
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
            assert (ds.Modality, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == ("CT", 16, 12, 11)
            assert ds.PixelRepresentation in (0, 1)
            assert (ds.SamplesPerPixel, ds.PhotometricInterpretation) == (1, "MONOCHROME2")
            assert re.fullmatch(r"(19|20)\d{6}", ds.StudyDate)
            assert len(ds.ImagePositionPatient) == 3 and ds.RescaleIntercept == -1024
            # The fast writer must produce exactly what pydicom's own writer would.
            again = io.BytesIO()
            dcmwrite(again, ds, enforce_file_format=True)
            assert again.getvalue() == raw, f
            sops.add(ds.SOPInstanceUID)
            pixels.add(ds.PixelData)
            ratio = len(zlib.compress(ds.PixelData)) / len(ds.PixelData)
            assert 0.3 < ratio < 0.8, ratio  # CT-like: roughly 2:1, neither empty nor noise
        assert len(pixels) == len(s.files)  # every image of a series looks different
    assert len(sops) == default_archive.total_files


def test_default_archive_has_every_awkward_case_in_every_collection(
    default_archive: ArchiveSummary,
) -> None:
    datasets = _read_all(default_archive)
    assert _cases(datasets.values()) == ALL_CASES
    for collection in {s.collection for s in default_archive.series}:
        chosen = [datasets[s.series_uid] for s in default_archive.series
                  if s.collection == collection]
        assert _cases(chosen) == ALL_CASES, collection
    # Several acquisitions restart their InstanceNumbers: numbers alone collide.
    texts = {_text(images[0], "SeriesDescription") for images in datasets.values()}
    assert "Tête – Thorax ✓ 肺" in texts


def test_plain_archive_has_no_awkward_case(tmp_path: Path) -> None:
    summary = generate_archive(tmp_path / "plain", awkward=False, restricted=False)
    assert _cases(_read_all(summary).values()) == set()


def test_a_single_series_carries_the_cases_it_can(tmp_path: Path) -> None:
    summary = generate_archive(
        tmp_path / "one", collections=1, patients=1, series=1, images=8, restricted=False
    )
    found = _cases(_read_all(summary).values())
    assert {"multi-acquisition", "instance-absent", "duplicate-instance",
            "sparse-instances", "series-number-absent"} <= found


@pytest.mark.parametrize("image_bytes", [256 * 1024, 10_000, 1024 * 1024 + 7])
def test_image_bytes_is_honoured(tmp_path: Path, image_bytes: int) -> None:
    summary = generate_archive(
        tmp_path / "big", collections=1, patients=1, series=1, images=1, rows=8, columns=8,
        image_bytes=image_bytes,
    )
    ds = pydicom.dcmread(summary.series[0].files[0])
    assert abs(len(ds.PixelData) - image_bytes) <= 0.1 * image_bytes
    assert len(ds.PixelData) == ds.Rows * ds.Columns * 2


def test_a_series_is_streamed_not_held_in_memory(tmp_path: Path) -> None:
    frame = 256 * 1024
    tracemalloc.start()
    try:
        generate_archive(tmp_path / "s", collections=1, patients=1, series=1, images=40,
                         image_bytes=frame, restricted=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * frame  # the series is 40 frames; only the shared buffer may stay


def test_toml_parses_and_matches_the_summary(default_archive: ArchiveSummary) -> None:
    config = tomllib.loads((default_archive.root / ARCHIVE_TOML).read_text(encoding="utf-8"))
    assert config["token_lifetime"] == 7200
    by_collection = {s.collection: s.restricted for s in default_archive.series}
    assert {name: c["restricted"] for name, c in config["collections"].items()} == by_collection
    assert by_collection == {"SYNTH-CT-A": False, "SYNTH-CT-B": True}
    for c in config["collections"].values():
        assert c["license_url"].startswith("https://") and c["license_name"]
        assert c["description_uri"]
    users = config["users"]
    assert {u: v["password"] for u, v in users.items()} == default_archive.users
    assert default_archive.users == {"alice": "wonderland-secret", "bob": "builder-secret"}
    assert users["alice"]["collections"] == ["SYNTH-CT-B"]
    assert users["bob"]["collections"] == []


def test_unrestricted_archive_has_no_users(tmp_path: Path) -> None:
    summary = generate_archive(tmp_path / "open", restricted=False, images=1)
    config = tomllib.loads((summary.root / ARCHIVE_TOML).read_text(encoding="utf-8"))
    assert summary.users == {} and "users" not in config
    assert not any(c["restricted"] for c in config["collections"].values())
    _, public = _manifest_uids(summary.root / PUBLIC_MANIFEST)
    assert public == [s.series_uid for s in summary.series]


def test_manifests_list_public_and_all_series(default_archive: ArchiveSummary) -> None:
    headers, public = _manifest_uids(default_archive.root / PUBLIC_MANIFEST)
    assert public == [s.series_uid for s in default_archive.series if not s.restricted]
    assert 0 < len(public) < len(default_archive.series)
    assert headers["downloadServerUrl"] == (
        "http://127.0.0.1:8080/nbia-download/servlet/DownloadServlet")
    assert headers["manifestVersion"] == "3.0"
    assert headers["noOfrRetry"] == "4" and headers["includeAnnotation"] == "true"
    assert re.fullmatch(r"manifest-\d+\.tcia", headers["databasketId"])
    all_headers, every = _manifest_uids(default_archive.root / ALL_MANIFEST)
    assert every == [s.series_uid for s in default_archive.series]
    assert all_headers["databasketId"] != headers["databasketId"]


def test_refuses_to_mix_two_archives(tmp_path: Path) -> None:
    generate_archive(tmp_path / "x", images=1)
    with pytest.raises(SynthError, match="already holds"):
        generate_archive(tmp_path / "x", images=1)


@pytest.mark.parametrize(
    "kwargs",
    [{"images": 0}, {"collections": -1}, {"rows": 70000}, {"image_bytes": 1}, {"seed": "1"}],
)
def test_bad_parameters_give_one_line_errors(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(NbiaError) as caught:
        generate_archive(tmp_path / "bad", **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "bad").exists()


def test_cli_writes_an_archive_and_keeps_passwords_quiet(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(
        synth_command,
        [str(out), "--images", "2", "--image-bytes", "2K", "--patients", "1", "--seed", "3"],
    )
    assert result.exit_code == 0, result.output
    assert "Wrote 4 series, 8 images" in result.output
    assert "wonderland" not in result.output and "builder" not in result.output
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 8
    assert abs(len(pydicom.dcmread(files[0]).PixelData) - 2048) <= 205
    again = runner.invoke(synth_command, [str(out), "--images", "2"])
    assert again.exit_code == 1
    assert "already holds" in again.output and "Traceback" not in again.output
    bad = runner.invoke(synth_command, [str(tmp_path / "z"), "--image-bytes", "lots"])
    assert bad.exit_code == 2 and "not a size" in bad.output
