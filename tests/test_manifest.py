"""Manifest reading and writing: every tolerated quirk, every refusal, and the round trip."""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbia_retriever.errors import ManifestError, NbiaError
from nbia_retriever.manifest import (
    DEFAULT_DOWNLOAD_URL,
    Manifest,
    api_base_from_download_url,
    format_manifest,
    is_valid_uid,
    parse_manifest,
    read_manifest,
    write_manifest,
)

U1 = "1.3.6.1.4.1.14519.5.2.1.48822327301563949480198360763011173678"
U2 = "1.3.6.1.4.1.14519.5.2.1.74640583883665924899120840733688469127"
U3 = "1.3.6.1.4.1.14519.5.2.1.1"

REAL = f"""downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet
includeAnnotation=true
noOfrRetry=4
databasketId=manifest-1724796815128.tcia
manifestVersion=3.0
ListOfSeriesToDownload=
{U1}
{U2}
"""


def tcia(*body: str, header: str = "") -> str:
    return header + "ListOfSeriesToDownload=\n" + "\n".join(body) + "\n"


def error_of(text: str, source: str = "m.tcia") -> ManifestError:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, source=source)
    return info.value


# ----------------------------------------------------------------------------- .tcia


def test_real_manifest() -> None:
    m = parse_manifest(REAL, source="manifest-1724796815128.tcia")
    assert m.series_uids == (U1, U2)
    assert m.headers == {
        "downloadServerUrl": DEFAULT_DOWNLOAD_URL,
        "includeAnnotation": "true",
        "noOfrRetry": "4",
        "databasketId": "manifest-1724796815128.tcia",
        "manifestVersion": "3.0",
    }
    assert m.download_server_url == DEFAULT_DOWNLOAD_URL
    assert m.retries == 4
    assert m.databasket_id == "manifest-1724796815128.tcia"
    assert m.version == "3.0"
    assert m.include_annotation is True
    assert m.root_name == "manifest-1724796815128"
    assert m.duplicates_dropped == 0
    assert m.kind == "tcia"
    assert m.source == "manifest-1724796815128.tcia"


def test_bom_crlf_blank_lines_spaces_commas_comments_and_marker_case() -> None:
    text = (
        "\ufeff# saved by hand\r\n"
        "  downloadServerUrl = https://h/nbia-download/servlet/DownloadServlet  \r\n"
        "noOfrRetry=7,\r\n"
        "\r\n"
        "  listofseriestodownload=  \r\n"
        f"  {U1} ,,\r\n"
        "\r\n"
        "# a comment between UIDs\r\n"
        f"{U2}\t\r\n"
        f"{U3} # trailing comment\r\n"
    )
    m = parse_manifest(text)
    assert m.series_uids == (U1, U2, U3)
    assert m.download_server_url == "https://h/nbia-download/servlet/DownloadServlet"
    assert m.retries == 7
    assert list(m.headers) == ["downloadServerUrl", "noOfrRetry"]


def test_lone_cr_line_endings() -> None:
    assert parse_manifest(REAL.replace("\n", "\r")).series_uids == (U1, U2)


def test_unknown_header_keys_kept_verbatim() -> None:
    m = parse_manifest(tcia(U1, header="FutureKey=Some Value\nNOOFRRETRY=2\n"))
    assert m.headers == {"FutureKey": "Some Value", "NOOFRRETRY": "2"}
    assert m.retries == 2  # looked up case-insensitively when the exact key is absent


def test_java_properties_escapes_are_undone() -> None:
    m = parse_manifest(tcia(U1, header="downloadServerUrl=https\\://h/x\\=y\\\\z\n"))
    assert m.download_server_url == "https://h/x=y\\z"


def test_hash_inside_a_header_value_is_not_a_comment() -> None:
    m = parse_manifest(tcia(U1, header="downloadServerUrl=https://h/a#b\n"))
    assert m.download_server_url == "https://h/a#b"


def test_duplicates_dropped_keep_first_order() -> None:
    m = parse_manifest(tcia(U2, U1, U2, U2, U1, U3))
    assert m.series_uids == (U2, U1, U3)
    assert m.duplicates_dropped == 3


def test_duplicates_dropped_on_slow_path_too() -> None:
    m = parse_manifest(tcia(U2, "# c", U1, U2 + " ,"))
    assert m.series_uids == (U2, U1)
    assert m.duplicates_dropped == 1


def test_defaults_without_headers() -> None:
    m = parse_manifest(tcia(U1))
    assert m.retries == 4
    assert m.download_server_url is None
    assert m.databasket_id is None
    assert m.version is None
    assert m.include_annotation is True
    assert m.root_name == "manifest"


def test_empty_retry_value_means_default() -> None:
    assert parse_manifest(tcia(U1, header="noOfrRetry=\n")).retries == 4


@pytest.mark.parametrize("value", ["x", "-1", "4.5", "four", "1e3", "٣"])
def test_bad_retry_value_names_file_and_line(value: str) -> None:
    err = error_of(tcia(U1, header=f"manifestVersion=3.0\nnoOfrRetry={value}\n"))
    assert err.source == "m.tcia"
    assert err.line == 2
    assert "noOfrRetry" in str(err)
    assert str(err).startswith("m.tcia:2: ")


def test_bad_include_annotation_value() -> None:
    err = error_of(tcia(U1, header="includeAnnotation=maybe\n"))
    assert err.line == 1
    assert parse_manifest(tcia(U1, header="includeAnnotation=FALSE\n")).include_annotation is False


def test_bad_header_on_hand_built_manifest_raises_manifest_error() -> None:
    m = Manifest(series_uids=(U1,), headers={"noOfrRetry": "lots"}, source="x")
    with pytest.raises(ManifestError, match="noOfrRetry"):
        _ = m.retries


@pytest.mark.parametrize(
    ("bad", "line"),
    [
        ("1.2.x", 3),
        ("1..2", 3),
        (".1.2", 3),
        ("1.2.", 3),
        ("12345", 3),  # a single component: row numbers, not UIDs
        ("1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19.20.21.22.23.24.25.26", 3),  # 65
        ("１.２", 3),  # full-width digits are digits to Python, not to DICOM
        ("<html><body>Error</body></html>", 3),
    ],
)
def test_line_that_is_not_a_uid(bad: str, line: int) -> None:
    err = error_of(tcia(U1, bad, U2))
    assert (err.source, err.line) == ("m.tcia", line)
    assert str(err).startswith(f"m.tcia:{line}: ")


def test_error_line_counts_crlf_and_bom_correctly() -> None:
    text = "\ufeffnoOfrRetry=4\r\nListOfSeriesToDownload=\r\n" + f"{U1}\r\n\r\nnope\r\n"
    assert error_of(text).line == 5


def test_uid_length_limit_is_64() -> None:
    uid64 = "1." + "2" * 62
    assert len(uid64) == 64
    assert parse_manifest(tcia(uid64)).series_uids == (uid64,)
    assert error_of(tcia(uid64 + "3")).line == 2


def test_leading_zero_components_accepted_but_not_strict() -> None:
    assert parse_manifest(tcia("1.02.3")).series_uids == ("1.02.3",)
    assert is_valid_uid("1.02.3")
    assert not is_valid_uid("1.02.3", strict=True)
    assert is_valid_uid("1.0.3", strict=True)
    assert is_valid_uid(U1, strict=True)


def test_no_series_is_an_error() -> None:
    assert "no series" in str(error_of(tcia(header="manifestVersion=3.0\n")))
    assert "no series" in str(error_of(""))
    assert "no series" in str(error_of("# only a comment\n\n"))
    assert "no series" in str(error_of(tcia("", "  ", "# nothing")))


def test_legacy_manifest_without_list_gets_a_hint() -> None:
    assert "legacy" in str(error_of(tcia(header="manifestVersion=2.0\n")))


def test_header_line_without_equals_is_an_error() -> None:
    err = error_of("downloadServerUrl=https://h/\ngarbage here\nListOfSeriesToDownload=\n" + U1)
    assert err.line == 2


def test_manifest_without_marker_starts_at_first_uid() -> None:
    m = parse_manifest(f"noOfrRetry=2\n{U1}\n{U2}\n")
    assert (m.series_uids, m.retries) == ((U1, U2), 2)


def test_uids_on_the_marker_line() -> None:
    assert parse_manifest(f"ListOfSeriesToDownload={U1},{U2}\n{U3}").series_uids == (U1, U2, U3)


# ----------------------------------------------------------------------------- lists, CSV


def test_plain_uid_list() -> None:
    m = parse_manifest(f"# my list\n{U1}\n\n{U2}\n{U1}\n", source="list.txt")
    assert m.series_uids == (U1, U2)
    assert m.kind == "list"
    assert m.headers == {}
    assert m.duplicates_dropped == 1
    assert m.root_name == "list"


def test_plain_list_bad_line() -> None:
    err = error_of(f"{U1}\n{U2}\nnot-a-uid\n", source="l.txt")
    assert (err.line, err.source) == (3, "l.txt")


def test_garbage_first_line_explains_the_accepted_formats() -> None:
    err = error_of("<!DOCTYPE html>\n<html>\n")
    assert err.line == 1
    assert "SeriesInstanceUID" in str(err)


@pytest.mark.parametrize("header", ["SeriesInstanceUID", "Series Instance UID", "Series UID",
                                    "series_instance_uid", "  SERIES UID "])
@pytest.mark.parametrize("delimiter", [",", "\t", ";"])
def test_spreadsheet_column(header: str, delimiter: str) -> None:
    rows = [["Collection", header, "Modality"], ["LIDC", U1, "CT"], ["LIDC", U2, "CT"],
            ["", "", ""], ["LIDC", U1, "CT"]]
    text = "\n".join(delimiter.join(r) for r in rows) + "\n"
    m = parse_manifest(text, source="s.csv")
    assert m.series_uids == (U1, U2)
    assert m.kind == "csv"
    assert m.duplicates_dropped == 1


def test_spreadsheet_quoted_fields_and_bad_row_line() -> None:
    text = f'"Subject, ID","Series UID"\r\n"a, b","{U1}"\r\n# note\r\n"c",oops\r\n'
    err = error_of(text, source="s.csv")
    assert (err.line, err.source) == (4, "s.csv")
    good = f'"Subject, ID","Series UID"\n"a, b","{U1}"\n"c","{U2}"\n'
    assert parse_manifest(good).series_uids == (U1, U2)


def test_spreadsheet_one_column() -> None:
    assert parse_manifest(f"SeriesInstanceUID\n{U1}\n{U2},\n").series_uids == (U1, U2)


def test_spreadsheet_without_uid_column() -> None:
    err = error_of("Collection,Patient ID\nLIDC,1\n")
    assert err.line == 1
    assert "column" in str(err)


def test_spreadsheet_with_header_only() -> None:
    assert "no series" in str(error_of("Collection,SeriesInstanceUID\n"))


# ----------------------------------------------------------------------------- files


def test_read_manifest_file_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "manifest-1.tcia"
    path.write_bytes(b"\xef\xbb\xbf" + REAL.replace("\n", "\r\n").encode())
    m = read_manifest(path)
    assert m.series_uids == (U1, U2)
    assert m.source == str(path)
    with pytest.raises(ManifestError, match="cannot read") as info:
        read_manifest(tmp_path / "missing.tcia")
    assert info.value.source == str(tmp_path / "missing.tcia")


def test_read_utf16_and_latin1_exports(tmp_path: Path) -> None:
    utf16 = tmp_path / "a.txt"
    utf16.write_bytes(f"Series UID\tNote\r\n{U1}\tok\r\n".encode("utf-16"))
    assert read_manifest(utf16).series_uids == (U1,)
    latin = tmp_path / "b.csv"
    latin.write_bytes(f"Series UID,Description\n{U2},Th\xe9r\xe8se\n".encode("latin-1"))
    assert read_manifest(latin).series_uids == (U2,)


def test_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.tcia"
    path.write_bytes(b"PK\x03\x04\x00\x00\xff\xfe\x00")
    with pytest.raises(ManifestError, match="binary"):
        read_manifest(path)


def test_xlsx_without_openpyxl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # makes the import fail
    path = tmp_path / "s.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(ManifestError, match="openpyxl") as info:
        read_manifest(path)
    assert "CSV" in str(info.value)
    assert info.value.source == str(path)


def test_xlsx_with_openpyxl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reading logic, against a stand-in for openpyxl's read-only API."""
    rows = [("Title of the export", None), (None, None), ("Collection", "Series Instance UID"),
            ("LIDC", U1), ("LIDC", None), ("LIDC", U1), ("LIDC", U2)]
    closed: list[bool] = []

    class Sheet:
        def iter_rows(self, values_only: bool) -> object:
            assert values_only
            return iter(rows)

    class Book:
        active = Sheet()
        worksheets = (active,)

        def close(self) -> None:
            closed.append(True)

    fake = types.SimpleNamespace(load_workbook=lambda path, read_only, data_only: Book())
    monkeypatch.setitem(sys.modules, "openpyxl", fake)
    path = tmp_path / "s.xlsx"
    m = read_manifest(path)
    assert (m.series_uids, m.duplicates_dropped, m.kind) == ((U1, U2), 1, "xlsx")
    assert closed == [True]
    rows.append(("LIDC", 1.5))  # a UID that Excel turned into a number
    with pytest.raises(ManifestError, match="as text") as info:
        read_manifest(path)
    assert info.value.line == len(rows)
    rows[-1] = ("LIDC", "1.2.x")
    with pytest.raises(ManifestError, match="not a DICOM UID") as info:
        read_manifest(path)
    assert info.value.line == len(rows)


def test_write_manifest_defaults_basket_to_file_name(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "manifest-42.tcia", [U1, U2, U1], retries=2,
                          include_annotation=False)
    m = read_manifest(path)
    assert m.series_uids == (U1, U2)
    assert m.databasket_id == "manifest-42.tcia"
    assert m.root_name == "manifest-42"
    assert (m.retries, m.include_annotation, m.version) == (2, False, "3.0")
    assert m.download_server_url == DEFAULT_DOWNLOAD_URL
    assert path.read_text(encoding="utf-8").splitlines()[5] == "ListOfSeriesToDownload="
    assert [p.name for p in tmp_path.iterdir()] == ["manifest-42.tcia"]  # no temp left


def test_write_manifest_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a DICOM UID") as info:
        write_manifest(tmp_path / "m.tcia", [U1, "x"])
    assert info.value.source == str(tmp_path / "m.tcia")
    with pytest.raises(ManifestError, match="no series"):
        write_manifest(tmp_path / "m.tcia", [])
    with pytest.raises(ManifestError, match="retries"):
        format_manifest([U1], retries=-1)
    with pytest.raises(ManifestError, match="span lines"):
        format_manifest([U1], download_server_url="http://h/\nnoOfrRetry=9")
    with pytest.raises(ManifestError, match="own argument"):
        format_manifest([U1], extra_headers={"noofrretry": "9"})
    with pytest.raises(ManifestError, match="cannot be written"):
        format_manifest([U1], extra_headers={"listOfSeriesToDownload": ""})
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- round trip

_uid = st.lists(
    st.integers(min_value=0, max_value=10**12).map(str), min_size=2, max_size=6
).map(".".join).filter(lambda u: len(u) <= 64)
_HEADER_CHARS = [*"aZ09 _-.:#!\\=,\t", "é", "\u00a0", "\u2028", "\x0b", "\ufeff", "☃"]
_KEY_CHARS = [c for c in _HEADER_CHARS if c not in "=\\"]
_key = st.lists(st.sampled_from(_KEY_CHARS), min_size=1, max_size=10).map("".join).filter(
    lambda k: k == k.strip() and k != ""
    and k[0] not in "#!\ufeff" and k.lower() != "listofseriestodownload"
    and k.casefold() not in {"downloadserverurl", "includeannotation", "noofrretry",
                             "databasketid", "manifestversion"}
)
_value = st.lists(st.sampled_from(_HEADER_CHARS), max_size=20).map("".join).map(
    str.strip).filter(lambda v: not v.endswith(","))


@settings(max_examples=200, deadline=None)
@given(
    uids=st.lists(_uid, min_size=1, max_size=15),
    extra=st.dictionaries(_key, _value, max_size=4),
    retries=st.integers(min_value=0, max_value=1000),
    include=st.booleans(),
    basket=st.none() | _value,
    url=_value,
)
def test_format_then_parse_round_trips(uids: list[str], extra: dict[str, str], retries: int,
                                       include: bool, basket: str | None, url: str) -> None:
    text = format_manifest(uids, download_server_url=url, include_annotation=include,
                           retries=retries, databasket_id=basket, extra_headers=extra)
    m = parse_manifest(text)
    assert m.series_uids == tuple(dict.fromkeys(uids))
    expected = {"downloadServerUrl": url, "includeAnnotation": "true" if include else "false",
                "noOfrRetry": str(retries)}
    if basket is not None:
        expected["databasketId"] = basket
    expected["manifestVersion"] = "3.0"
    expected.update(extra)
    assert m.headers == expected
    assert (m.retries, m.include_annotation) == (retries, include)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_parser_never_raises_anything_but_manifest_error(text: str) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(_uid, min_size=1, max_size=20), st.sampled_from(["\n", "\r\n"]),
       st.booleans(), st.sampled_from(["", ",", " ", " ,,"]))
def test_clean_and_noisy_paths_agree(uids: list[str], eol: str, bom: bool, tail: str) -> None:
    """The bulk fast path and the per-line path must read the same list."""
    text = ("\ufeff" if bom else "") + "ListOfSeriesToDownload=" + eol
    text += eol.join(u + tail for u in uids) + eol
    noisy = text + "# end" + eol  # the comment forces the per-line path
    a, b = parse_manifest(text), parse_manifest(noisy)
    assert a.series_uids == b.series_uids == tuple(dict.fromkeys(uids))
    assert a.duplicates_dropped == b.duplicates_dropped == len(uids) - len(set(uids))


# ----------------------------------------------------------------------------- API base


@pytest.mark.parametrize(
    ("url", "base"),
    [
        (DEFAULT_DOWNLOAD_URL, "https://nbia.cancerimagingarchive.net/nbia-api/services/"),
        ("https://nlst.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet/",
         "https://nlst.cancerimagingarchive.net/nbia-api/services/"),
        ("http://127.0.0.1:8080/nbia-download/servlet/DownloadServlet",
         "http://127.0.0.1:8080/nbia-api/services/"),
        ("  HTTPS://Host.Example:8443/site/nbia-download/servlet/DownloadServlet?x=1#f ",
         "https://Host.Example:8443/site/nbia-api/services/"),
        ("https://h.example", "https://h.example/nbia-api/services/"),
        ("https://h.example/some/other/path", "https://h.example/nbia-api/services/"),
        ("https://h.example/nbia-api/services/v4", "https://h.example/nbia-api/services/"),
        ("https://user:secret@h.example/nbia-download/servlet/DownloadServlet",
         "https://h.example/nbia-api/services/"),
        ("http://[::1]:9000/nbia-download/servlet/DownloadServlet",
         "http://[::1]:9000/nbia-api/services/"),
    ],
)
def test_api_base_from_download_url(url: str, base: str) -> None:
    assert api_base_from_download_url(url) == base


@pytest.mark.parametrize("url", ["ftp://h/x", "nbia.cancerimagingarchive.net/x", "", "https://",
                                 "http://h:notaport/", "file:///etc/passwd"])
def test_api_base_rejects_non_http(url: str) -> None:
    with pytest.raises(NbiaError) as info:
        api_base_from_download_url(url)
    assert "\n" not in str(info.value)


def test_api_base_error_hides_credentials() -> None:
    with pytest.raises(NbiaError) as info:
        api_base_from_download_url("ftp://user:hunter2@h/x")
    assert "hunter2" not in str(info.value)
