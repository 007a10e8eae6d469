"""The reference server's REST API over real HTTP: shapes, statuses, auth, visibility."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator

import httpx
import pytest

from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.builds import BUILDS
from nbia_retriever.server.synth import ArchiveSummary

#: The real v1/v2 getSeriesMetaData keys, in order (a NULL value leaves its key out).
V1_FIELDS = [
    "Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID",
    "Study UID", "Study Description", "Study Date", "Series Description", "Manufacturer",
    "Modality", "SOP Class UID", "Number of Images", "File Size", "File Location",
    "Series Number", "License Name", "License URL", "Annotation Size", "Date Released",
    "Series Date", "Protocol Name", "Body Part Examined", "Annotations Flag",
    "Manufacturer Model Name", "Software Versions", "TimeStamp",
]


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def public(archive: ArchiveSummary) -> list:
    return [s for s in archive.series if not s.restricted]


def restricted(archive: ArchiveSummary) -> list:
    return [s for s in archive.series if s.restricted]


def login(http: httpx.Client, server: ReferenceServer, user: str, password: str) -> dict:
    response = http.post(server.url + "/nbia-api/oauth/token", data={
        "grant_type": "password", "username": user, "password": password, "client_id": "NBIA",
    })
    assert response.status_code == 200, response.text
    return response.json()


def bearer(token: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {token['access_token']}"}


# -- metadata ---------------------------------------------------------------------------
def test_series_metadata_v1_shape(server, http, synthetic_archive):
    series = public(synthetic_archive)[0]
    response = http.get(server.api_url + "/v1/getSeriesMetaData",
                        params={"SeriesInstanceUID": series.series_uid})
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, list) and len(body) == 1
    record = body[0]
    assert list(record) == [k for k in V1_FIELDS if k in record]
    for key in ("Series UID", "Collection", "Subject ID", "Study UID", "Number of Images",
                "File Size", "Series Number", "License Name", "Study Date"):
        assert key in record, key
    assert "Study ID" not in record  # the StudyID travels as "File Location"
    assert all(isinstance(v, str) for v in record.values())
    assert record["Series UID"] == series.series_uid
    assert record["Subject ID"] == series.patient_id
    assert record["Study UID"] == series.study_uid
    assert record["Number of Images"] == str(series.images)
    assert record["File Size"] == str(series.nbytes)
    assert re.fullmatch(r"\d\d-\d\d-\d{4}", record["Study Date"])


def test_series_number_and_date_formats_across_all_series(server, http, synthetic_archive):
    numbers = []
    for series in public(synthetic_archive):
        record = http.get(server.api_url + "/v1/getSeriesMetaData",
                          params={"SeriesInstanceUID": series.series_uid}).json()[0]
        numbers.append(record.get("Series Number", ""))  # absent when NULL
    assert any(re.fullmatch(r"\d+\.000000", n) for n in numbers)  # Java's float rendering
    assert all(n == "" or re.fullmatch(r"\d+\.\d{6}", n) for n in numbers)


def test_series_metadata_csv(server, http, synthetic_archive):
    series = public(synthetic_archive)[1]
    response = http.get(server.api_url + "/v1/getSeriesMetaData",
                        params={"SeriesInstanceUID": series.series_uid, "format": "csv"})
    assert response.status_code == 200
    assert response.text.startswith('"Series UID","Collection"')
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 1 and rows[0]["Series UID"] == series.series_uid
    assert rows[0]["Number of Images"] == str(series.images)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_series_metadata_unknown_or_restricted_is_204(server, http, synthetic_archive, version):
    headers = bearer(login(http, server, "nbia_guest", "")) if version == "v2" else {}
    for uid in ("1.2.3.4.5", restricted(synthetic_archive)[0].series_uid):
        response = http.get(server.api_url + f"/{version}/getSeriesMetaData",
                            params={"SeriesInstanceUID": uid}, headers=headers)
        assert response.status_code == 204
        assert response.content == b""


def test_missing_parameter_is_400(server, http):
    for endpoint in ("v1/getSeriesMetaData", "v1/getImage", "v1/getImageWithMD5Hash",
                     "v4/getImage"):
        assert http.get(f"{server.api_url}/{endpoint}").status_code == 400


def test_v1_strips_descriptions_and_sends_the_study_id_as_file_location(server, http,
                                                                        synthetic_archive):
    import pydicom

    for series in public(synthetic_archive):
        record = http.get(server.api_url + "/v1/getSeriesMetaData",
                          params={"SeriesInstanceUID": series.series_uid}).json()[0]
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        assert record.get("File Location", "") == str(ds.get("StudyID", ""))
        for key in ("Study Description", "Series Description"):
            if key in record:
                assert re.fullmatch(r"[a-zA-Z0-9 .-]*", record[key]), record[key]
        assert record.get("Series Number", "") == "" or re.fullmatch(r"-?\d+\.\d{6}",
                                                            record["Series Number"])


@pytest.mark.parametrize("build", ["current", "2025-10", "2025-08", "2025-06"])
def test_v4_batch_metadata_of_each_build(synthetic_archive, serve, http, build):
    wanted = [s.series_uid for s in public(synthetic_archive)[:3]]
    secret = restricted(synthetic_archive)[0].series_uid
    columns = BUILDS[build].columns
    uid_col = "SeriesInstanceUID" if "SeriesInstanceUID" in columns else "Series Instance UID"
    count_col = "ImageCount" if "ImageCount" in columns else "Image Count"
    date_col = "StudyDate" if "StudyDate" in columns else "Study Date"
    server = serve(synthetic_archive.root, build=build)
    response = http.post(server.api_url + "/v4/getSeriesMetadata",
                         data={"list": ",".join([*wanted, "9.9.9", secret, wanted[0]])})
    assert response.status_code == 200
    assert response.text.startswith(f'"{columns[0]}",')  # fully quoted, like toCsvQuoted
    reader = csv.DictReader(io.StringIO(response.text))
    assert list(reader.fieldnames or []) == list(columns)
    rows = list(reader)
    by_uid = {s.series_uid: s for s in synthetic_archive.series}
    authorised = [r for r in rows if r["Authorized"] == "1"]
    assert sorted({r[uid_col] for r in authorised}) == sorted(wanted)
    if build == "2025-06":  # 9.5: repeated rows, and the hidden series with Authorized 0
        assert len(authorised) == 2 * len(wanted)
        assert [r[uid_col] for r in rows if r["Authorized"] == "0"] == [secret, secret]
    else:
        assert len(rows) == len(wanted)
    for row in authorised:
        assert row[count_col] == str(by_uid[row[uid_col]].images)
        assert re.fullmatch(r"\d\d-\d\d-\d{4}", row[date_col])
    assert ("Project" in columns) == (build == "2025-06")


def test_v4_empty_list_is_400(server, http):
    response = http.post(server.api_url + "/v4/getSeriesMetadata", data={"list": ""})
    assert response.status_code == 400
    assert "list" in response.text


def test_v4_rejects_unknown_parameters_v1_ignores_them(server, http, synthetic_archive):
    uid = public(synthetic_archive)[0].series_uid
    bad = http.get(server.api_url + "/v4/getImage",
                   params={"SeriesInstanceUID": uid, "Bogus": "1"})
    assert bad.status_code == 400
    assert bad.text.startswith("Invalid query parameter: 'Bogus'. Allowed parameters are: [")
    assert http.get(server.api_url + "/v4/getCollectionValues",
                    params={"foo": "bar"}).status_code == 400
    assert http.get(server.api_url + "/v1/getCollectionValues",
                    params={"foo": "bar"}).status_code == 200
    # getSeriesMetadata checks no form parameter at all.
    assert http.post(server.api_url + "/v4/getSeriesMetadata",
                     data={"list": uid, "extra": "x"}).status_code == 200


@pytest.mark.parametrize(("build", "accepted"), [("current", True), ("2025-10", False),
                                                 ("2025-08", False), ("2025-06", False)])
def test_include_md5_by_build(synthetic_archive, serve, http, build, accepted):
    uid = public(synthetic_archive)[0].series_uid
    server = serve(synthetic_archive.root, build=build)
    response = http.get(server.api_url + "/v4/getImage",
                        params={"SeriesInstanceUID": uid, "IncludeMD5": "yes"})
    fallback = http.get(server.api_url + "/v4/getImageWithMD5Hash",
                        params={"SeriesInstanceUID": uid})
    if accepted:
        assert response.status_code == 200 and response.content[:2] == b"PK"
    else:
        assert response.status_code == 400
        assert response.text.startswith("Invalid query parameter: 'IncludeMD5'.")
    assert fallback.status_code == 200 and b"md5hashes.csv" in fallback.content
    assert b"LICENSE" not in fallback.content  # getImageWithMD5Hash sends none


def test_no_v4_build_answers_404_on_v4(synthetic_archive, serve, http):
    server = serve(synthetic_archive.root, build="no-v4")
    for method, endpoint in (("POST", "getSeriesMetadata"), ("GET", "getImage"),
                             ("POST", "getMD5Hierarchy")):
        assert http.request(method, f"{server.api_url}/v4/{endpoint}").status_code == 404
    assert http.get(server.api_url + "/v1/getCollectionValues").status_code == 200


def test_md5_hierarchy_is_the_md5_of_the_sorted_image_md5s(server, http, synthetic_archive):
    import hashlib

    series = public(synthetic_archive)[0]
    digests = sorted(hashlib.md5(p.read_bytes()).hexdigest() for p in series.files)
    response = http.post(server.api_url + "/v4/getMD5Hierarchy",
                         data={"SeriesInstanceUID": series.series_uid})
    assert response.status_code == 200 and response.headers["content-type"].startswith(
        "text/plain")
    assert response.text == hashlib.md5("".join(digests).encode()).hexdigest()
    unknown = http.post(server.api_url + "/v4/getMD5Hierarchy",
                        data={"SeriesInstanceUID": "1.2.3"})
    assert unknown.status_code == 200 and unknown.content == b""
    bad = http.post(server.api_url + "/v4/getMD5Hierarchy", data={"Series": "x"})
    assert bad.status_code == 400 and bad.text.startswith("Invalid form parameter: 'Series'")


def test_wrong_method_and_unknown_endpoint(server, http):
    assert http.get(server.api_url + "/v4/getSeriesMetadata").status_code == 405
    assert http.get(server.api_url + "/v1/getNothing").status_code == 404
    assert http.get(server.api_url + "/v3/getCollectionValues").status_code == 404
    assert http.post(server.api_url + "/v4/getImageWithMD5Hash").status_code == 405


# -- queries ----------------------------------------------------------------------------
def test_collection_values_public_only_on_v1_and_v4(server, http, synthetic_archive):
    public_names = sorted({s.collection for s in public(synthetic_archive)})
    for version in ("v1", "v4"):
        body = http.get(server.api_url + f"/{version}/getCollectionValues").json()
        assert body == [{"Collection": name} for name in public_names]


def test_patients_and_studies(server, http, synthetic_archive):
    collection = public(synthetic_archive)[0].collection
    patients = http.get(server.api_url + "/v1/getPatient",
                        params={"Collection": collection}).json()
    expected = {s.patient_id for s in synthetic_archive.series if s.collection == collection}
    assert {p["PatientId"] for p in patients} == expected
    assert all(p["Collection"] == collection for p in patients)
    studies = http.get(server.api_url + "/v1/getPatientStudy",
                       params={"Collection": collection}).json()
    expected_studies = {s.study_uid for s in synthetic_archive.series
                        if s.collection == collection}
    assert {s["StudyInstanceUID"] for s in studies} == expected_studies
    per_study: dict[str, int] = {}
    for s in synthetic_archive.series:
        if s.collection == collection:
            per_study[s.study_uid] = per_study.get(s.study_uid, 0) + 1
    assert {s["StudyInstanceUID"]: s["SeriesCount"] for s in studies} == per_study


def test_get_series_keys_and_filters(server, http, synthetic_archive):
    series = public(synthetic_archive)[0]
    rows = http.get(server.api_url + "/v1/getSeries",
                    params={"Collection": series.collection, "PatientID": series.patient_id}
                    ).json()
    expected = {s.series_uid for s in synthetic_archive.series
                if s.collection == series.collection and s.patient_id == series.patient_id}
    assert {r["SeriesInstanceUID"] for r in rows} == expected
    for key in ("SeriesInstanceUID", "StudyInstanceUID", "Modality", "Collection",
                "PatientID", "ImageCount", "FileSize"):
        assert all(key in r for r in rows), key
    row = next(r for r in rows if r["SeriesInstanceUID"] == series.series_uid)
    assert row["ImageCount"] == series.images and row["FileSize"] == series.nbytes
    one = http.get(server.api_url + "/v1/getSeries",
                   params={"StudyInstanceUID": series.study_uid, "Modality": "ct"}).json()
    assert {r["StudyInstanceUID"] for r in one} == {series.study_uid}


def test_no_results_is_200_with_empty_body(server, http, synthetic_archive):
    for endpoint, params in (
        ("getSeries", {"Collection": "NO-SUCH"}),
        ("getSeries", {"Modality": "PT"}),
        ("getPatient", {"Collection": "NO-SUCH"}),
        ("getPatientStudy", {"PatientID": "nobody"}),
        ("getSeries", {"Collection": restricted(synthetic_archive)[0].collection}),
    ):
        response = http.get(server.api_url + f"/v1/{endpoint}", params=params)
        assert response.status_code == 200, endpoint
        assert response.content == b"", endpoint


def test_image_of_unknown_or_restricted_series_is_400_not_public(server, http,
                                                                 synthetic_archive):
    for uid in ("1.2.3.4.5", restricted(synthetic_archive)[0].series_uid):
        for endpoint in ("v1/getImage", "v1/getImageWithMD5Hash", "v4/getImage"):
            response = http.get(f"{server.api_url}/{endpoint}",
                                params={"SeriesInstanceUID": uid})
            assert response.status_code == 400
            assert "is not in public domain" in response.text


def test_download_servlet_and_manifest(server, http, synthetic_archive):
    assert http.get(server.download_url).status_code == 200
    text = http.get(server.manifest_url).text
    assert f"downloadServerUrl={server.download_url}" in text
    listed = text.split("ListOfSeriesToDownload=\n", 1)[1].split()
    assert sorted(listed) == sorted(s.series_uid for s in public(synthetic_archive))


# -- auth -------------------------------------------------------------------------------
def test_password_grant_shape_and_guest(server, http):
    token = login(http, server, "nbia_guest", "")
    assert token["token_type"] == "bearer"
    assert token["access_token"] and token["refresh_token"]
    assert token["expires_in"] == 7199  # the synthetic archive's 7200 s, as NBIA reports it


def test_bad_credentials_and_grants(server, http):
    url = server.url + "/nbia-api/oauth/token"
    wrong = http.post(url, data={"grant_type": "password", "username": "alice",
                                 "password": "nope", "client_id": "NBIA"})
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    ghost = http.post(url, data={"grant_type": "password", "username": "ghost",
                                 "password": "", "client_id": "NBIA"})
    assert ghost.status_code == 400
    assert http.post(url, data={"grant_type": "magic"}).status_code == 400
    assert http.post(url, data={"grant_type": "refresh_token",
                                "refresh_token": "forged"}).status_code == 400
    assert http.post(url, data={"grant_type": "password", "username": "nbia_guest",
                                "password": "", "client_id": "OTHER"}).status_code == 401


def test_v2_requires_a_valid_bearer_token(server, http):
    url = server.api_url + "/v2/getCollectionValues"
    missing = http.get(url)
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
    forged = http.get(url, headers={"Authorization": "Bearer forged"})
    assert forged.status_code == 401 and forged.json()["error"] == "invalid_token"
    token = login(http, server, "nbia_guest", "")
    assert http.get(url, headers=bearer(token)).status_code == 200


def test_expiry_via_advance_clock_then_refresh(synthetic_archive, serve, http):
    server = serve(synthetic_archive.root, token_lifetime=2)
    url = server.api_url + "/v2/getCollectionValues"
    token = login(http, server, "alice", synthetic_archive.users["alice"])
    assert token["expires_in"] == 1
    assert http.get(url, headers=bearer(token)).status_code == 200
    server.advance_clock(2.5)
    expired = http.get(url, headers=bearer(token))
    assert expired.status_code == 401
    assert "expired" in expired.json()["error_description"].lower()
    refreshed = http.post(server.url + "/nbia-api/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": token["refresh_token"],
        "client_id": "NBIA"})
    assert refreshed.status_code == 200
    fresh = refreshed.json()
    assert fresh["access_token"] != token["access_token"]
    assert http.get(url, headers=bearer(fresh)).status_code == 200
    server.advance_clock(10 * 86400)  # refresh tokens die too
    assert http.post(server.url + "/nbia-api/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": token["refresh_token"],
    }).status_code == 400


def test_restricted_collection_visible_on_v2_to_granted_users_only(server, http,
                                                                  synthetic_archive):
    secret = restricted(synthetic_archive)[0]
    all_names = sorted({s.collection for s in synthetic_archive.series})
    alice = bearer(login(http, server, "alice", synthetic_archive.users["alice"]))
    bob = bearer(login(http, server, "bob", synthetic_archive.users["bob"]))
    guest = bearer(login(http, server, "nbia_guest", ""))
    names = [c["Collection"] for c in
             http.get(server.api_url + "/v2/getCollectionValues", headers=alice).json()]
    assert names == all_names
    for headers in (bob, guest):
        names = [c["Collection"] for c in
                 http.get(server.api_url + "/v2/getCollectionValues", headers=headers).json()]
        assert secret.collection not in names
    params = {"SeriesInstanceUID": secret.series_uid}
    meta = http.get(server.api_url + "/v2/getSeriesMetaData", params=params, headers=alice)
    assert meta.status_code == 200 and meta.json()[0]["Collection"] == secret.collection
    assert http.get(server.api_url + "/v2/getSeriesMetaData", params=params,
                    headers=bob).status_code == 204
    image = http.get(server.api_url + "/v2/getImage", params=params, headers=alice)
    assert image.status_code == 200 and image.content[:4] == b"PK\x03\x04"
    assert http.get(server.api_url + "/v2/getImage", params=params,
                    headers=bob).status_code == 400
    # v1 and v4 never show it, whatever the token
    assert http.get(server.api_url + "/v1/getImage", params=params,
                    headers=alice).status_code == 400


def test_request_log_keeps_no_secrets(server, http, synthetic_archive):
    token = login(http, server, "alice", synthetic_archive.users["alice"])
    http.get(server.api_url + "/v2/getCollectionValues", headers=bearer(token))
    http.get(server.api_url + "/v1/getCollectionValues", params={"password": "leak"})
    records = server.requests
    assert [r.status for r in records] == [200, 200, 200]
    assert records[1].user == "alice"
    dumped = repr(records)
    for secret in (token["access_token"], token["refresh_token"],
                   synthetic_archive.users["alice"], "leak"):
        assert secret not in dumped
    assert records[2].query == {"password": "***"}
