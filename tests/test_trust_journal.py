"""Trust, round 2 (issue 21, item 1): a journal in a shared download root is untrusted.

A download root on a cluster is a group folder: anyone of the group can plant a journal
in ``.nbia/`` (``journal-0-of-1.sqlite`` sorts before ``journal.sqlite``), or add rows to
a group-writable one. Every test here plants such rows and runs the real command against
the reference server on loopback:

* rows naming a folder outside the root (``..``, an absolute path, a path through a
  planted symbolic link) are refused, with one warning naming the journal file: no
  command reads, moves, deletes or names the folder they point at, and the series is
  downloaded again;
* a Complete row for a folder that does not hold its images is not believed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from enginehelpers import write_manifest
from nbia_retriever import download
from nbia_retriever.engine.journal import SCHEMA
from reliability_helpers import metadata_rows, run_cli

BASKET = "manifest-1700000000000"
FAST = {"backoff_base": 0.01, "timeout": 10.0}
PLANTED = "journal-0-of-1.sqlite"
KINDS = ("dotdot", "absolute", "symlink")


@pytest.fixture(scope="module")
def archive(archive_factory):
    return archive_factory(seed=211, collections=1, patients=1, studies=1, series=3,
                           images=2, rows=16, columns=16, restricted=False, awkward=False)


@pytest.fixture()
def server(archive, serve):
    return serve(archive.root)


# --------------------------------------------------------------------------- helpers


def seeded(tmp_path: Path, archive, server) -> tuple[Path, list[str]]:
    """A root holding every series of the archive but the last (downloaded for real)."""
    uids = [s.series_uid for s in archive.series]
    report = download(write_manifest(tmp_path / "first.tcia", uids[:-1], server.download_url),
                      tmp_path / "dl", **FAST)
    assert report.ok, report.summary()
    return report.root, uids


def precious(tmp_path: Path) -> Path:
    """A folder outside the root, as a victim's data: must never be touched."""
    outside = tmp_path / "precious"
    (outside / "victim").mkdir(parents=True)
    (outside / "victim" / "notes.txt").write_bytes(b"keep me\n")
    (outside / "victim" / "1-1.dcm").write_bytes(b"not yours")
    (outside / "other.txt").write_bytes(b"and me\n")
    return outside


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every name below ``folder`` with its bytes (links by their target), no following."""
    found: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = path.read_bytes()
    return found


def attack_relpath(kind: str, root: Path, outside: Path) -> tuple[str, str]:
    """(the relpath a planted row names, a word of it output must never show)."""
    if kind == "dotdot":
        return os.path.relpath(outside / "victim", root), "precious"
    if kind == "absolute":
        return str(outside / "victim"), "precious"
    (root / "Evil" / "Pat").mkdir(parents=True)
    (root / "Evil" / "Pat" / "Study").symlink_to(outside)
    return "Evil/Pat/Study/victim", "Evil"


def plant(root: Path, uid: str, relpath: str, *, name: str = PLANTED, nfiles: int = 2,
          files: list[tuple[str, int, str]] | None = None, folder_mtime: int = 0,
          checked: float = 0.0, images: int = 2) -> Path:
    """A Complete row written the way an attacker would: plain SQLite, no help from us."""
    path = root / ".nbia" / name
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    if files is None:
        data = b"keep me\n"
        files = [("notes.txt", len(data), hashlib.md5(data).hexdigest()),
                 ("1-1.dcm", 9, hashlib.md5(b"not yours").hexdigest()),
                 ("1-2.dcm", 5, "0" * 32)]
    info = {"series_uid": uid, "collection": "Planted", "patient_id": "P",
            "image_count": images, "file_size": 14}
    now = time.time()
    db.execute("INSERT OR REPLACE INTO series (uid, state, attempts, last_error, relpath, "
               "metadata, files, bytes, updated, completed, nfiles, folder_mtime, adopted, "
               "checked) VALUES (?, 'Complete', 1, '', ?, ?, ?, 14, ?, ?, ?, ?, 0, ?)",
               (uid, relpath, json.dumps(info), json.dumps([list(f) for f in files]),
                now + 50, now + 50, nfiles, folder_mtime, checked or now + 100))
    db.commit()
    db.close()
    return path


def attacked(tmp_path: Path, archive, server, kind: str) -> tuple[Path, list[str], Path, str]:
    """A seeded root whose last series has a planted row of ``kind`` naming a folder
    outside: (root, uids, the outside folder, the word output must never show)."""
    root, uids = seeded(tmp_path, archive, server)
    outside = precious(tmp_path)
    relpath, word = attack_relpath(kind, root, outside)
    plant(root, uids[-1], relpath)
    return root, uids, outside, word


def image_requests(server) -> list[str]:
    return [r.series_uid for r in server.requests
            if "getImage" in r.path and r.series_uid and r.status == 200]


def warnings_naming(text: str, journal: str = PLANTED) -> list[str]:
    return [line for line in text.splitlines() if journal in line]


def assert_refused(done, word: str) -> None:
    """One warning line naming the planted journal; nothing names the outside folder."""
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert word not in output, output
    lines = warnings_naming(done.stderr)
    assert len(lines) == 1 and "warning" in lines[0], done.stderr
    assert "outside the download root" in lines[0], lines[0]


# --------------------------------------------------------------------------- relpaths


@pytest.mark.parametrize("text", [
    "../x/y/z", "a/../b/c", "/etc/a/b/c", "a/b/c/..", "a/./b/c", "a//b/c", "a/b/c/d/",
    ".nbia/staging/x/y", "a\\..\\b/c/d", "a/b\x00/c/d", "", ".", "a/b/c", "a/b/c/d/e",
    "C:/a/b/c", "a/b/c:/d",
])
def test_unsafe_relpaths_are_refused(text):
    from nbia_retriever.engine.rows import safe_relpath

    assert safe_relpath(text) is None


def test_the_folders_the_layouts_make_are_safe():
    from nbia_retriever.engine.rows import safe_relpath

    text = "TCGA-BRCA/TCGA-A1 x/01-01-2000-NA-Breast 3-12345/1.000000-Axial T1-67890"
    relpath = safe_relpath(text)
    assert relpath is not None and relpath.as_posix() == text


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("kind", KINDS)
def test_verify_never_reads_outside_the_root(tmp_path, archive, server, kind):
    root, _uids, outside, word = attacked(tmp_path, archive, server, kind)
    before = snapshot(outside)
    done = run_cli(["verify", str(root)], timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_refused(done, word)
    assert "verified 2 series" in done.stdout
    assert snapshot(outside) == before


@pytest.mark.parametrize("kind", KINDS)
def test_verify_server_repair_never_moves_a_folder_outside(tmp_path, archive, server, kind):
    root, _uids, outside, word = attacked(tmp_path, archive, server, kind)
    before = snapshot(outside)
    done = run_cli(["verify", str(root), "--server", "--api-url", server.api_url,
                    "--repair"], timeout=120)
    assert snapshot(outside) == before
    assert done.returncode == 0, done.stdout + done.stderr
    assert_refused(done, word)
    assert "checked 2 series against the server: all match" in done.stdout
    assert not list((root / ".nbia").glob("repair-*"))


@pytest.mark.parametrize("kind", KINDS)
def test_merge_reports_never_names_outside(tmp_path, archive, server, kind):
    root, uids, outside, word = attacked(tmp_path, archive, server, kind)
    (root / "metadata.csv").unlink()  # to be rebuilt from the journals
    before = snapshot(outside)
    done = run_cli(["merge-reports", str(root)], timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr  # the planted series is missing
    assert_refused(done, word)
    assert any(line.startswith(f"missing {uids[-1]}") for line in done.stdout.splitlines())
    rows = metadata_rows(root)
    assert sorted(r[0] for r in rows) == sorted(uids[:-1])
    assert word not in (root / "metadata.csv").read_text(encoding="utf-8")
    assert snapshot(outside) == before


@pytest.mark.parametrize("kind", KINDS)
def test_a_download_rerun_fetches_the_series_again(tmp_path, archive, server, kind):
    root, uids, outside, word = attacked(tmp_path, archive, server, kind)
    before = snapshot(outside)
    server.clear_requests()
    manifest = write_manifest(tmp_path / "all.tcia", uids, server.download_url)
    done = run_cli(["download", str(manifest), "-d", str(tmp_path / "dl")], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_refused(done, word)
    assert image_requests(server) == [uids[-1]]
    assert snapshot(outside) == before
    rows = {r[0]: r for r in metadata_rows(root)}
    assert sorted(rows) == sorted(uids)
    where = root / rows[uids[-1]][15]
    assert word not in rows[uids[-1]][15] and len(list(where.glob("*.dcm"))) == 2
    # The next run believes its own row and still refuses the planted one, quietly
    # fetching nothing.
    server.clear_requests()
    again = run_cli(["download", str(manifest), "-d", str(tmp_path / "dl")], timeout=120)
    assert again.returncode == 0 and image_requests(server) == [], again.stderr
    assert word not in again.stdout + again.stderr


@pytest.mark.parametrize("journal", [PLANTED, "journal.sqlite"])
@pytest.mark.parametrize("present", [0, 1])
def test_a_complete_row_for_a_folder_without_its_images_is_not_believed(
        tmp_path, archive, server, journal, present):
    """A row planted in another journal, or added to our own group-writable one, saying
    a folder inside the root that holds none or some of the images is complete; its
    folder mtime copied so that one ``stat`` would take it as unchanged."""
    root, uids = seeded(tmp_path, archive, server)
    folder = root / "Planted" / "P" / "S" / "series"
    folder.mkdir(parents=True)
    for n in range(present):
        (folder / f"1-{n + 1}.dcm").write_bytes(b"partial")
    mtime = os.stat(folder).st_mtime_ns
    plant(root, uids[-1], "Planted/P/S/series", name=journal, nfiles=present,
          files=[(f"1-{n + 1}.dcm", 7, "") for n in range(present)], folder_mtime=mtime,
          checked=mtime / 1e9 + 100)
    server.clear_requests()
    manifest = write_manifest(tmp_path / "all.tcia", uids, server.download_url)
    report = download(manifest, tmp_path / "dl", **FAST)
    assert report.ok, report.summary()
    assert image_requests(server) == [uids[-1]], (report.summary(), server.requests)
    got = report.results[uids[-1]]
    assert got.relpath != "Planted/P/S/series"
    assert len(list((root / got.relpath).glob("*.dcm"))) == 2


def test_a_row_of_the_wrong_types_is_neither_believed_nor_a_traceback(tmp_path, archive,
                                                                       server):
    """SQLite keeps whatever type a planter writes: texts for numbers, a number for the
    folder. Each command still answers in lines, and the series is fetched again."""
    root, uids = seeded(tmp_path, archive, server)
    path = plant(root, uids[-1], "x/y/z/w")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE series SET relpath = 123, nfiles = 'many', completed = 'soon', "
                   "checked = 'x', folder_mtime = 'y', bytes = 'z', attempts = 'w'")
    for args in (["verify", str(root)], ["merge-reports", str(root), "--check"]):
        done = run_cli(args, timeout=60)
        assert "Traceback" not in done.stdout + done.stderr, done.stderr
        assert len(warnings_naming(done.stderr)) == 1, done.stderr
    server.clear_requests()
    report = download(write_manifest(tmp_path / "all.tcia", uids, server.download_url),
                      tmp_path / "dl", **FAST)
    assert report.ok and image_requests(server) == [uids[-1]], report.summary()
    assert len(report.warnings) == 1 and PLANTED in report.warnings[0]


# --------------------------------------------------------------------------- our own rows


def trusted_rows(root: Path) -> dict[str, bool]:
    from nbia_retriever.engine.journal import Journal

    with Journal(root / ".nbia" / "journal.sqlite", readonly=True) as journal:
        return {uid: record.trusted for uid, record in journal.completed_index().items()}


def test_our_rows_are_signed_and_an_edited_one_is_not_believed_by_a_stat(
        tmp_path, archive, server):
    root, uids = seeded(tmp_path, archive, server)
    assert trusted_rows(root) == dict.fromkeys(uids[:-1], True)
    # Someone of the group edits our row (fewer files, the folder emptied): the MAC no
    # longer holds, so the folder is counted against the row's image count, and the
    # series is fetched again.
    victim = uids[0]
    with sqlite3.connect(root / ".nbia" / "journal.sqlite") as db:
        relpath = db.execute("SELECT relpath FROM series WHERE uid = ?", (victim,)).fetchone()[0]
        db.execute("UPDATE series SET nfiles = 1 WHERE uid = ?", (victim,))
    assert trusted_rows(root)[victim] is False
    for image in sorted((root / relpath).glob("*.dcm"))[1:]:
        image.unlink()
    server.clear_requests()
    report = download(write_manifest(tmp_path / "first.tcia", uids[:-1], server.download_url),
                      tmp_path / "dl", **FAST)
    assert report.ok and image_requests(server) == [victim], report.summary()


def test_rows_of_an_older_version_are_counted_once_then_signed(tmp_path, archive, server):
    root, uids = seeded(tmp_path, archive, server)
    with sqlite3.connect(root / ".nbia" / "journal.sqlite") as db:
        # as an older version made it: no MAC column, no index of finished rows
        db.execute("DROP INDEX IF EXISTS finished_rows")
        db.execute("ALTER TABLE series DROP COLUMN mac")
    server.clear_requests()
    manifest = write_manifest(tmp_path / "first.tcia", uids[:-1], server.download_url)
    report = download(manifest, tmp_path / "dl", **FAST)
    assert report.ok and report.skipped == 2 and image_requests(server) == []
    assert report.warnings == []
    assert trusted_rows(root) == dict.fromkeys(uids[:-1], True)


def test_the_row_key_is_private_or_not_used(tmp_path, monkeypatch):
    """The key is created 0600 in the user's data folder; a key file others can read
    (or one of the wrong size) is not used: no row is then believed without a count."""
    from nbia_retriever.engine.rows import ENV_DATA, KEY_NAME, row_key

    monkeypatch.setenv(ENV_DATA, str(tmp_path / "fresh"))
    assert row_key() is None  # never created by a reader
    key = row_key(create=True)
    path = tmp_path / "fresh" / KEY_NAME
    assert key is not None and len(key) == 32 and path.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv(ENV_DATA, str(tmp_path / "shared"))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / KEY_NAME).write_bytes(b"k" * 32)
    os.chmod(tmp_path / "shared" / KEY_NAME, 0o644)
    assert row_key() is None and row_key(create=True) is None
    os.chmod(tmp_path / "shared" / KEY_NAME, 0o600)
    assert row_key() == b"k" * 32


def test_our_own_rows_through_a_planted_link_are_not_believed(tmp_path, archive, server):
    """Someone moves our collection folder out of the root and links it back: our own
    signed rows now lead outside, so they are refused (named in one warning), and the
    folder outside is neither read nor written."""
    root, uids = seeded(tmp_path, archive, server)
    collection = next(p for p in root.iterdir() if p.is_dir() and p.name != ".nbia")
    moved = tmp_path / "precious"
    collection.rename(moved)
    collection.symlink_to(moved)
    before = snapshot(moved)
    manifest = write_manifest(tmp_path / "first.tcia", uids[:-1], server.download_url)
    done = run_cli(["download", str(manifest), "-d", str(tmp_path / "dl")], timeout=120)
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "precious" not in output, output
    lines = warnings_naming(done.stderr, "journal.sqlite")
    assert len(lines) == 1 and "2 rows" in lines[0], done.stderr
    assert done.returncode != 0  # it cannot publish through the link either: refused
    assert "symbolic link" in done.stderr
    assert snapshot(moved) == before
