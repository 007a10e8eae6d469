"""DRS and PathDB sheets (issue 24): CSV/TSV/XLSX rows with a ``drs_uri`` (``File ID``,
``guid``...) or ``imageUrl`` column read into ``Manifest.files``, by the Go retriever's
column aliases (its spreadsheets_test.go cases among them), normalised, checked cell by
cell (a bad row is skipped with its line, never the whole sheet), mixed sheets routed row
by row. The real sheets are in test_real_manifests.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbia_retriever.errors import ManifestError
from nbia_retriever.manifest import MAX_SKIPPED, Manifest, parse_manifest, read_manifest
from nbia_retriever.models import DEFAULT_DRS_HOST, FileItem
from nbia_retriever.untrusted import host_entry

U1 = "1.3.6.1.4.1.14519.5.2.1.1.11264150075058686628760053282497113997"
U2 = "1.3.6.1.4.1.9328.50.1.2"
ID = "dg.4DFC/e0ae9672-7d35-4f85-a05e-68735c6bad95"
URI = f"drs://{DEFAULT_DRS_HOST}/{ID}"
SLIDE = "https://pathdb.cancerimagingarchive.net/index.php/system/files/wsi/CMB-MML/MSB-1.svs"


def parse(text: str, source: str = "s.csv") -> Manifest:
    return parse_manifest(text, source=source)


def error_of(text: str, source: str = "s.csv") -> ManifestError:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, source=source)
    return info.value


def only(manifest: Manifest) -> FileItem:
    assert len(manifest.files) == 1, manifest
    return manifest.files[0]


# ----------------------------------------------------------------------------- columns


@pytest.mark.parametrize("header", ["drs_uri", "DRS URI", "File ID", "file_id", "GUID", "guid",
                                    "file_guid", "drs guid", "access", "\"Drs-Uri\""])
def test_drs_column_aliases_of_the_go_retriever(header: str) -> None:
    m = parse(f"{header},participant id,name\n{ID},PT-1,example.dcm\n")
    item = only(m)
    assert (m.kind, item.kind, item.uri, item.key) == ("drs", "drs", URI, URI)
    assert (item.patient_id, item.name, item.line, item.object_id) == ("PT-1", "example.dcm",
                                                                       2, ID)
    assert m.series_uids == ()


@pytest.mark.parametrize(("patient", "study"), [("subject", "studyid"), ("Subject ID", "Study UID"),
                                                ("patient_id", "StudyInstanceUID"),
                                                ("Patient", "study_uid")])
def test_patient_and_study_aliases(patient: str, study: str) -> None:
    item = only(parse(f"file_id\t{patient}\t{study}\ndg.4DFC/series-1\tSUBJ-1\tSTUDY-1\n"))
    assert (item.patient_id, item.study_uid, item.uri) == (
        "SUBJ-1", "STUDY-1", f"drs://{DEFAULT_DRS_HOST}/dg.4DFC/series-1")


def test_every_descriptive_column_and_checks() -> None:
    text = ("Collection Name;Subject ID;Study Date;study_short_name;Modality;file_size_bytes;"
            "MD5SUM;file name;wsiImageUrl\n"
            f"CMB-MML;MSB-1;2020-01-02;CMB;SM;1093429245;{'AB' * 16};slide.svs;{SLIDE}\n")
    m = parse(text)
    item = only(m)
    assert m.kind == "pathdb"
    assert (item.kind, item.uri, item.key, item.name, item.collection, item.patient_id,
            item.study_date, item.study_description, item.modality, item.size, item.md5) == (
        "url", SLIDE, SLIDE, "slide.svs", "CMB-MML", "MSB-1", "2020-01-02", "CMB", "SM",
        1093429245, "ab" * 16)
    assert item.host == "pathdb.cancerimagingarchive.net"
    assert m.skipped == ()


@pytest.mark.parametrize(("size_header", "md5_header"), [("File Size", "Md5sum"),
                                                         ("file_size_bytes", "md5sum"),
                                                         ("size", "md5")])
def test_size_and_md5_aliases(size_header: str, md5_header: str) -> None:
    item = only(parse(f"imageUrl,{size_header},{md5_header}\n{SLIDE},49150,{'0f' * 16}\n"))
    assert (item.size, item.md5) == (49150, "0f" * 16)


def test_the_first_listed_alias_wins_row_by_row() -> None:
    """CTDC gives ``drs_uri`` and ``File ID`` (the Go code took the last column); a row
    whose first choice is empty takes the next one."""
    text = (f"File ID,drs_uri,name\n{ID},drs://other.example.org/dg.4DFC/1,a\n"
            f"{ID},,b\n")
    m = parse(text)
    assert [f.uri for f in m.files] == ["drs://other.example.org/dg.4DFC/1", URI]


def test_a_trailing_delimiter_on_a_data_row_is_tolerated() -> None:
    m = parse("GUID,name,collection\ndg.4DFC/series-one,one.dcm,COLL,\n"
              "dg.4DFC/series-two,two.dcm,COLL\n\n")
    assert [(f.name, f.collection) for f in m.files] == [("one.dcm", "COLL"),
                                                        ("two.dcm", "COLL")]
    assert m.skipped == ()


def test_a_sheet_without_any_known_column_names_them_all() -> None:
    err = error_of("foo,bar\n1,2\n", source="x.csv")
    assert err.line == 1
    assert str(err) == ("x.csv:1: spreadsheet without a 'drs_uri', 'imageUrl', "
                        "'SeriesInstanceUID' or 'Series UID' column: 'foo,bar'")
    assert "drs_uri or imageUrl" in str(error_of("<html>\n<body>\n"))


def test_access_is_read_only_where_nothing_else_could_be() -> None:
    """``access`` is a DRS id in the Go tests, an access level elsewhere."""
    series = parse(f"SeriesInstanceUID,access\n{U1},Public\n{U2},open\n")
    assert (series.kind, series.series_uids, series.files) == ("csv", (U1, U2), ())
    m = parse(f"drs_uri,access,name\n{URI},open,a\n,controlled,b\n")
    assert [f.uri for f in m.files] == [URI]
    assert m.skipped == ("line 3: no 'drs_uri' value; row skipped",)
    assert only(parse(f"access\n{ID}\n")).uri == URI


# ----------------------------------------------------------------------------- normalisation


def test_drs_uris_are_normalised() -> None:
    upper = "dg.4DFC/870175D4-EE9A-4A64-BF7A-6CDDB18C22BD"
    text = (f"drs_uri\n{ID}\nDRS://NCI-CRDC.DataCommons.IO/{upper}\n"
            "8f1c2a34-5b6d-4e7f-8a9b-0c1d2e3f4a5b\n"
            "drs://127.0.0.1:8443/dg.4DFC/x\n  drs://h.example/a%2Fb  \n")
    assert [f.uri for f in parse(text).files] == [
        URI, f"drs://nci-crdc.datacommons.io/{upper}",
        f"drs://{DEFAULT_DRS_HOST}/8f1c2a34-5b6d-4e7f-8a9b-0c1d2e3f4a5b",
        "drs://127.0.0.1:8443/dg.4DFC/x", "drs://h.example/a%2Fb"]


def test_an_international_drs_host_is_kept_in_its_ascii_form() -> None:
    item = only(parse(f"drs_uri\ndrs://nci-crdc.datacommons.i\u043e/{ID}\n"))
    assert item.host.startswith("nci-crdc.datacommons.xn--")


BAD_DRS = [
    ("http://example.org/file.pdf", "is an http(s) URL, not a DRS URI"),
    ("s3://bucket/key", "is not a DRS URI"),
    ("drs:dg.4DFC/x", "is not a DRS URI"),
    ("drs://", "names no host"),
    ("drs://h.example", "names no object"),
    ("drs://h.example/", "names no object"),
    ("drs://evil@h.example/dg.4DFC/x", "names a user before its host"),
    ("drs://dg.4DFC:8f1c2a34", "is a compact DRS id"),
    ("drs://h.example/../../user/credentials/api", "characters no DRS id holds"),
    ("drs://h.example/dg.4DFC/%2e%2e/x", "characters no DRS id holds"),
    ("drs://h.example/a?x=1", "characters no DRS id holds"),
    ("drs://h.exa mple/a", "holds a space"),
    ("dg.4DFC/a b", "holds a space"),
    ("dg.4DFC/a\x1b[2Jb", "holds a control character"),
    ("drs://h_.example\u202e/a", "holds a control character"),
    ("drs://h..example/a", "has a host that has an empty label"),
    ("open", "is not a DRS URI or id"),
    ("=cmd|' /C calc'!A0", "holds a space"),
    ("=SUM(A1)", "is not a DRS URI or id"),
    ("x" * 3000, "is longer than 2,048 characters"),
]


@pytest.mark.parametrize(("cell", "why"), BAD_DRS, ids=[c[:30] for c, _ in BAD_DRS])
def test_a_bad_drs_cell_skips_its_row_with_the_line_and_why(cell: str, why: str) -> None:
    quoted = '"' + cell.replace('"', '""') + '"'
    m = parse(f"name,drs_uri\na,{URI}\nb,{quoted}\n")
    assert [f.name for f in m.files] == ["a"]
    (reason,) = m.skipped
    assert reason.startswith("line 3: 'drs_uri' ") and reason.endswith("; row skipped")
    assert why in reason
    assert reason.isprintable() and "evil" not in reason  # no escape, no user name shown


BAD_URLS = [
    ("ftp://h.example/a.svs", "is not an http(s) URL"),
    ("javascript:alert(1)", "is not an http(s) URL"),
    ("pathdb.example.org/a.svs", "is not an http(s) URL"),
    ("http:///a.svs", "names no host"),
    ("https://user:secret@h.example/a.svs", "holds a user name or password"),
    ("https://h.example:99999/a.svs", "is not a valid URL"),
    ("https://h.example/a b.svs", "holds a space"),
    ("https://h.example\\@evil.example/a.svs", "holds a backslash"),
    ("=HYPERLINK(\"http://evil.example\")", "is not an http(s) URL"),
]


@pytest.mark.parametrize(("cell", "why"), BAD_URLS, ids=[c[:30] for c, _ in BAD_URLS])
def test_a_bad_image_url_skips_its_row(cell: str, why: str) -> None:
    quoted = '"' + cell.replace('"', '""') + '"'
    m = parse(f"imageUrl,collectionName\n{SLIDE},C\n{quoted},C\n", source="p.csv")
    assert [f.uri for f in m.files] == [SLIDE]
    (reason,) = m.skipped
    assert reason.startswith("line 3: 'imageUrl' ") and why in reason
    assert "secret" not in reason


def test_image_urls_are_normalised_and_named_by_their_last_segment() -> None:
    text = ("imageUrl\nHTTPS://PathDB.Example.ORG:8443/wsi/My%20Slide.svs?v=2#frag\n"
            "http://h.example/a/b/\nhttp://h.example\nhttp://h.example/%1b%5b2J.svs\n")
    m = parse(text)
    assert [(f.uri, f.name) for f in m.files] == [
        ("https://pathdb.example.org:8443/wsi/My%20Slide.svs?v=2", "My Slide.svs"),
        ("http://h.example/a/b/", "b"), ("http://h.example/", "h.example"),
        ("http://h.example/%1b%5b2J.svs", "[2J.svs")]


def test_names_come_from_the_sheet_else_the_uri_and_stay_plain_strings() -> None:
    """A name is the sheet's string (layout makes it safe), without control characters:
    ``../`` stays a name here, a formula stays text (files.csv defuses it)."""
    text = ("drs_uri,name,collection\n"
            f"{ID},../../etc/passwd,C\n"
            "dg.4DFC/b,=cmd|' /C calc'!A0,\x1b[2JC\n"
            "drs://h.example/dg.4DFC/c%2Fd,,\n"
            "drs://h.example/dg.4DFC/e,   ,\n")
    m = parse(text)
    assert [(f.name, f.collection) for f in m.files] == [
        ("../../etc/passwd", "C"), ("=cmd|' /C calc'!A0", "[2JC"), ("d", ""), ("e", "")]
    assert m.skipped == ()


_pieces = st.sampled_from(["drs://", "http://", "https://", "dg.4DFC/", "h.example", "/",
                            "..", ".", "@", ":", "%2e", "%2F", "?", "#", " ", "\x1b", "[::1]",
                            "8443", "a", "\u0430", "\\", "=", "\u202e", "zip", "1.2.3"])
_cells = st.lists(_pieces | st.text(max_size=6), max_size=10).map("".join)


def _quoted(cell: str) -> str:
    return '"' + cell.replace('"', '""') + '"'


@settings(max_examples=400, deadline=None)
@given(cells=st.lists(_cells, min_size=1, max_size=6), column=st.sampled_from(["drs_uri",
                                                                              "imageUrl"]))
def test_any_uri_cell_is_a_clean_file_or_a_skipped_line(cells: list[str], column: str) -> None:
    """Whatever a URI cell holds, the row is a file whose URI is in the one normal form
    (no user name, no ``.``/``..`` object path, no space or control character, a host as
    hosts are compared) or a skipped line; never anything else."""
    text = f"{column},name\n" + "".join(f"{_quoted(c)},n\n" for c in cells)
    try:
        m = parse(text)
    except ManifestError as exc:
        assert "\n" not in str(exc) and "no file listed" in str(exc)
        return
    assert all(reason.isprintable() for reason in m.skipped)
    for item in m.files:
        scheme, _, rest = item.uri.partition("://")
        assert scheme == ("drs" if column == "drs_uri" else scheme) and item.uri.isprintable()
        assert scheme in (("drs",) if column == "drs_uri" else ("http", "https"))
        authority = rest.partition("/")[0]
        assert "@" not in authority and " " not in item.uri and "\\" not in item.uri
        assert host_entry(authority) == authority
        if item.kind == "drs":
            assert item.object_id and not {".", ".."} & set(item.object_id.split("/"))
            assert "?" not in item.object_id and "#" not in item.object_id
        assert item.name == "n"  # the name column's
        assert item.key == item.uri or f"/{item.key}.zip" in item.uri.lower()
    assert len(m.files) + len(m.skipped) + m.duplicates_dropped == len(cells) or \
        len(m.skipped) == MAX_SKIPPED


# ----------------------------------------------------------------------------- keys


def test_a_dicom_series_zip_is_keyed_by_its_uid() -> None:
    long_uid = "1." + "2" * 63  # 65 characters: no DICOM UID
    text = ("drs_uri,name\n"
            f"drs://h.example/dg.4DFC/a,{U1}.zip\n"  # General Commons' naming
            f"drs://h.example/dg.4DFC/{U2}.ZIP,\n"  # the URI's last segment
            f"drs://h.example/dg.4DFC/c,{U1}.zip.txt\n"
            f"drs://h.example/dg.4DFC/d,{long_uid}.zip\n")
    files = parse(text).files
    assert [f.key for f in files] == [U1, U2, "drs://h.example/dg.4DFC/c",
                                     "drs://h.example/dg.4DFC/d"]
    assert [f.is_series for f in files] == [True, True, False, False]
    assert files[1].name == f"{U2}.ZIP"


def test_duplicates_by_key_are_dropped_and_counted() -> None:
    text = (f"drs_uri,name\n{URI},a\n{ID},b\n"  # the same object twice
            f"drs://h.example/x,{U1}.zip\ndrs://h.example/y,{U1}.zip\n"  # one series twice
            f"drs://h.example/z,c\n")
    m = parse(text)
    assert [(f.name, f.line) for f in m.files] == [("a", 2), (f"{U1}.zip", 4), ("c", 6)]
    assert m.duplicates_dropped == 2


def test_file_by_key() -> None:
    m = parse(f"drs_uri,name\n{URI},a\ndrs://h.example/x,{U1}.zip\n")
    table = m.file_by_key()
    assert table == {URI: m.files[0], U1: m.files[1]}
    assert m.file_by_key() is table
    assert parse_manifest(f"{U1}\n").file_by_key() == {}


# ----------------------------------------------------------------------------- sizes, MD5s


def test_a_bad_size_or_md5_keeps_the_row_with_a_warning() -> None:
    text = ("drs_uri,File Size,md5sum\n"
            f"dg.4DFC/a,abc,{'a' * 31}\n"
            "dg.4DFC/b,-5,\n"
            "dg.4DFC/c,1.5,zz\n"
            f"dg.4DFC/d,49150.0,{'A' * 32}\n"
            "dg.4DFC/e,,\n")
    m = parse(text)
    assert [(f.size, f.md5) for f in m.files] == [(None, None), (None, None), (None, None),
                                                  (49150, "a" * 32), (None, None)]
    assert m.skipped == (
        "line 2: 'File Size' 'abc' is not a size in bytes; the row is kept, its size unchecked",
        f"line 2: 'md5sum' '{'a' * 31}' is not an MD5 (32 hex digits); the row is kept, its "
        "MD5 unchecked",
        "line 3: 'File Size' '-5' is not a size in bytes; the row is kept, its size unchecked",
        "line 4: 'File Size' '1.5' is not a size in bytes; the row is kept, its size unchecked",
        "line 4: 'md5sum' 'zz' is not an MD5 (32 hex digits); the row is kept, its MD5 "
        "unchecked",
    )


# ----------------------------------------------------------------------------- mixed sheets


def test_a_mixed_sheet_routes_row_by_row() -> None:
    text = ("Collection,SeriesInstanceUID,drs_uri,name\n"
            f"C,{U1},,\n"  # a series
            f"C,,{ID},report.pdf\n"  # a file
            f"C,{U2},drs://h.example/dg.4DFC/s,{U2}.zip\n"  # a URI: a file (the series zip)
            f"C,{U1},,\n"  # the series again
            "C,,,\n"  # neither
            f"C,{U2},,\n")  # a series that is already a file's key
    m = parse(text)
    assert m.kind == "drs"
    assert m.series_uids == (U1,)
    assert [(f.key, f.line) for f in m.files] == [(URI, 3), (U2, 4)]
    assert m.duplicates_dropped == 2
    assert m.skipped == ("line 6: no 'drs_uri' or 'SeriesInstanceUID' value; row skipped",)


def test_a_mixed_sheet_still_refuses_a_bad_series_uid() -> None:
    err = error_of(f"Series UID\tdrs_uri\n{U1}\t\nnot-a-uid\t\n")
    assert (err.line, err.problem) == (3, "not a DICOM UID: 'not-a-uid'")


def test_drs_and_image_url_columns_together() -> None:
    m = parse(f"drs_uri,imageUrl\n{ID},\n,{SLIDE}\n{ID}x,{SLIDE}\n")
    assert m.kind == "drs"
    assert [f.kind for f in m.files] == ["drs", "url", "drs"]


# ----------------------------------------------------------------------------- whole sheets


def test_a_sheet_whose_every_row_is_bad_is_an_error_naming_the_first() -> None:
    err = error_of("name,drs_uri\na,http://x.example/a\nb,http://x.example/b\n")
    assert err.line == 1
    assert err.problem == ("no file listed in column 'drs_uri'; line 2: 'drs_uri' "
                           "'http://x.example/a' is an http(s) URL, not a DRS URI "
                           "(drs://HOST/ID); row skipped")
    assert "no file listed in column 'imageUrl'" in str(error_of("imageUrl\n"))


def test_skipped_reasons_are_capped() -> None:
    rows = "".join(f"http://x.example/{i}\n" for i in range(150))
    m = parse(f"drs_uri\n{rows}{ID}\n")
    assert len(m.files) == 1
    assert len(m.skipped) == MAX_SKIPPED
    assert m.skipped[-1] == f"{150 - MAX_SKIPPED + 1} more lines skipped"


def test_line_numbers_follow_quoted_cells_that_span_lines() -> None:
    text = 'name,drs_uri,note\na,dg.4DFC/a,"two\nlines"\n\nb,dg.4DFC/b,x\n'
    assert [(f.name, f.line) for f in parse(text).files] == [("a", 2), ("b", 5)]


def test_a_file_on_disk_with_a_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "drs.csv"
    path.write_bytes(f"\ufeffname,drs_uri\r\na.pdf,{ID}\r\n".encode())
    m = read_manifest(path)
    assert (m.kind, only(m).name, m.source, m.root_name) == ("drs", "a.pdf", str(path), "drs")


def test_a_large_sheet_is_read_in_full() -> None:
    """100,000 rows, one pass (linear: each row read once, no per-row rescans)."""
    rows = "".join(f"drs://h.example/dg.4DFC/{i:08d},f{i}.pdf,{i},{i:032x}\n"
                   for i in range(100_000))
    m = parse("drs_uri,name,file_size_bytes,md5sum\n" + rows)
    assert len(m.files) == 100_000
    assert (m.files[-1].line, m.files[-1].size, m.files[-1].md5) == (100_001, 99_999,
                                                                     f"{99_999:032x}")
    assert len(m.file_by_key()) == 100_000


# ----------------------------------------------------------------------------- xlsx

needs_openpyxl = pytest.mark.skipif(importlib.util.find_spec("openpyxl") is None,
                                    reason="openpyxl is not installed")


@needs_openpyxl
def test_an_xlsx_drs_sheet(tmp_path: Path) -> None:
    import datetime

    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["Files of the cohort"])  # a title row above the header
    sheet.append([])
    sheet.append(["drs_uri", "name", "File Size", "Study Date", "SeriesInstanceUID"])
    sheet.append([ID, "a.pdf", 49150, datetime.datetime(2020, 1, 2), None])
    sheet.append([f"drs://h.example/{ID}", f"{U1}.zip", 1.5e3, None, None])
    sheet.append(["http://x.example/a", "b.pdf", None, None, None])
    sheet.append([None, None, None, None, U2])
    path = tmp_path / "drs.xlsx"
    book.save(path)
    m = read_manifest(path)
    assert (m.kind, m.series_uids) == ("drs", (U2,))
    assert [(f.key, f.size, f.study_date, f.line) for f in m.files] == [
        (URI, 49150, "2020-01-02", 4), (U1, 1500, "", 5)]
    assert m.skipped == ("line 6: 'drs_uri' 'http://x.example/a' is an http(s) URL, not a "
                         "DRS URI (drs://HOST/ID); row skipped",)
    sheet.append([None, None, None, None, 1.2])  # a UID Excel turned into a number
    book.save(path)
    with pytest.raises(ManifestError, match="as text") as info:
        read_manifest(path)
    assert info.value.line == 8


@needs_openpyxl
def test_an_xlsx_without_a_known_column(tmp_path: Path) -> None:
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["foo", "bar"])
    path = tmp_path / "x.xlsx"
    book.save(path)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert str(info.value) == (f"{path}: first sheet without a 'drs_uri', 'imageUrl', "
                               "'SeriesInstanceUID' or 'Series UID' column")
