"""Folder layout: each rule by example, then the safety properties under hostile metadata."""

from __future__ import annotations

import unicodedata
from pathlib import PurePosixPath, PureWindowsPath

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nbia_retriever.layout import (
    MAX_SERIES_PATH,
    FolderPlanner,
    Layout,
    format_series_number,
    normalise_date,
    root_folder_name,
    sanitize_component,
    series_relpath,
    series_relpaths,
)
from nbia_retriever.models import SeriesInfo

STUDY = "1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178"
SERIES = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def info(**kw: object) -> SeriesInfo:
    base: dict[str, object] = dict(
        series_uid=SERIES, collection="LIDC-IDRI", patient_id="LIDC-IDRI-0001",
        study_uid=STUDY, study_date="01-01-2000", study_description="Chest CT",
        study_id="", series_number="3000566.000000", series_description="",
    )
    base.update(kw)
    return SeriesInfo(**base)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- dates, numbers


@pytest.mark.parametrize(
    ("raw", "out"),
    [
        ("20010503", "05-03-2001"),
        ("2001-05-03", "05-03-2001"),
        ("05-03-2001", "05-03-2001"),
        ("2001/05/03", "05-03-2001"),
        ("2001.05.03", "05-03-2001"),
        ("5/3/2001", "05-03-2001"),
        ("2001-05-03 00:00:00.0", "05-03-2001"),
        ("2001-05-03T12:30:00", "05-03-2001"),
        ("05-03-2001 00:00:00", "05-03-2001"),
        ("20010503123000.000000+0100", "05-03-2001"),
        ("  20000229 ", "02-29-2000"),
        ("", ""),
        ("20010230", ""),  # no 30 February
        ("19000229", ""),  # 1900 was no leap year
        ("2001-13-01", ""),
        ("13-01-2001", ""),  # month 13: not read as DD-MM-YYYY either
        ("00000101", ""),
        ("yesterday", ""),
        ("2001", ""),
        ("２００１-05-03", ""),  # full-width digits
    ],
)
def test_normalise_date(raw: str, out: str) -> None:
    assert normalise_date(raw) == out


@pytest.mark.parametrize(
    ("raw", "out"),
    # The server's decimal(22,6) text, whatever the API sent (v4 builds of 2025-04 sent
    # integers): the Java folder names carry it.
    [("1.000000", "1.000000"), ("1", "1.000000"), (" 3000566.000000 ", "3000566.000000"),
     ("2.5", "2.500000"), ("2.500000", "2.500000"), ("", ""), ("  ", ""),
     ("-0.0", "0.000000"), ("+7", "7.000000"), ("-2", "-2.000000"), ("1e2", "100.000000"),
     ("abc", "abc"), ("1e999999", "1e999999"), ("NaN", "NaN"),
     ("1e99999999999999999999", "1e99999999999999999999")],
)
def test_format_series_number(raw: str, out: str) -> None:
    assert format_series_number(raw) == out


# ----------------------------------------------------------------------------- components


@pytest.mark.parametrize(
    ("raw", "out"),
    [
        ("plain", "plain"),
        ("a/b", "a-b"),
        ("a\\b", "a-b"),
        ('<>:"|?*', "_______"),
        ("tab\there", "tab_here"),
        ("nl\nx\ry", "nl_x_y"),
        ("del\x7fc1\x85", "del_c1_"),
        ("sep\u2028\u2029", "sep__"),
        ("rlo\u202egpj.exe", "rlo_gpj.exe"),
        ("  leading", "leading"),
        ("trailing. . ", "trailing"),
        (".", "NA"),
        ("..", "NA"),
        ("...", "NA"),
        ("", "NA"),
        ("   ", "NA"),
        (".hidden", "_hidden"),
        (".nbia", "_nbia"),
        ("CON", "CON_"),
        ("con", "con_"),
        ("Nul.txt", "Nul_.txt"),
        ("com1.tar.gz", "com1_.tar.gz"),
        ("LPT9", "LPT9_"),
        ("COM¹", "COM¹_"),
        ("CONIN$", "CONIN$_"),
        ("AUX .txt", "AUX_ .txt"),
        ("CONSOLE", "CONSOLE"),
        ("COM10", "COM10"),
        ("e\u0301", "\u00e9"),  # NFD -> NFC
        ("a\ud800b", "a_b"),  # lone surrogate (from surrogateescape)
    ],
)
def test_sanitize_component(raw: str, out: str) -> None:
    assert sanitize_component(raw) == out


def test_sanitize_fallback_and_max_len() -> None:
    assert sanitize_component("", fallback="unknown") == "unknown"
    assert sanitize_component("..", fallback="") == ""
    assert sanitize_component("abc def", max_len=4) == "abc"
    assert sanitize_component("/", fallback="..") == "-"
    assert sanitize_component("", fallback="..") == "NA"


def test_sanitize_caps_utf8_bytes() -> None:
    out = sanitize_component("é" * 300)
    assert len(out.encode()) <= 255
    assert out == "é" * 127
    assert len(sanitize_component("a" * 300).encode()) == 255
    assert len(sanitize_component("CON." + "a" * 300).encode()) <= 255


_hostile_text = st.lists(
    st.sampled_from([*"aZ09 .-_/\\:*?\"<>|\t\n\x00\x7f\u2028\u202eé\u0301\ud800$¹",
                     "CON", "com", "LPT", "nul", ".."]),
    max_size=20,
).map("".join) | st.text(max_size=40)


def _assert_safe_component(name: str) -> None:
    assert name
    assert name not in (".", "..")
    assert not any(c in name for c in '/\\<>:"|?*')
    assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in name)
    assert name[-1] not in ". " and not name[-1].isspace()
    assert not name[0].isspace() and name[0] != "."
    assert name.split(".")[0].rstrip(" ").upper() not in {
        "CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
        *(f"{p}{n}" for p in ("COM", "LPT") for n in "0123456789¹²³"),
    }
    assert unicodedata.is_normalized("NFC", name)
    assert len(name.encode("utf-8")) <= 255


@settings(max_examples=200, deadline=None)
@given(_hostile_text)
def test_sanitize_is_safe_and_idempotent(text: str) -> None:
    out = sanitize_component(text)
    _assert_safe_component(out)
    assert sanitize_component(out) == out


# ----------------------------------------------------------------------------- layouts


def test_descriptive_layout_like_the_java_tool() -> None:
    # The example seen in the field, character for character.
    path = series_relpath(info(study_description=""))
    assert str(path) == "LIDC-IDRI/LIDC-IDRI-0001/01-01-2000-NA-NA-30178/3000566.000000-NA-03192"
    # cleanStr keeps [a-zA-Z0-9 .-] only: ":" and "/" go, nothing is replaced.
    path = series_relpath(info(study_id="12", series_description="Recon 2: w/ contrast"))
    assert path.parts == ("LIDC-IDRI", "LIDC-IDRI-0001", "01-01-2000-12-Chest CT-30178",
                          "3000566.000000-Recon 2 w contrast-03192")
    assert series_relpath(info(), Layout.DESCRIPTIVE) == series_relpath(info(), "descriptive")


def test_empty_parts_read_na_and_null_parts_are_left_out() -> None:
    # Empty StudyID and descriptions read NA (cleanStr); a missing date or number is
    # left out (getPartOfName), as is a part that is exactly "null" or a description "-".
    path = series_relpath(info(study_date="", study_description="", series_number=""))
    assert path.parts[2:] == ("NA-NA-30178", "NA-03192")
    path = series_relpath(info(study_date="garbage", series_number="", series_description="X"))
    assert path.parts[2:] == ("NA-Chest CT-30178", "X-03192")
    path = series_relpath(info(study_id="null", study_description="-",
                               series_description="null"))
    assert path.parts[2:] == ("01-01-2000-30178", "3000566.000000-03192")
    path = series_relpath(info(study_description="???", series_description="é"))
    assert path.parts[2:] == ("01-01-2000-NA-NA-30178", "3000566.000000-NA-03192")


def test_the_same_names_whatever_the_api_sent() -> None:
    # v4 sends raw text and integer-looking numbers; v1/v2 stripped text and 1.000000.
    raw = info(study_description="Chest/Abd (w contrast)", series_description="Ax: 5mm",
               series_number="2", study_id="A/1")
    stripped = info(study_description="ChestAbd w contrast", series_description="Ax 5mm",
                    series_number="2.000000", study_id="A1")
    assert series_relpath(raw) == series_relpath(stripped)
    assert series_relpath(raw).parts[2:] == ("01-01-2000-A1-ChestAbd w contrast-30178",
                                            "2.000000-Ax 5mm-03192")


def test_dates_in_any_form_become_mm_dd_yyyy() -> None:
    for raw in ("2000-01-01", "20000101", "2000-01-01 00:00:00.0"):
        assert series_relpath(info(study_date=raw)).parts[2].startswith("01-01-2000-")


def test_descriptions_cut_to_53_characters() -> None:
    path = series_relpath(info(study_description="S" * 80, series_description="D" * 80,
                               series_number="1"))
    assert path.parts[2] == "01-01-2000-NA-" + "S" * 53 + "-30178"
    assert path.parts[3] == "1.000000-" + "D" * 53 + "-03192"


def test_last_five_includes_dots() -> None:
    path = series_relpath(info(study_uid="1.2.3.4.5", series_uid="1.2.840.1.2.3",
                               study_description="", series_number=""))
    assert path.parts[2:] == ("01-01-2000-NA-NA-3.4.5", "NA-1.2.3")


def test_missing_collection_and_patient_fall_back_to_na() -> None:
    path = series_relpath(info(collection="", patient_id="  "))
    assert path.parts[:2] == ("NA", "NA")
    assert series_relpath(info(collection="", patient_id=""), "classic").parts[:2] == ("NA", "NA")


def test_classic_layout() -> None:
    path = series_relpath(info(collection="LIDC/IDRI"), Layout.CLASSIC)
    assert path == PurePosixPath("LIDC-IDRI", "LIDC-IDRI-0001", STUDY, SERIES)
    assert series_relpath(info(study_uid=""), "classic").parts[2] == "NA"


def test_names_the_engine_writes_are_never_taken() -> None:
    path = series_relpath(info(collection="metadata.csv", patient_id="License"))
    assert path.parts[:2] == ("metadata.csv_", "License_")
    assert series_relpath(info(collection=".nbia")).parts[0] == "_nbia"


def test_unicode_is_nfc() -> None:
    # Patient IDs keep their text (made NFC, so macOS and Linux agree); descriptions go
    # through cleanStr on the text as sent, like the server's: a combining accent goes,
    # its letter stays.
    path = series_relpath(info(patient_id="Jose\u0301", series_description="Ange\u0301lique"))
    assert path.parts[1] == "Jos\u00e9"
    assert path.parts[3] == "3000566.000000-Angelique-03192"


@pytest.mark.parametrize("evil", ["../../x", "..", ".", "C:\\x", "C:", "/abs", "\\\\server\\share",
                                  "//server/share", "~", "CON", "x/../../y", "\x00"])
@pytest.mark.parametrize("layout", list(Layout))
def test_hostile_metadata_stays_inside(evil: str, layout: Layout) -> None:
    meta = info(collection=evil, patient_id=evil, study_uid=evil, study_description=evil,
                study_id=evil, series_number=evil, series_description=evil)
    _assert_inside(series_relpath(meta, layout))


def test_long_metadata_shrinks_series_description_first() -> None:
    meta = info(collection="C" * 60, patient_id="P" * 60, study_description="S" * 53,
                series_description="D" * 53, study_id="1")
    path = series_relpath(meta)
    assert len(str(path)) == MAX_SERIES_PATH
    assert path.parts[:2] == ("C" * 60, "P" * 60)
    assert path.parts[2] == "01-01-2000-1-" + "S" * 53 + "-30178"
    assert path.parts[3] == "3000566.000000-" + "D" * 24 + "-03192"


def test_then_study_description_then_patient_then_collection() -> None:
    meta = info(collection="C" * 100, patient_id="P" * 100, study_description="S" * 53,
                series_description="D" * 53)
    path = series_relpath(meta)
    assert len(str(path)) == MAX_SERIES_PATH
    # Both descriptions gone entirely (a part cut to nothing is left out), then the
    # patient ID gives way.
    assert path.parts == ("C" * 100, "P" * 98, "01-01-2000-NA-30178", "3000566.000000-03192")
    meta = info(collection="C" * 150, patient_id="P" * 150, study_description="S" * 53,
                series_description="D" * 53)
    path = series_relpath(meta)
    assert len(str(path)) == MAX_SERIES_PATH
    assert path.parts == ("C" * 150, "P" * 48, "01-01-2000-NA-30178", "3000566.000000-03192")
    meta = info(collection="C" * 300, patient_id="P" * 300)
    path = series_relpath(meta)
    assert len(str(path)) <= MAX_SERIES_PATH
    assert path.parts[1] == "P"
    assert path.parts[0] == "C" * (MAX_SERIES_PATH - 3 - 1 - 19 - 20)
    assert path.parts[2:] == ("01-01-2000-NA-30178", "3000566.000000-03192")


def test_suffixes_survive_any_shortening() -> None:
    meta = info(collection="é" * 500, patient_id="P" * 500, study_id="I" * 500,
                series_number="9" * 500, study_description="S" * 500,
                series_description="D" * 500)
    path = series_relpath(meta)
    _assert_inside(path)
    assert path.parts[2].endswith("-30178") and path.parts[3].endswith("03192")


def test_root_folder_name() -> None:
    assert root_folder_name("manifest-1724796815128") == "manifest-1724796815128"
    assert root_folder_name("manifest-1.tcia") == "manifest-1"
    assert root_folder_name("..") == "manifest"
    assert root_folder_name("../..") == "_.-"
    assert root_folder_name("a/b:c") == "a-b_c"
    assert root_folder_name("") == "manifest"
    assert len(root_folder_name("x" * 500)) <= 64


def test_same_last_five_collide_in_series_relpath_but_not_in_series_relpaths() -> None:
    a = info(series_uid="1.2.840.111.4.12345")
    b = info(series_uid="1.2.840.222.4.12345")
    assert series_relpath(a) == series_relpath(b)  # faithful to the Java rule
    paths = series_relpaths([a, b])
    assert paths[a.series_uid] != paths[b.series_uid]
    # The first in manifest order keeps the Java name; the later one its whole UID.
    assert paths[a.series_uid] == series_relpath(a)
    assert paths[b.series_uid].name.endswith("-1.2.840.222.4.12345")
    assert series_relpaths([b, a])[b.series_uid] == series_relpath(b)
    c = info(series_uid="1.2.840.333.4.54321")
    assert series_relpaths([a, b, c])[c.series_uid] == series_relpath(c)  # untouched


def test_series_relpaths_case_insensitive_clash() -> None:
    a = info(series_uid="1.2.3.11111", series_description="abc")
    b = info(series_uid="1.2.4.11111", series_description="ABC")
    paths = series_relpaths([a, b])
    assert paths[a.series_uid].name.lower() != paths[b.series_uid].name.lower()


# ----------------------------------------------------------------------------- properties

_uid = st.lists(st.integers(0, 10**8).map(str), min_size=2, max_size=8).map(".".join)
_SAMPLES = ["", "LIDC-IDRI", "..", "CON", "../../x", "C:\\x", "/abs", "\\\\server\\share",
            "x" * 300, "é" * 200, "1.2.3", " a. ", "metadata.csv", "License"]
_meta_text = _hostile_text | st.sampled_from(_SAMPLES)


def _infos(uid: st.SearchStrategy[str] = _uid) -> st.SearchStrategy[SeriesInfo]:
    return st.builds(
        SeriesInfo, series_uid=uid, collection=_meta_text, patient_id=_meta_text,
        study_uid=_uid | _meta_text, study_date=st.sampled_from(["", "20010503", "bad"]),
        study_description=_meta_text, study_id=_meta_text, series_number=_meta_text,
        series_description=_meta_text,
    )


def _assert_inside(path: PurePosixPath) -> None:
    assert not path.is_absolute()
    assert len(path.parts) == 4
    assert ".." not in path.parts
    assert len(str(path)) <= MAX_SERIES_PATH
    for part in path.parts:
        _assert_safe_component(part)
    assert not PureWindowsPath(str(path)).anchor  # no drive, no UNC share
    root = PurePosixPath("/fake/root")
    joined = PurePosixPath(*(root / path).parts)
    assert joined.is_relative_to(root)


@settings(max_examples=200, deadline=None)
@given(_infos(_uid | _meta_text), st.sampled_from(list(Layout)))
def test_paths_never_escape_and_are_deterministic(meta: SeriesInfo, layout: Layout) -> None:
    path = series_relpath(meta, layout)
    _assert_inside(path)
    assert series_relpath(meta, layout) == path
    assert series_relpath(SeriesInfo(**{f: getattr(meta, f) for f in (
        "series_uid", "collection", "patient_id", "study_uid", "study_date",
        "study_description", "study_id", "series_number", "series_description")}),
        layout) == path


_NLST_LIKE = st.sampled_from([
    "", "1", "1.000000", "2.5", "NLST", "0OPAGELSPLUSD3602.512080.00.11.5", "LUNG 2.0 B30f",
    "Recon 2: w/ contrast", "CON", "a.", "..", "-", "null", "x" * 60])


@settings(max_examples=500, deadline=None)
@given(_infos(_uid | _meta_text) | st.builds(
    SeriesInfo, series_uid=_uid | st.sampled_from(["1.2.3.", "1.2.3..4", " 1.2.34567 "]),
    collection=_NLST_LIKE, patient_id=_NLST_LIKE, study_uid=_uid,
    study_date=st.sampled_from(["", "20010503", "2001-05-03 00:00:00.0"]),
    study_description=_NLST_LIKE, study_id=_NLST_LIKE, series_number=_NLST_LIKE,
    series_description=_NLST_LIKE), st.sampled_from([0, 1, 2]))
def test_the_fast_path_names_folders_exactly_like_the_rules(meta: SeriesInfo,
                                                            mode: int) -> None:
    """Planning 200,000 series takes the cached fast path; the full rules are the
    definition. Wherever the fast path answers, it answers the same."""
    from nbia_retriever.layout import _descriptive_fast, _relpath_rules

    fast = _descriptive_fast(meta, mode)
    assert fast is None or fast == _relpath_rules(meta, Layout.DESCRIPTIVE, mode)


_BATCH_INFO = st.builds(
    SeriesInfo, series_uid=_uid | st.sampled_from(["1.2.3.", "1.2.34567", " 1.2.34567 ",
                                                   "9.34567", "1.2.3é"]),
    collection=_NLST_LIKE, patient_id=_NLST_LIKE,
    study_uid=st.sampled_from(["1.2.840.5", "1.3.840.5", "2.2"]) | _uid,
    study_date=st.sampled_from(["", "20010503"]), study_description=_NLST_LIKE,
    study_id=_NLST_LIKE, series_number=_NLST_LIKE,
    series_description=_NLST_LIKE | st.sampled_from(["A" * 70, "Ä"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_infos(_uid | _meta_text) | _BATCH_INFO, max_size=12),
       st.sampled_from(list(Layout)), st.lists(st.sampled_from(["", "x"]), max_size=3))
def test_a_batch_gets_the_folders_one_by_one_would(infos: list[SeriesInfo], layout: Layout,
                                                   reserved: list[str]) -> None:
    """``take_many`` (a metadata batch at once) is ``take`` in a loop: same folders, same
    variants, same clash resolution, whatever was reserved before."""
    one, many = FolderPlanner(layout), FolderPlanner(layout)
    taken = [str(series_relpath(i, layout)) + r for i, r in zip(infos, reserved, strict=False)]
    one.reserve(taken)
    many.reserve(taken)
    unique = list({i.series_uid: i for i in infos}.values())
    assert many.take_many(unique) == [one.take(i) for i in unique]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=8, max_size=8) | st.sampled_from(
    [b"\0\0" + b"\1" * 6, b"\0\0" + b"\1" * 3 + b"\2" * 3, b"\0\0" + b"\2" * 3 + b"\1" * 3,
     b"\0\0" + b"\2" * 6, b"\0\0" + b"\1\2" * 3, b"\0\0" + b"\2\1" * 3]), max_size=40))
def test_the_digest_set_is_a_set(digests: list[bytes]) -> None:
    """Six-byte entries packed in one bucket: a match straddling two entries is none."""
    from nbia_retriever.layout import _DigestSet

    packed, plain = _DigestSet(), set()
    for digest in digests:
        assert packed.add(digest) is (digest not in plain)
        plain.add(digest)


@settings(max_examples=200, deadline=None)
@given(
    base=st.tuples(*[st.sampled_from(_SAMPLES)] * 5),
    uids=st.lists(_uid, min_size=2, max_size=6, unique=True),
    tails=st.lists(st.sampled_from(["", ".12345", ".1.2345", ".99999"]), min_size=6, max_size=6),
    numbers=st.lists(st.sampled_from(["", "1", "1.000000", "2"]), min_size=6, max_size=6),
    descs=st.lists(st.sampled_from(["", "a", "A", "a/", "a-"]), min_size=6, max_size=6),
    layout=st.sampled_from(list(Layout)),
    reverse=st.booleans(),
)
def test_different_series_never_share_a_folder(
    base: tuple[str, str, str, str, str], uids: list[str], tails: list[str],
    numbers: list[str], descs: list[str], layout: Layout, reverse: bool,
) -> None:
    """Same collection/patient/study; UIDs chosen to share their last five characters."""
    full = list(dict.fromkeys(u + t for u, t in zip(uids, tails, strict=False)))
    assume(len(full) >= 2)
    metas = [
        SeriesInfo(series_uid=u, collection=base[0], patient_id=base[1], study_uid=base[2],
                   study_date="20010503", study_description=base[3], study_id=base[4],
                   series_number=numbers[i], series_description=descs[i])
        for i, u in enumerate(full)
    ]
    ordered = list(reversed(metas)) if reverse else metas
    paths = series_relpaths(ordered, layout)
    assert set(paths) == set(full)
    keys = {str(p).casefold() for p in paths.values()}
    assert len(keys) == len(full)
    for path in paths.values():
        _assert_inside(path)
    # Deterministic for a given order, and the first series keeps its Java name.
    assert series_relpaths(ordered, layout) == paths
    assert paths[ordered[0].series_uid] == series_relpath(ordered[0], layout)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30) | st.from_regex(
    r"[+-]?[0-9]{1,3}(\.[0-9]*)?([eE][+-]?[0-9]{1,25})?", fullmatch=True))
def test_number_and_date_formatting_never_crash(text: str) -> None:
    out = format_series_number(text)
    assert len(out) <= len(text) + 64  # never a thousand-digit expansion
    date = normalise_date(text)
    assert date == "" or (len(date) == 10 and date[2] == date[5] == "-")


def test_a_crowded_digest_bucket_becomes_a_set() -> None:
    """Digests a hostile server aims at one bucket: still a set, and no longer a bucket
    that every add copies and searches."""
    from nbia_retriever.layout import _BUCKET_BYTES, _DigestSet

    packed = _DigestSet()
    crowd = [b"\0\0" + n.to_bytes(6, "big") for n in range(_BUCKET_BYTES // 6 * 3)]
    assert all(packed.add(d) for d in crowd)
    assert not any(packed.add(d) for d in crowd)
    assert packed._buckets[0] is None and packed.add(b"\0\1" + b"\0" * 6)
