"""Trust boundaries (issue 11): a shared manifest, the server's strings and the
destination are untrusted.

Every test here plays an attacker over real HTTP on loopback: a collaborator whose
manifest names their own server, a server that redirects the login elsewhere, echoes the
token, trickles, swaps images, plants formulas and escape sequences in its metadata; a
user of a shared destination who plants symbolic links. The password must never reach a
host the user did not choose, in any of them.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
from pathlib import Path

import pytest

from enginehelpers import write_manifest
from hostile_server import (
    Crafted,
    HostileServer,
    files_of,
    record,
    series_zip,
    trickle,
)
from nbia_retriever import AuthError, download
from nbia_retriever.errors import UntrustedHostError
from nbia_retriever.models import SeriesState, normalise_series_metadata
from reliability_helpers import CLI, metadata_rows, run_cli

PASSWORD = "correct-horse-battery-staple"
ROOT_NAME = "manifest-1700000000000"
FAST = {"backoff_base": 0.01, "timeout": 5.0, "api": "v1"}


@pytest.fixture(scope="module")
def archive(archive_factory):
    return archive_factory(seed=91, collections=1, patients=1, studies=1, series=4, images=2,
                           rows=16, columns=16, restricted=False, awkward=False)


@pytest.fixture()
def other():
    """A second server: another origin, where nothing may ever arrive."""
    with HostileServer() as srv:
        yield srv


def cart(tmp_path: Path, server: HostileServer, uids: list[str], **kw: object) -> Path:
    return write_manifest(tmp_path / "cart.tcia", uids, server.download_url, **kw)  # type: ignore[arg-type]


def uids_of(archive) -> list[str]:
    return [s.series_uid for s in archive.series]


def env(**extra: str) -> dict[str, str]:
    """No config file of the machine's user, and the test password."""
    base = {k: v for k, v in os.environ.items() if k not in ("NBIA_PASSWORD",)}
    base["NBIA_RETRIEVER_CONFIG"] = os.devnull + ".absent"
    base.update(extra)
    return base


def host_of(server: HostileServer) -> str:
    return server.url.split("://", 1)[1]


# ------------------------------------------------------------------------ 1. credentials


def test_a_host_only_the_manifest_names_gets_nothing(tmp_path, archive, hostile):
    done = run_cli(["download", str(cart(tmp_path, hostile, uids_of(archive))),
                    "-d", str(tmp_path / "dl"), "--user", "alice"],
                   env=env(NBIA_PASSWORD=PASSWORD))
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert host_of(hostile) in lines[0] and "--api-url" in lines[0]
    assert "trusted_hosts" in lines[0]
    assert hostile.requests == [] and hostile.token_posts == []  # nothing was sent at all
    assert not (tmp_path / "dl").exists()


def test_the_python_api_refuses_the_same(tmp_path, archive, hostile):
    with pytest.raises(UntrustedHostError) as raised:
        download(cart(tmp_path, hostile, uids_of(archive)), tmp_path / "dl",
                 user="alice", password=PASSWORD, **FAST)
    report = raised.value.report  # type: ignore[attr-defined]
    assert report.auth_failed and host_of(hostile) in report.fatal
    assert hostile.token_posts == [] and PASSWORD not in report.fatal


def test_a_host_the_user_chose_gets_the_login(tmp_path, archive, hostile):
    report = download(cart(tmp_path, hostile, uids_of(archive)), tmp_path / "dl",
                      user="alice", password=PASSWORD, api_url=hostile.api_url,
                      **{**FAST, "api": "v2"})
    assert report.ok, report.summary()
    assert [p.get("password") for p in hostile.token_posts] == [PASSWORD]
    assert set(hostile.auth_headers) == {f"Bearer {hostile.issued_token}"}


def test_a_host_in_the_users_config_is_trusted(tmp_path, archive, hostile):
    config = tmp_path / "config.toml"
    config.write_text(f'trusted_hosts = ["{host_of(hostile)}"]\n', encoding="utf-8")
    done = run_cli(["download", str(cart(tmp_path, hostile, uids_of(archive))), "-d",
                    str(tmp_path / "dl"), "--user", "alice", "--api", "v2", "--quiet"],
                   env=env(NBIA_PASSWORD=PASSWORD, NBIA_RETRIEVER_CONFIG=str(config)))
    assert done.returncode == 0, done.stderr
    assert [p.get("password") for p in hostile.token_posts] == [PASSWORD]


def test_no_password_over_plain_http_to_a_remote_host(tmp_path, archive, hostile):
    # Even a host the user names is refused over plain http unless it is loopback; the
    # refusal comes before any connection (192.0.2.0/24 is a documentation network).
    done = run_cli(["download", str(cart(tmp_path, hostile, uids_of(archive))), "-d",
                    str(tmp_path / "dl"), "--user", "alice", "--api-url",
                    "http://192.0.2.7/nbia-api/services"], env=env(NBIA_PASSWORD=PASSWORD),
                   timeout=30)
    assert done.returncode == 3, done.stderr
    assert "plain http" in done.stderr and "192.0.2.7" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _pty_run(args: list[str], answers: list[tuple[str, str]], environ: dict[str, str],
             timeout: float = 60) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal; answer each prompt (a text to wait for, the line
    to type). Returns the exit code and everything the terminal showed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*CLI, *args], stdin=follower, stdout=follower, stderr=follower,
                            env=environ, close_fds=True)
    os.close(follower)
    seen = ""
    pending = list(answers)
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], timeout)
            if not ready:
                raise AssertionError(f"the CLI went silent; it showed: {seen!r}")
            try:
                data = os.read(leader, 4096)
            except OSError:  # the CLI closed the terminal
                break
            if not data:
                break
            seen += data.decode("utf-8", "replace")
            if pending and pending[0][0] in seen:
                os.write(leader, (pending.pop(0)[1] + "\n").encode())
    finally:
        os.close(leader)
        code = proc.wait(timeout)
    return code, seen


def test_the_prompts_name_the_host(tmp_path, archive, hostile):
    manifest = str(cart(tmp_path, hostile, uids_of(archive)))
    host = host_of(hostile)
    # A host only the manifest names: asked by name, "no" sends nothing.
    code, seen = _pty_run(["download", manifest, "-d", str(tmp_path / "dl"), "--user",
                           "alice"], [(f"Send your password to {host}?", "n")], env())
    assert code == 3 and hostile.token_posts == [], seen
    # The host the user chose: the password prompt names it.
    code, seen = _pty_run(["download", manifest, "-d", str(tmp_path / "dl"), "--user",
                           "alice", "--api-url", hostile.api_url, "--api", "v2", "--quiet"],
                          [(f"Password for alice at {host}", PASSWORD)], env())
    assert code == 0, seen
    assert [p.get("password") for p in hostile.token_posts] == [PASSWORD]


def test_keyring_entries_are_keyed_by_host_and_user(tmp_path, archive, hostile):
    store = tmp_path / "keyring.json"
    tests = str(Path(__file__).parent)
    base = env(PYTHON_KEYRING_BACKEND="fake_keyring.FileKeyring", FAKE_KEYRING=str(store),
               PYTHONPATH=tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["download", str(cart(tmp_path, hostile, uids_of(archive))), "-d",
            str(tmp_path / "dl"), "--user", "alice", "--api-url", hostile.api_url,
            "--api", "v2", "--quiet"]
    store.write_text(json.dumps({"nbia-retriever:elsewhere.example.org alice": PASSWORD}))
    done = run_cli(args, env=base)
    assert done.returncode == 3 and "no password for 'alice'" in done.stderr, done.stderr
    assert hostile.token_posts == []
    store.write_text(json.dumps({f"nbia-retriever:{host_of(hostile)} alice": PASSWORD}))
    done = run_cli(args, env=base)
    assert done.returncode == 0, done.stderr
    assert [p.get("password") for p in hostile.token_posts] == [PASSWORD]


def test_insecure_says_so_at_run_time(tmp_path, archive, hostile):
    done = run_cli(["download", str(cart(tmp_path, hostile, uids_of(archive))), "-d",
                    str(tmp_path / "dl"), "--insecure", "--quiet", "--api", "v1"], env=env())
    assert done.returncode == 0, done.stderr
    assert "warning: --insecure" in done.stderr


# ------------------------------------------------------------------------- 2. redirects


def test_the_login_never_follows_a_redirect(tmp_path, archive, hostile, other):
    hostile.token_redirect = other.url + "/nbia-api/oauth/token"
    with pytest.raises(AuthError) as raised:
        download(cart(tmp_path, hostile, uids_of(archive)), tmp_path / "dl",
                 user="alice", password=PASSWORD, api_url=hostile.api_url,
                 **{**FAST, "api": "v2"})
    report = raised.value.report  # type: ignore[attr-defined]
    assert report.auth_failed and "redirect" in report.fatal, report.fatal
    assert other.requests == [] and other.token_posts == []


def test_a_token_never_follows_a_redirect_to_another_host(tmp_path, archive, hostile, other):
    hostile.image_redirect = other.url
    report = download(cart(tmp_path, hostile, uids_of(archive)), tmp_path / "dl",
                      user="alice", password=PASSWORD, api_url=hostile.api_url,
                      **{**FAST, "api": "v2"})
    assert not report.ok
    for result in report.results.values():
        assert result.state == SeriesState.ERROR and "another host" in result.error
    assert other.requests == [] and other.auth_headers == []


# ------------------------------------------------------------------- 3. strings are data


def test_control_characters_are_stripped_where_metadata_is_normalised():
    info = normalise_series_metadata({"Collection": "A\x1b]0;owned\x07B", "Subject ID":
                                      "P\x00\x9b1", "Series Description": "x\u202egpj.exe"})
    assert (info.collection, info.patient_id) == ("A]0;ownedB", "P1")
    assert info.series_description == "xgpj.exe"


@pytest.mark.parametrize("name", ["[/x]", "[bold red]LOUD[/bold red]", "[link=http://x]y"])
def test_markup_in_server_strings_is_shown_as_text(tmp_path, archive, hostile, name):
    first = archive.series[0]
    hostile.series = {first.series_uid: Crafted(record(first, collection=name, patient=name),
                                                series_zip(files_of(first)))}
    manifest = str(cart(tmp_path, hostile, [first.series_uid]))
    for args in (["list", manifest, "--api", "v1"],
                 ["collections", "--api-url", hostile.api_url, "--api", "v1"],
                 ["search", "--collection", name, "--api-url", hostile.api_url,
                  "--api", "v1"]):
        done = run_cli(args, env=env())
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        assert name[:6] in done.stdout, done.stdout


def test_a_server_that_echoes_the_token_never_gets_it_printed_or_stored(tmp_path, archive,
                                                                       hostile):
    token = hostile.issued_token
    first = archive.series[0]
    hostile.series[first.series_uid] = Crafted(
        record(first), f"Invalid credentials: Bearer {token}".encode(), status=500,
        content_type="text/plain")
    manifest = str(cart(tmp_path, hostile, uids_of(archive), retries=0))
    outputs = b""
    for mode in ("--json", "--quiet", None):
        dest = tmp_path / f"dl{mode}"
        done = subprocess.run(
            [*CLI, "download", manifest, "-d", str(dest), "--user", "alice", "--api-url",
             hostile.api_url, "--api", "v2", "--backoff", "0.01", "--error-report",
             str(tmp_path / f"errors{mode}.csv"), *([mode] if mode else [])],
            capture_output=True, env=env(NBIA_PASSWORD=PASSWORD), timeout=60, check=False)
        assert done.returncode == 1, done.stderr
        outputs += done.stdout + done.stderr
    assert b"HTTP 500" in outputs, outputs  # the error is reported...
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "cart.tcia"]
    assert any(p.name == "journal.sqlite" for p in files)
    for blob in [outputs, *(p.read_bytes() for p in files)]:
        assert token.encode() not in blob and PASSWORD.encode() not in blob  # ...not the token


# ------------------------------------------------------------------------ 4. spreadsheets


FORMULAS = {"collection": "=HYPERLINK(\"http://evil\")", "patient": "+1+cmd",
            "Study Description": "@SUM(A1)", "Manufacturer": "-2+3", "Modality": "\tCT"}


def test_cells_a_spreadsheet_would_evaluate_are_defused(tmp_path, archive, hostile):
    first, second = archive.series[0], archive.series[1]
    kw = {k: v for k, v in FORMULAS.items() if k in ("collection", "patient")}
    extra = {k: v for k, v in FORMULAS.items() if k not in kw}
    hostile.series = {
        first.series_uid: Crafted(record(first, **kw, **extra), series_zip(files_of(first))),
        second.series_uid: Crafted(record(second, **kw, **extra), b"broken", status=500,
                                   content_type="text/plain"),
    }
    report = download(cart(tmp_path, hostile, [first.series_uid, second.series_uid],
                           retries=0), tmp_path / "dl", **FAST)
    assert report.results[first.series_uid].state == SeriesState.COMPLETE
    [row] = metadata_rows(report.root)
    cells = dict(zip(("uid", "collection", "third", "uri", "patient"), row, strict=False))
    assert cells["collection"] == "'" + FORMULAS["collection"]
    assert cells["patient"] == "'" + FORMULAS["patient"]
    assert row[10] == "CT"  # Modality: the tab, a control character, is gone first
    assert all(not c or c[0] not in "=+-@\t\r" or c[0] == "'" or c.lstrip("+-").replace(
        ".", "", 1).isdigit() for c in row)
    from nbia_retriever.report import write_error_report

    written = write_error_report(tmp_path / "errors.csv", report.results.values())
    assert written == 1
    text = (tmp_path / "errors.csv").read_text(encoding="utf-8")
    assert "'" + FORMULAS["collection"].replace('"', '""') in text
    assert "'" + FORMULAS["patient"] in text


# ----------------------------------------------------------------------- 6. the content


def _one_series_zip(files: list[tuple[str, bytes]], **kw: object) -> bytes:
    return series_zip(files, **kw)  # type: ignore[arg-type]


def _cases(archive) -> dict[str, tuple[bytes, str]]:
    a, b = archive.series[0], archive.series[1]
    fa, fb = files_of(a), files_of(b)
    three = [*fa, ("00000003.dcm", fa[0][1])]  # the same image twice: one SOP UID
    return {
        "swapped": (_one_series_zip([fa[0], ("00000002.dcm", fb[0][1])]), "another series"),
        "sop-twice": (_one_series_zip([fa[0], ("00000002.dcm", fa[0][1])]),
                      "share the SOP Instance UID"),
        "too-many": (_one_series_zip(three), "more than the 2"),
        "not-dicom": (_one_series_zip([fa[0], ("00000002.dcm", b"<html>error</html>")]),
                      "not a DICOM file"),
        "unlisted": (_one_series_zip(fa, unlisted=[("notes.xml", b"<x/>")]),
                     "not in md5hashes.csv"),
    }


@pytest.mark.parametrize("case", ["swapped", "sop-twice", "too-many", "not-dicom",
                                  "unlisted"])
def test_a_series_is_published_only_with_its_own_content(tmp_path, archive, hostile, case):
    first = archive.series[0]
    body, cause = _cases(archive)[case]
    hostile.series = {first.series_uid: Crafted(record(first), body)}
    report = download(cart(tmp_path, hostile, [first.series_uid], retries=1),
                      tmp_path / "dl", **FAST)
    result = report.results[first.series_uid]
    assert result.state == SeriesState.ERROR and cause in result.error, result.error
    assert result.attempts == 2  # the attempt failed and was retried
    assert not [p for p in report.root.rglob("*.dcm") if ".nbia" not in p.parts]


# ------------------------------------------------------------------ 7. resource limits


def test_a_trickling_image_stream_is_cut(tmp_path, archive, hostile):
    first = archive.series[0]
    body = series_zip(files_of(first))
    hostile.series = {first.series_uid: Crafted(record(first), trickle(body, head=64))}
    report = download(cart(tmp_path, hostile, [first.series_uid], retries=0),
                      tmp_path / "dl", **{**FAST, "timeout": 1.0})
    result = report.results[first.series_uid]
    assert result.state == SeriesState.ERROR and "timed out" in result.error, result.error
    # Had the client waited for the whole trickle, the series would be complete.
    assert hostile.sent.get(first.series_uid, 0) < len(body)


def test_a_trickling_metadata_answer_is_cut(tmp_path, archive, hostile):
    first = archive.series[0]
    answer = json.dumps([record(first)]).encode()
    hostile.series = {first.series_uid: Crafted(record(first), series_zip(files_of(first)),
                                                metadata_body=trickle(answer, head=1))}
    report = download(cart(tmp_path, hostile, [first.series_uid], retries=0),
                      tmp_path / "dl", **{**FAST, "timeout": 1.0})
    result = report.results[first.series_uid]
    assert result.state == SeriesState.ERROR and "timed out" in result.error, result.error
    assert hostile.image_requests(first.series_uid) == 0


def test_deeply_nested_json_is_an_api_error_not_a_dead_thread(tmp_path, archive, hostile):
    first, second = archive.series[0], archive.series[1]
    hostile.series[first.series_uid] = Crafted(record(first), b"",
                                               metadata_body=b"[" * 200_000 + b"]" * 200_000)
    report = download(cart(tmp_path, hostile, [first.series_uid, second.series_uid],
                           retries=0), tmp_path / "dl", **FAST)
    result = report.results[first.series_uid]
    assert result.state == SeriesState.ERROR and "nested too deeply" in result.error
    assert report.results[second.series_uid].state == SeriesState.COMPLETE
    assert not report.fatal


def test_a_series_bigger_than_the_free_space_fails_alone(tmp_path, archive, hostile):
    first, second = archive.series[0], archive.series[1]
    hostile.series[first.series_uid] = Crafted(record(first, size=10**17),
                                               series_zip(files_of(first)))
    report = download(cart(tmp_path, hostile, [first.series_uid, second.series_uid],
                           retries=0), tmp_path / "dl", **FAST)
    assert "disk space" in report.results[first.series_uid].error
    assert report.results[second.series_uid].state == SeriesState.COMPLETE
    assert report.results[first.series_uid].relpath == ""


# --------------------------------------------------------------- 8. bad command lines


@pytest.mark.parametrize("url", ["ftp://nbia.example.org/nbia-download/servlet/DownloadServlet",
                                 "https:///nbia-download/servlet/DownloadServlet",
                                 "https://nbia.example.org:99999/x", "not a url at all"])
def test_a_malformed_server_url_is_exit_2_in_one_line(tmp_path, archive, url):
    manifest = write_manifest(tmp_path / "bad.tcia", uids_of(archive), url)
    for args in (["download", str(manifest), "-d", str(tmp_path / "dl")],
                 ["list", str(manifest)],
                 ["download", str(write_manifest(tmp_path / "ok.tcia", uids_of(archive),
                                                 "https://nbia.cancerimagingarchive.net/x")),
                  "--api-url", url, "-d", str(tmp_path / "dl")]):
        done = run_cli(args, env=env(), timeout=30)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "dl").exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_timeout_that_cannot_work_is_exit_2(tmp_path, archive, hostile, value):
    done = run_cli(["download", str(cart(tmp_path, hostile, uids_of(archive))), "-d",
                    str(tmp_path / "dl"), "--timeout", value], env=env(), timeout=30)
    assert done.returncode == 2 and "timeout" in done.stderr.lower(), done.stderr
    assert hostile.requests == []


def test_a_destination_that_cannot_be_created_is_exit_2(tmp_path, archive, hostile):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    done = run_cli(["download", str(cart(tmp_path, hostile, uids_of(archive))), "-d",
                    str(blocker / "below"), "--quiet"], env=env(), timeout=30)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert any("nbia-retriever" in line or "stopped" in line for line in lines)
    assert "files in" not in done.stderr + done.stdout  # never a folder that does not exist
    assert "Traceback" not in done.stderr


def test_the_file_count_is_data_not_json_text(tmp_path, archive, hostile):
    first = archive.series[0]
    files = [*files_of(first), ("a],[b", b"annotation")]  # "],[" once more in the JSON
    body = series_zip(files, md5_names=[n for n, _ in files[:-1]] + ['"a],[b"'])
    hostile.series = {first.series_uid: Crafted(record(first), body)}
    manifest = cart(tmp_path, hostile, [first.series_uid])
    assert download(manifest, tmp_path / "dl", **FAST).ok
    again = download(manifest, tmp_path / "dl", **FAST)
    assert again.ok and again.skipped == 1
    assert hostile.image_requests(first.series_uid) == 1


def test_a_damaged_journal_says_how_to_recover(tmp_path, archive, hostile):
    manifest = cart(tmp_path, hostile, uids_of(archive))
    first = download(manifest, tmp_path / "dl", **FAST)
    assert first.ok
    journal = first.root / ".nbia" / "journal.sqlite"
    for extra in journal.parent.glob("journal.sqlite-*"):
        extra.unlink()
    journal.write_bytes(b"this is not a database" * 100)
    done = run_cli(["download", str(manifest), "-d", str(tmp_path / "dl"), "--api", "v1",
                    "--quiet"], env=env(), timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "damaged" in done.stderr and "mv " in done.stderr, done.stderr
    assert "disk full" not in done.stderr
    # Following the advice: the series on disk are adopted, nothing is fetched again.
    before = sum(hostile.image_requests(u) for u in uids_of(archive))
    journal.rename(journal.with_name("journal.sqlite.damaged"))
    again = download(manifest, tmp_path / "dl", **FAST)
    assert again.ok and again.adopted == len(uids_of(archive)), again.summary()
    assert sum(hostile.image_requests(u) for u in uids_of(archive)) == before



# --------------------------------------------------------------------- 5. the destination


def _planted(tmp_path: Path, archive, place: str) -> tuple[Path, Path, str]:
    """A root with a symbolic link planted at ``place``; returns (root, victim, uid)."""
    import pydicom

    from nbia_retriever.layout import series_relpath

    first = archive.series[0]
    # The folder the series will be published in: the metadata has no StudyID, so it
    # comes from the images' headers, as the engine reads it.
    study_id = str(pydicom.dcmread(first.files[0], stop_before_pixels=True).get("StudyID", ""))
    relpath = series_relpath(normalise_series_metadata(record(first)).replace(
        study_id=study_id))
    root = tmp_path / "dl" / ROOT_NAME
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me", encoding="utf-8")
    folder_places = {"collection": 1, "patient": 2, "study": 3, "series": 4}
    if place in folder_places:
        parts = relpath.parts[:folder_places[place]]
        link = root.joinpath(*parts)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(victim, target_is_directory=True)
    elif place == "license":
        (root / relpath.parts[0]).mkdir(parents=True)
        (root / relpath.parts[0] / "LICENSE").symlink_to(victim / "precious.txt")
    elif place in (".nbia", "staging"):
        target = root / ".nbia" if place == ".nbia" else root / ".nbia" / "staging"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(victim, target_is_directory=True)
    elif place == "metadata.csv":
        root.mkdir(parents=True)
        (root / "metadata.csv").symlink_to(victim / "precious.txt")
    return root, victim, first.series_uid


@pytest.mark.parametrize("place", ["collection", "patient", "study", "series", "license"])
def test_a_planted_link_inside_the_root_fails_its_series(tmp_path, archive, hostile, place):
    _, victim, uid = _planted(tmp_path, archive, place)
    report = download(cart(tmp_path, hostile, [uid]), tmp_path / "dl", **FAST)
    result = report.results[uid]
    assert result.state == SeriesState.ERROR, result.error
    assert "symbolic link" in result.error and "refusing" in result.error, result.error
    assert "internal error" not in result.error and "\n" not in result.error
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert (victim / "precious.txt").read_text(encoding="utf-8") == "keep me"


@pytest.mark.parametrize("place", [".nbia", "staging", "metadata.csv"])
def test_a_planted_link_in_the_roots_own_files_stops_the_run(tmp_path, archive, hostile,
                                                              place):
    _, victim, uid = _planted(tmp_path, archive, place)
    done = run_cli(["download", str(cart(tmp_path, hostile, [uid])), "-d",
                    str(tmp_path / "dl"), "--api", "v1", "--quiet"], env=env(), timeout=60)
    assert done.returncode == 2, done.stderr
    assert "symbolic link" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert (victim / "precious.txt").read_text(encoding="utf-8") == "keep me"
    assert hostile.image_requests(uid) == 0


def _json_events(proc: subprocess.Popen[str], until: str) -> None:
    """Read ``proc``'s --json events until one of kind ``until`` (or the end)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == until:
            return


@pytest.mark.parametrize("second", [[], ["--shard", "1/2"]], ids=["same-manifest", "shard"])
def test_two_runs_on_one_destination_fetch_each_series_once(tmp_path, archive_factory, serve,
                                                            second):
    from nbia_retriever.server import FaultPlan

    archive = archive_factory(seed=93, collections=1, patients=2, studies=1, series=4,
                              images=3, rows=256, columns=256, restricted=False,
                              awkward=False)
    # A bandwidth cap keeps the first run busy while the second one starts.
    server = serve(archive.root, faults=FaultPlan(bandwidth=2_000_000))
    uids = uids_of(archive)
    manifest = write_manifest(tmp_path / "cart.tcia", uids, server.download_url)
    dest = str(tmp_path / "dl")
    first = subprocess.Popen([*CLI, "download", str(manifest), "-d", dest, "--json",
                              "--workers", "2"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env())
    try:
        _json_events(first, "progress")  # the first run is mid-series
        other = run_cli(["download", str(manifest), "-d", dest, "--quiet", "--workers", "2",
                         *second], env=env(), timeout=120)
        assert other.returncode == 0, other.stderr
        assert first.stdout is not None
        first.stdout.read()
        assert first.wait(120) == 0, first.stderr.read() if first.stderr else ""
    finally:
        first.kill()
        first.wait()
        for stream in (first.stdout, first.stderr):
            if stream is not None:
                stream.close()
    fetched = [r.series_uid for r in server.requests
               if "getImage" in r.path and r.status == 200]
    assert sorted(fetched) == sorted(uids), "a series was fetched twice (or not at all)"
    rows = metadata_rows(tmp_path / "dl" / ROOT_NAME)
    assert sorted(r[0] for r in rows) == sorted(uids)
    checked = run_cli(["verify", str(tmp_path / "dl" / ROOT_NAME)], timeout=60)
    assert checked.returncode == 0 and f"verified {len(uids)} series" in checked.stdout, \
        checked.stdout
