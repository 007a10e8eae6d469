"""A download root knows where it came from, and any folder the user typed works
(issue 25, items 1 and 2).

Each test drives the CLI in a subprocess against the reference server on 127.0.0.1:
the journal records the manifest and the server of every run, ``verify --server`` and
``--repair`` ask that server (not public TCIA), a record someone else wrote is shown and
refused without a prompt, ``search --csv`` files carry their server, and ``verify`` and
``merge-reports`` take the ``-d`` folder of a download (its one root, or the list).
"""

from __future__ import annotations

import csv
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from enginehelpers import write_manifest
from nbia_retriever.engine.journal import root_origin
from nbia_retriever.errors import AmbiguousRootError, DestinationError
from nbia_retriever.manifest import read_manifest
from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary, SynthSeries
from nbia_retriever.verify import find_download_root
from test_cli_people import cli

ROOT_NAME = "manifest-1700000000000"


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    return archive_factory(collections=3)


@pytest.fixture(scope="module")
def public(archive: ArchiveSummary) -> list[SynthSeries]:
    return [s for s in archive.series if not s.restricted]


@pytest.fixture
def srv(archive: ArchiveSummary, serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    return serve(archive.root)


@pytest.fixture
def downloaded(srv, public, tmp_path) -> Path:
    """The public series downloaded with ``-d out`` from ``m.tcia`` (cwd: tmp_path)."""
    write_manifest(tmp_path / "m.tcia", [s.series_uid for s in public[:2]], srv.download_url)
    done = cli("download", "-d", "out", "m.tcia", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path / "out" / ROOT_NAME


def damage(root: Path) -> Path:
    victim = sorted(p for p in root.rglob("*.dcm") if ".nbia" not in p.parts)[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    return victim


# ------------------------------------------------------------- 1. where it came from


def test_the_journal_records_the_manifest_and_the_server_of_each_run(srv, downloaded,
                                                                     tmp_path):
    origin = root_origin(downloaded)
    assert origin is not None and origin.trusted
    assert origin.manifest == str(tmp_path / "m.tcia")
    assert f"downloadServerUrl={srv.download_url}" in origin.headers.splitlines()
    assert "ListOfSeriesToDownload" not in origin.headers  # the header, not the list
    assert origin.server == srv.api_url
    assert origin.api == "auto" and not origin.chosen  # the manifest named the server
    # One row per run: a re-run adds one, the newest is read.
    assert cli("download", "-d", "out", "--api-url", srv.api_url, "m.tcia",
               cwd=tmp_path).returncode == 0
    again = root_origin(downloaded)
    assert again is not None and again.chosen and again.started > origin.started
    with sqlite3.connect(downloaded / ".nbia" / "journal.sqlite") as db:
        assert db.execute("SELECT count(*) FROM runs").fetchone() == (2,)


def test_verify_server_asks_the_server_the_files_came_from(srv, downloaded, tmp_path):
    """Before: "cannot reach https://services.cancerimagingarchive.net/..." (the public
    default). After: the recorded server, named on stderr."""
    done = cli("verify", "--server", downloaded, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "checked 2 series against the server: all match"
    assert f"server: {srv.api_url}" in done.stderr
    assert "cancerimagingarchive" not in done.stdout + done.stderr


def test_verify_server_repair_fetches_from_the_recorded_server(srv, downloaded, tmp_path):
    victim = damage(downloaded)
    local = cli("verify", "out", cwd=tmp_path)
    assert local.returncode == 1
    checked = cli("verify", "--server", "out", cwd=tmp_path)
    assert checked.returncode == 1
    assert checked.stdout.splitlines()[-1] == (
        f"next: add --repair to download the 1 series again (nbia-retriever verify "
        f"out/{ROOT_NAME} --server --repair)")
    repaired = cli("verify", "--server", "--repair", "out", cwd=tmp_path, timeout=120)
    assert repaired.returncode == 0, repaired.stderr
    assert "repairing 1 series" in repaired.stderr
    assert victim.exists()
    assert cli("verify", "out", cwd=tmp_path).returncode == 0


def test_a_record_this_user_did_not_write_is_shown_and_refused_without_a_prompt(
        srv, downloaded, tmp_path):
    """Another user's journal (a shared folder) may name any server: it is named, never
    used on its word; ``--api-url`` is the user's own choice."""
    stranger = {"NBIA_RETRIEVER_DATA": str(tmp_path / "another-user")}  # another key
    done = cli("verify", "--server", "out", cwd=tmp_path, env=stranger)
    assert done.returncode == 2
    journal = f"out/{ROOT_NAME}/.nbia/journal.sqlite"
    assert done.stderr.splitlines() == [
        f"download root: out/{ROOT_NAME}",
        f"nbia-retriever: error: {journal} was not written by you; it names the server "
        f"{srv.api_url}: pass --api-url {srv.api_url} to use it (or --api-url URL for "
        "another)"]
    chosen = cli("verify", "--server", "--api-url", srv.api_url, "out", cwd=tmp_path,
                 env=stranger)
    assert chosen.returncode == 0, chosen.stderr


def test_a_record_planted_later_does_not_outrank_this_users_own(srv, downloaded, tmp_path):
    """Anyone of the group can add rows to a shared journal: a newer record naming
    another server is not this user's, so the user's own record still decides."""
    with sqlite3.connect(downloaded / ".nbia" / "journal.sqlite") as db:
        db.execute("INSERT INTO runs (started, servers, chosen, mac) VALUES (?, ?, 1, ?)",
                   (4e9, '["http://127.0.0.1:9/nbia-api/services"]', "0" * 32))
    origin = root_origin(downloaded)
    assert origin is not None and origin.trusted and origin.server == srv.api_url
    done = cli("verify", "--server", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "127.0.0.1:9/" not in done.stdout + done.stderr


def test_on_a_terminal_a_record_this_user_did_not_write_is_asked_about(
        srv, downloaded, tmp_path):
    """Someone can answer: the record is shown, with its server, and asked about; "n"
    asks nothing, "y" checks the files against that server."""
    from test_trust import _pty_run, env

    stranger = env(NBIA_RETRIEVER_DATA=str(tmp_path / "another-user"))
    question = "Ask that server about these files?"
    code, seen = _pty_run(["verify", "--server", str(tmp_path / "out")], [(question, "n")],
                          stranger)
    assert code == 2, seen
    assert "was not written by you. It names the server" in " ".join(seen.split())
    assert f"not asking {srv.api_url}" in seen
    code, seen = _pty_run(["verify", "--server", str(tmp_path / "out")], [(question, "y")],
                          stranger)
    assert code == 0, seen
    assert "checked 2 series against the server: all match" in seen


def test_a_recorded_server_a_manifest_named_gets_no_password_without_trust(
        srv, downloaded, tmp_path):
    """The host policy holds: the server came from the manifest, not from the user, so
    ``--user`` with nobody to ask is refused before any password is read (exit 3)."""
    done = cli("verify", "--server", "--user", "alice", "out", cwd=tmp_path,
               env={"NBIA_PASSWORD": "alice-secret"})
    assert done.returncode == 3, done.stderr
    assert "alice-secret" not in done.stdout + done.stderr
    assert "127.0.0.1" in done.stderr


def test_search_csv_records_its_server(srv, public, tmp_path):
    collection = public[0].collection
    done = cli("search", "--collection", collection, "--api-url", srv.api_url, "--csv",
               "found.csv", "-o", "found.tcia", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "found.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))  # a plain CSV reader still reads it
    assert rows and {r["downloadServerUrl"] for r in rows} == {srv.download_url}
    assert read_manifest(tmp_path / "found.csv").series_uids == \
        read_manifest(tmp_path / "found.tcia").series_uids
    assert read_manifest(tmp_path / "found.tcia").download_server_url == srv.download_url


def test_search_csv_server_is_read_back_as_the_manifests_server(srv, public, tmp_path):
    collection = public[0].collection
    assert cli("search", "--collection", collection, "--api-url", srv.api_url, "--csv",
               "found.csv", cwd=tmp_path).returncode == 0
    assert read_manifest(tmp_path / "found.csv").download_server_url == srv.download_url


def test_a_journal_older_than_the_record_reads_as_no_record(tmp_path):
    state = tmp_path / "root" / ".nbia"
    state.mkdir(parents=True)
    with sqlite3.connect(state / "journal.sqlite") as db:
        db.execute("CREATE TABLE series (uid TEXT PRIMARY KEY, state TEXT NOT NULL)")
    assert root_origin(tmp_path / "root") is None
    assert root_origin(tmp_path) is None  # no journal at all


# ------------------------------------------------------------- 2. any folder typed


def test_verify_and_merge_reports_take_the_d_folder(srv, public, downloaded, tmp_path):
    """Before: "out: no download journal here (expected .nbia/)". After: the one
    download root in it is checked, and named."""
    for argv in (("verify", "out"), ("merge-reports", "--check", "out")):
        done = cli(*argv, cwd=tmp_path)
        assert done.returncode == 0, (argv, done.stderr)
        assert f"download root: out/{ROOT_NAME}" in done.stderr.splitlines(), done.stderr
    assert find_download_root(tmp_path / "out") == downloaded
    assert find_download_root(downloaded) == downloaded


def test_a_folder_of_several_roots_lists_them_one_a_line(srv, public, downloaded,
                                                        tmp_path):
    write_manifest(tmp_path / "b.tcia", [public[2].series_uid], srv.download_url,
                   basket="another-cart.tcia")
    assert cli("download", "-d", "out", "b.tcia", cwd=tmp_path).returncode == 0
    for argv in (("verify", "out"), ("verify", "--server", "out"), ("merge-reports", "out")):
        done = cli(*argv, cwd=tmp_path)
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stderr.splitlines() == [
            "nbia-retriever: error: out holds 2 download roots; name one of them:",
            "  out/another-cart",
            f"  out/{ROOT_NAME}"], done.stderr
    # merge-reports --manifest picks the root that manifest makes there.
    done = cli("merge-reports", "--check", "--manifest", "b.tcia", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AmbiguousRootError) as caught:
        find_download_root(tmp_path / "out")
    assert caught.value.roots == [tmp_path / "out" / "another-cart", downloaded]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DestinationError, match="no download here"):
        find_download_root(empty)
    none = cli("verify", "empty", cwd=tmp_path)
    assert none.returncode == 2
    assert none.stderr.splitlines() == [
        "nbia-retriever: error: empty: no download here (no .nbia/ in it, nor in a folder "
        "inside it)"]
    assert os.listdir(empty) == []
