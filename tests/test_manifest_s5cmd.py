"""``.s5cmd`` manifests (reference section 10 B) and the ``.tcia`` lines the Java retriever
skips (issue 25 item 6): what is read, what is reported in ``Manifest.skipped``, and what
is refused with a one-line error naming the file."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbia_retriever.errors import ManifestError
from nbia_retriever.manifest import (
    MAX_SKIPPED,
    is_crdc_uuid,
    is_s3_bucket,
    parse_manifest,
    read_manifest,
)

A = "73e600e5-1d95-4b81-980c-b4d6a6f4f968"
B = "6b83aad9-3bbb-4b4e-be5a-2bbe8758d5a1"
C = "177c8ecb-e4c1-45d4-83ed-c72fadceeec5"
U1 = "1.3.6.1.4.1.14519.5.2.1.48822327301563949480198360763011173678"
U2 = "1.3.6.1.4.1.14519.5.2.1.74640583883665924899120840733688469127"

PORTAL = f"""# To obtain these images, install the idc-index python package:
# pip install --upgrade idc-index
# then run the following command:
# idc download <manifest file name>
# IDC Data Version(s): \n# Total manifest size on disk: 3.21 GB
cp s3://idc-open-data/{A}/* .
cp s3://idc-open-data-two/{B}/* .
"""


def error_of(text: str, source: str = "m.s5cmd") -> ManifestError:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, source=source)
    return info.value


def test_portal_manifest_with_its_header_comments() -> None:
    m = parse_manifest(PORTAL, source="/data/cohort-7.s5cmd")
    assert (m.kind, m.crdc_uuids, m.series_uids, m.skipped) == ("s5cmd", (A, B), (), ())
    assert m.root_name == "cohort-7"  # named after the file, as databasketId names a .tcia's
    assert m.headers == {} and m.download_server_url is None


@pytest.mark.parametrize("line", [
    f"cp s3://idc-open-data/{A}/* .",
    f"cp s3://idc-open-data/{A}/*  .",  # idc-index's prior_version_manifest: two spaces
    f"cp --show-progress s3://idc-open-data/{A}/* .",
    f"cp --concurrency 8 --part-size 10 s3://idc-open-data/{A}/* /tmp/x",
    f"sync --size-only s3://idc-open-data/{A}/* dest/",
    f'cp s3://idc-open-data/{A}/* "my data/series one"',
    f"cp 's3://idc-open-data/{A}/*' 'dest dir'",
    f"cp s3://idc-open-data/{A}/ .",
    f"cp s3://idc-open-data/{A} .",
    f"s3://idc-open-data/{A}/*",  # a bare URI line
    f"  CP\ts3://idc-open-data-cr/{A}/*\t.  ",
    f'cp s3://idc-open-data/{A}/* "unbalanced',  # s5cmd would refuse it; the source is clear
    f"cp --endpoint-url=https://storage.googleapis.com s3://idc-open-data/{A}/* .",
])
def test_line_variants(line: str) -> None:
    m = parse_manifest(f"# header\n\n{line}\r\n", source="x.s5cmd")
    assert (m.kind, m.crdc_uuids, m.skipped) == ("s5cmd", (A,), ())


def test_gs_and_other_lines_are_reported_not_fatal() -> None:
    text = "\n".join([
        "study_manifest_cp_command",                         # 1: idc-index's title line
        f"cp s3://idc-open-data/{A}/* .",                    # 2
        f"cp gs://public-datasets-idc/{B}/* .",              # 3
        f"rm s3://idc-open-data/{B}/*",                      # 4
        "cp --show-progress . ./elsewhere",                  # 5
        f"cp s3://idc-open-data/{B}/{C}.dcm .",              # 6: one object, not a folder
        f"cp s3://idc-open-data/{B.upper()}/* .",            # 7
        f"cp s3://Bad_Bucket/{B}/* .",                       # 8
        f"cp s3://idc-open-data/{A}/* other",                # 9: a duplicate
        U1,                                                  # 10: a bare UID (Go reads it)
        f"cp s3://x\x1b[2J/{B}/* .",                         # 11: a terminal escape
    ])
    m = parse_manifest(text, source="mixed.s5cmd")
    assert m.crdc_uuids == (A,)
    assert m.series_uids == (U1,)
    assert m.duplicates_dropped == 1
    lines = [reason.split(":", 1)[0] for reason in m.skipped]
    assert lines == [f"line {n}" for n in (1, 3, 4, 5, 6, 7, 8, 11)]
    assert "Google Cloud Storage" in m.skipped[1]
    assert "without an s3:// source" in m.skipped[3]
    assert "not an IDC series folder" in m.skipped[4]
    assert "bucket" in m.skipped[6]
    assert all("\x1b" not in r and "\n" not in r for r in m.skipped)


def test_no_usable_line_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "only-gcs.s5cmd"
    path.write_text(f"# IDC\ncp gs://public-datasets-idc/{A}/* .\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}: no IDC series folder")
    assert "line 2: " in message and "Google Cloud Storage" in message
    assert "\n" not in message
    with pytest.raises(ManifestError, match="no IDC series folder"):
        parse_manifest("# only comments\nstudy_manifest\n", kind="s5cmd")


def test_detected_by_content_whatever_the_name(tmp_path: Path) -> None:
    path = tmp_path / "manifest.tcia"  # the Go retriever reads .tcia files the same way
    path.write_text(PORTAL)
    m = read_manifest(path)
    assert (m.kind, m.crdc_uuids, m.root_name) == ("s5cmd", (A, B), "manifest")


def test_s5cmd_file_name_forces_the_s5cmd_reader(tmp_path: Path) -> None:
    path = tmp_path / "list.s5cmd"
    path.write_text(f"{U1}\n{U2}\n")
    m = read_manifest(path)
    assert (m.kind, m.series_uids, m.crdc_uuids) == ("s5cmd", (U1, U2), ())


def test_other_kinds_keep_their_shape() -> None:
    for text in (f"ListOfSeriesToDownload=\n{U1}\n", f"{U1}\n", f"SeriesInstanceUID\n{U1}\n"):
        m = parse_manifest(text)
        assert (m.series_uids, m.crdc_uuids, m.skipped) == ((U1,), (), ())
    # a .tcia header value that holds "s3://" is still a header
    m = parse_manifest(f"note=cp s3://idc-open-data/{A}/* .\nListOfSeriesToDownload=\n{U1}\n")
    assert (m.kind, m.series_uids) == ("tcia", (U1,))


def test_skipped_reasons_are_capped() -> None:
    lines = [f"cp gs://b/{uuid.UUID(int=i)}/* ." for i in range(MAX_SKIPPED + 50)]
    m = parse_manifest("\n".join([*lines, f"cp s3://idc-open-data/{A}/* ."]))
    assert m.crdc_uuids == (A,)
    assert len(m.skipped) == MAX_SKIPPED
    assert m.skipped[-1] == "51 more lines skipped"


def test_shapes() -> None:
    assert is_crdc_uuid(A) and not is_crdc_uuid(A.upper()) and not is_crdc_uuid(A + "0")
    assert not is_crdc_uuid(f"../{A}")
    assert is_s3_bucket("idc-open-data") and is_s3_bucket("a.b-c")
    for bad in ("ab", "a" * 64, "Idc", "a/b", "a..b", "a_b", "a b", "x?y", ""):
        assert not is_s3_bucket(bad), bad


# ----------------------------------------------------------------------------- .tcia (item 6)


def test_uid_above_the_marker_is_reported_and_ignored() -> None:
    text = ("downloadServerUrl=https://h/nbia-download/servlet/DownloadServlet\n"
            "includeAnnotation=true\nnoOfrRetry=4\ndatabasketId=m.tcia\nmanifestVersion=3.0\n"
            f"{U1}\nListOfSeriesToDownload=\n{U2}\n")
    m = parse_manifest(text, source="m.tcia")
    assert m.series_uids == (U2,)
    assert m.skipped == ("line 6: a series UID above ListOfSeriesToDownload=; it is ignored, "
                         "as the Java retriever does",)
    assert m.retries == 4


def test_uid_above_the_marker_on_the_first_line() -> None:
    m = parse_manifest(f"{U1}\nListOfSeriesToDownload=\n{U2}\n", source="m.tcia")
    assert (m.kind, m.series_uids) == ("tcia", (U2,))
    assert m.skipped[0].startswith("line 1: a series UID above ListOfSeriesToDownload=")
    err = error_of(f"{U1}\nnot a uid\n", source="l.txt")  # a list with a bad line: as before
    assert (err.line, err.source) == (2, "l.txt")


def test_without_a_marker_the_list_still_starts_at_the_first_uid() -> None:
    m = parse_manifest(f"noOfrRetry=2\n{U1}\n{U2}\n")
    assert (m.series_uids, m.skipped) == ((U1, U2), ())


def test_column_header_lines_right_after_the_marker_are_skipped() -> None:
    m = parse_manifest(f"noOfrRetry=2\nListOfSeriesToDownload=\nSeries ID\n\n{U1}\n{U2}\n",
                       source="m.tcia")
    assert m.series_uids == (U1, U2)
    assert m.skipped == ("line 3: 'Series ID' holds no series UID (a column header?); "
                         "skipped, as the Java retriever does",)


def test_a_wordy_line_among_the_uids_is_still_an_error() -> None:
    err = error_of(f"ListOfSeriesToDownload=\n{U1}\nSeries ID\n{U2}\n", source="m.tcia")
    assert (err.line, err.source) == (3, "m.tcia")
    # only a header: no series, said as before
    assert "no series listed" in str(error_of("ListOfSeriesToDownload=\nSeries ID\n"))


def test_sheets_of_other_systems_are_read_as_files() -> None:
    """DRS and PathDB sheets are read (issue 24; tests/test_manifest_files.py has the
    rest): no longer refused as sheets of other systems."""
    drs = parse_manifest("name,drs_uri,File ID\nx,drs://h/dg.4DFC/1,dg.4DFC/1\n", source="d.csv")
    assert (drs.kind, [f.uri for f in drs.files]) == ("drs", ["drs://h/dg.4DFC/1"])
    err = error_of("guid\tsize\nabc\t1\n")
    assert "no file listed in column 'guid'" in str(err) and "not a DRS URI" in str(err)
    pathdb = parse_manifest("collectionName;imageUrl\nP;http://x/1.tiff\n")
    assert (pathdb.kind, pathdb.files[0].collection) == ("pathdb", "P")


# ----------------------------------------------------------------------------- properties

_uuids = st.uuids().map(str)
_buckets = st.sampled_from(["idc-open-data", "idc-open-data-two", "idc-open-data-cr", "b.c-9"])
_flags = st.lists(st.sampled_from(["--show-progress", "--size-only", "--concurrency 4",
                                   "--no-clobber", "-n", "--exclude '*.txt'"]), max_size=3)
_dests = st.sampled_from([".", "./out", '"my dir/a b"', "'x y'", "/abs/path/", "C:/data"])
_tails = st.sampled_from(["/*", "/", ""])
_spaces = st.sampled_from([" ", "  ", "\t", " \t "])


@st.composite
def _command(draw: st.DrawFn) -> tuple[str, str]:
    folder = draw(_uuids)
    uri = f"s3://{draw(_buckets)}/{folder}{draw(_tails)}"
    gap = draw(_spaces)
    if draw(st.booleans()):
        line = uri
    else:
        verb = draw(st.sampled_from(["cp", "sync"]))
        line = gap.join([verb, *draw(_flags), uri, draw(_dests)])
    return line, folder


@settings(max_examples=150, deadline=None)
@given(st.lists(_command(), min_size=1, max_size=12),
       st.lists(st.sampled_from(["", "# a comment", "   ", "# s5cmd run x.s5cmd"]), max_size=4),
       st.sampled_from(["\n", "\r\n"]))
def test_grammar_round_trip(commands: list[tuple[str, str]], noise: list[str], eol: str) -> None:
    lines = [*noise, *(line for line, _ in commands)]
    m = parse_manifest(eol.join(lines) + eol, source="p.s5cmd")
    expected = list(dict.fromkeys(folder for _, folder in commands))
    assert list(m.crdc_uuids) == expected
    assert m.duplicates_dropped == len(commands) - len(expected)
    assert m.skipped == ()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=60),
                          st.builds(lambda c: c[0], _command()),
                          st.sampled_from(["cp", "sync x", "s3://", "cp s3://", "gs://a/b",
                                           "cp s3:///x/*", '"', "cp '"])),
                max_size=8))
def test_parser_never_raises_anything_but_manifest_error(lines: list[str]) -> None:
    try:
        m = parse_manifest("\n".join(lines), source="f.s5cmd", kind="s5cmd")
    except ManifestError as exc:
        assert str(exc).startswith("f.s5cmd")
        return
    assert all(is_crdc_uuid(u) for u in m.crdc_uuids)
    assert all("\n" not in r for r in m.skipped)


def test_plain_and_mixed_files_read_alike() -> None:
    """The whole-text fast path (plain lines only) and the line reader agree."""
    folders = [str(uuid.UUID(int=i * 7919)) for i in range(2000)]
    plain = "# IDC\n\n" + "\n".join(f"cp s3://idc-open-data/{f}/* ." for f in folders) + "\n"
    fast = parse_manifest(plain + f"cp s3://idc-open-data/{folders[0]}/* x\n")
    slow = parse_manifest(plain + "  # an indented comment: the line reader\n")
    assert fast.crdc_uuids == slow.crdc_uuids == tuple(folders)
    assert (fast.duplicates_dropped, slow.duplicates_dropped) == (1, 0)
    for bad in (f"cp s3://a..b/{A}/* .", f"cp s3://idc-open-data/{A}/* 'x"):
        m = parse_manifest(f"cp s3://idc-open-data/{B}/* .\n{bad}\n")
        assert m.crdc_uuids == ((B,) if ".." in bad else (B, A))
        assert len(m.skipped) == (1 if ".." in bad else 0)
