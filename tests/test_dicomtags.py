"""The fast naming-tag scanner agrees with pydicom, or declines (never guesses)."""

from __future__ import annotations

import subprocess
import sys

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from nbia_retriever._dicomtags import fast_tags
from nbia_retriever.naming import parse_is

TAGS = ("AcquisitionNumber", "InstanceNumber", "SOPInstanceUID")


def pydicom_tags(path) -> dict[str, str | None]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(TAGS))
    return {t: (None if ds.get(t) in (None, "") else str(ds.get(t))) for t in TAGS}


def same(fast: dict[str, str | None], slow: dict[str, str | None]) -> bool:
    return (fast["SOPInstanceUID"] == slow["SOPInstanceUID"]
            and parse_is(fast["AcquisitionNumber"]) == parse_is(slow["AcquisitionNumber"])
            and parse_is(fast["InstanceNumber"]) == parse_is(slow["InstanceNumber"]))


def test_agrees_with_pydicom_on_every_awkward_synthetic_file(archive_factory):
    archive = archive_factory(seed=4, images=6)
    files = sorted(archive.root.rglob("*.dcm"))
    assert files
    for path in files:
        fast = fast_tags(path.read_bytes()[:64 * 1024])
        assert fast is not None, f"declined an ordinary file: {path.name}"
        assert same(fast, pydicom_tags(path)), path


def _dataset(transfer_syntax, **extra) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\0" * 8  # real images end with pixels; the scanner stops before them
    return ds


@pytest.mark.parametrize("extra", [{}, {"InstanceNumber": 4},
                                   {"AcquisitionNumber": 2, "InstanceNumber": 9}])
def test_absent_tags_and_sequences(tmp_path, extra):
    ds = _dataset(ExplicitVRLittleEndian, **extra)
    item = pydicom.Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = pydicom.Sequence([item, item])
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    fast = fast_tags(path.read_bytes())
    assert fast is not None and same(fast, pydicom_tags(path))


def test_declines_what_it_cannot_be_sure_of(tmp_path):
    implicit = _dataset(ImplicitVRLittleEndian, InstanceNumber=3)
    path = tmp_path / "implicit.dcm"
    implicit.save_as(path, enforce_file_format=True)
    assert fast_tags(path.read_bytes()) is None
    explicit = _dataset(ExplicitVRLittleEndian, InstanceNumber=3)
    path = tmp_path / "explicit.dcm"
    explicit.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    assert fast_tags(data[: data.index(b"\x20\x00\x13\x00") + 6]) is None, \
        "a header cut inside InstanceNumber must not guess"
    assert fast_tags(data[:200]) is None
    assert fast_tags(b"not dicom at all" * 20) is None


def test_sop_class_names_are_pydicoms_without_importing_it() -> None:
    """The SOP class name comes from pydicom's own table, but a download never pays the
    ~150 ms (GIL held) of ``import pydicom`` for it."""
    from pydicom.uid import UID_dictionary

    from nbia_retriever._dicomtags import sop_class_name

    for uid, row in UID_dictionary.items():
        assert sop_class_name(uid) == row[0]
    assert sop_class_name("1.2.3.4") == ""
    assert sop_class_name("") == ""
    code = ("import sys\nfrom nbia_retriever._dicomtags import sop_class_name\n"
            "assert sop_class_name('1.2.840.10008.5.1.4.1.1.2') == 'CT Image Storage'\n"
            "assert 'pydicom' not in sys.modules, 'pydicom was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
