"""Issue 21, local files: a download root's special files and a served archive's cache.

* A FIFO, a socket or a device planted in a download root under a name the tool opens
  (``metadata.csv``, ``.nbia/root.json``, the journal and its WAL, the staging and lock
  folders, a series lock) is one clear error naming it, at once: never a hang (a FIFO
  blocks whoever opens it for reading), never an endless read (``/dev/zero``), never a
  misleading "disk full".
* ``serve ARCHIVE`` trusts nothing in ``ARCHIVE/.nbia-server-cache``: a link planted as a
  blob folder, a blob or the written manifest is not followed, an index row naming a
  file outside the cache (or one not matching its image) is rebuilt, never served.

Real CLI subprocesses (with a timeout: a hang fails the test instead of blocking the
suite) against ``hostile_server`` and the reference server on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from enginehelpers import write_manifest
from reliability_helpers import CLI, run_cli

if TYPE_CHECKING:
    import zipfile

ROOT_NAME = "manifest-1700000000000"
#: Seconds a run may take to refuse a planted special file; a hang runs into it.
PROMPT = 60


@pytest.fixture(scope="module")
def archive(archive_factory):  # type: ignore[no-untyped-def]
    return archive_factory(seed=121, collections=1, patients=1, studies=1, series=2,
                           images=2, rows=16, columns=16, restricted=False, awkward=False)


def env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "NBIA_PASSWORD"}
    base["NBIA_RETRIEVER_CONFIG"] = os.devnull + ".absent"
    return base


def plant(path: Path, kind: str) -> None:
    """A FIFO, a bound UNIX socket or a character device (/dev/zero's numbers) at path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        # bound in a short folder (a socket's path is limited to ~100 bytes), then moved
        with tempfile.TemporaryDirectory(dir="/tmp") as short:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.bind(os.path.join(short, "s"))
                os.rename(os.path.join(short, "s"), path)
            finally:
                sock.close()
    else:
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 5))
        except PermissionError:
            pytest.skip("creating a device needs CAP_MKNOD")


KINDS = {"fifo": "a FIFO", "socket": "a socket", "device": "a character device"}
ROOT_FILES = ["metadata.csv", ".nbia/root.json", ".nbia/journal.sqlite",
              ".nbia/journal.sqlite-wal", ".nbia/staging", ".nbia/locks"]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("place", ROOT_FILES)
def test_a_special_file_in_the_roots_own_files_is_one_clear_error(tmp_path, archive, hostile,
                                                                  place, kind):
    uid = archive.series[0].series_uid
    root = tmp_path / "dl" / ROOT_NAME
    target = root / place
    plant(target, kind)
    cart = write_manifest(tmp_path / "cart.tcia", [uid], hostile.download_url)
    done = run_cli(["download", str(cart), "-d", str(tmp_path / "dl"), "--api", "v1",
                    "--quiet"], env=env(), timeout=PROMPT)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(target) in lines[0] and f"is {KINDS[kind]}" in lines[0], lines[0]
    assert "disk full" not in lines[0] and "Traceback" not in done.stderr
    assert hostile.image_requests(uid) == 0
    assert stat.S_IFMT(os.lstat(target).st_mode) != stat.S_IFREG  # left as it was


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_special_file_as_a_series_lock_fails_that_series_only(tmp_path, archive, hostile,
                                                                kind):
    from nbia_retriever.layout import sanitize_component

    first, second = (s.series_uid for s in archive.series)
    root = tmp_path / "dl" / ROOT_NAME
    lock = root / ".nbia" / "locks" / f"{sanitize_component(first, fallback='series')}.lock"
    plant(lock, kind)
    cart = write_manifest(tmp_path / "cart.tcia", [first, second], hostile.download_url)
    done = run_cli(["download", str(cart), "-d", str(tmp_path / "dl"), "--api", "v1"],
                   env=env(), timeout=PROMPT)
    assert done.returncode == 1, done.stderr
    assert str(lock) in done.stdout + done.stderr
    assert f"is {KINDS[kind]}, not a file" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert hostile.image_requests(first) == 0 and hostile.image_requests(second) == 1
    assert stat.S_IFMT(os.lstat(lock).st_mode) != stat.S_IFREG


# ----------------------------------------------------------------------------- serve's cache

#: What a planted blob or a tampered row would make the server send: text from outside
#: the cache, as raw DEFLATE (the form the server streams blobs in).
SECRET = b"SECRET-FROM-OUTSIDE-THE-SERVER-CACHE\n" * 64


def _deflate(data: bytes) -> bytes:
    import zlib

    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


@pytest.fixture()
def local_archive(tmp_path, archive_factory):  # type: ignore[no-untyped-def]
    """A copy of a small archive with its cache built, as its author hands it over."""
    import shutil

    from nbia_retriever.server import ArchiveIndex

    summary = archive_factory(seed=122, collections=1, patients=1, studies=1, series=1,
                              images=3, rows=16, columns=16, restricted=False, awkward=False)
    root = tmp_path / "archive"
    shutil.copytree(summary.root, root,
                    ignore=shutil.ignore_patterns(".nbia-server-cache"))
    ArchiveIndex.load(root)
    series = summary.series[0]
    return root, series.series_uid, [root / p.relative_to(summary.root) for p in series.files]


def _tamper(root: Path, how: str) -> bytes:
    """Point the first image's blob outside the cache (``how``); returns the bytes the
    server would send for it."""
    import sqlite3

    cache = root / ".nbia-server-cache"
    outside = root.parent / "outside"
    outside.mkdir()
    planted = _deflate(SECRET)
    db = sqlite3.connect(cache / "index.sqlite")
    try:
        relpath, md5 = db.execute("SELECT relpath, md5 FROM files ORDER BY relpath").fetchone()
        (outside / "secret.z").write_bytes(planted)
        (outside / f"{md5}.z").write_bytes(planted)
        blob = f"blobs/{md5[:2]}/{md5}.z"
        if how == "row-relative":
            blob = "../../outside/secret.z"
        elif how == "row-absolute":
            blob = str(outside / "secret.z")
        elif how == "row-other-file":  # inside the cache, but not a blob
            blob = "index.sqlite"
            planted = (cache / "index.sqlite").read_bytes()[:4096]
        elif how == "blob-folder-link":
            import shutil

            shutil.rmtree(cache / "blobs" / md5[:2])
            (cache / "blobs" / md5[:2]).symlink_to(outside, target_is_directory=True)
        elif how == "blob-link":
            (cache / blob).unlink()
            (cache / blob).symlink_to(outside / "secret.z")
        db.execute("UPDATE files SET blob = ?, compressed_size = ? WHERE relpath = ?",
                   (blob, len(planted), relpath))
        db.commit()
    finally:
        db.close()
    return planted


@pytest.mark.parametrize("how", ["row-relative", "row-absolute", "row-other-file",
                                 "blob-folder-link", "blob-link"])
def test_serve_never_sends_bytes_from_outside_its_cache(local_archive, serve, how):
    import hashlib
    import io
    import zipfile

    import httpx

    root, uid, files = local_archive
    planted = _tamper(root, how)
    server = serve(root)
    response = httpx.get(f"{server.api_url}/v1/getImageWithMD5Hash",
                         params={"SeriesInstanceUID": uid}, timeout=30)
    assert response.status_code == 200
    body = response.content
    assert planted[:256] not in body, "served bytes from outside the cache"
    # the tampered row was rebuilt from the archive: the series is exactly its images
    got = zipfile.ZipFile(io.BytesIO(body))
    assert got.testzip() is None
    served = {hashlib.md5(got.read(n)).hexdigest() for n in got.namelist()
              if n != "md5hashes.csv"}
    assert served == {hashlib.md5(p.read_bytes()).hexdigest() for p in files}
    assert len(list((root.parent / "outside").iterdir())) == 2  # left alone


@pytest.mark.parametrize("name", ["zz", "prefix"])
def test_a_planted_blob_folder_link_is_never_written_through(local_archive, tmp_path, name):
    """The cache refreshes (an image changed): nothing is written into, or collected
    from, the folder a planted ``blobs/<name>`` link points to."""
    import hashlib

    from nbia_retriever.server import ArchiveIndex

    root, _uid, files = local_archive
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me", encoding="utf-8")
    changed = files[0]
    if name == "prefix":  # where the changed image's new blob goes
        data = changed.read_bytes()
        name = hashlib.md5(data + b"\0").hexdigest()[:2]
    blobs = root / ".nbia-server-cache" / "blobs"
    if (blobs / name).exists():
        import shutil

        shutil.rmtree(blobs / name)
    (blobs / name).symlink_to(victim, target_is_directory=True)
    with open(changed, "ab") as handle:  # one trailing byte: re-read, new blob
        handle.write(b"\0")
    index = ArchiveIndex.load(root)
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert (victim / "precious.txt").read_text(encoding="utf-8") == "keep me"
    assert len(index.series) == 1
    assert all(not p.is_symlink() for p in blobs.iterdir())


def _serve_cli(root: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """``nbia-retriever serve ROOT`` until it says it serves, exits or :data:`PROMPT`
    seconds pass (a hang); its stdout lines so far."""
    import queue
    import threading
    import time

    proc = subprocess.Popen([*CLI, "serve", str(root), "--port", "0"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    said: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            said.put(line)
        said.put(None)

    threading.Thread(target=pump, daemon=True).start()
    lines: list[str] = []
    deadline = time.monotonic() + PROMPT
    while not (lines and lines[-1].startswith("Press Ctrl+C")):
        try:
            line = said.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break  # a hang: the caller's assertion says so
        if line is None:
            break
        lines.append(line)
    return proc, lines


@pytest.mark.parametrize("place", ["manifest", "index-link", "index-fifo", "lock-link",
                                   "lock-fifo", "image-fifo"])
def test_serve_follows_no_link_and_opens_no_fifo_in_its_cache(local_archive, tmp_path, place):
    root, _uid, files = local_archive
    cache = root / ".nbia-server-cache"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me", encoding="utf-8")
    names = {"manifest": "manifest-reference-server.tcia", "index": "index.sqlite",
             "lock": "lock"}
    target = (files[0].with_name("planted.dcm") if place == "image-fifo"
              else cache / names[place.split("-")[0]])
    target.unlink(missing_ok=True)
    if place == "manifest":
        target.symlink_to(victim / "precious.txt")
    elif place.endswith("-link"):  # a link to a file that does not exist yet
        target.symlink_to(victim / "made-by-the-server")
    else:
        os.mkfifo(target)
    proc, lines = _serve_cli(root)
    try:
        assert lines and lines[-1].startswith("Press Ctrl+C"), lines
        proc.send_signal(2)
        proc.wait(timeout=PROMPT)
    finally:
        proc.kill()
        proc.wait()
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert (victim / "precious.txt").read_text(encoding="utf-8") == "keep me"
    if place != "image-fifo":
        assert stat.S_ISREG(os.lstat(target).st_mode)  # the cache's own file again
    if place == "manifest":
        assert "ListOfSeriesToDownload=" in target.read_text(encoding="utf-8")


def test_a_linked_cache_folder_is_refused_in_one_line(local_archive, tmp_path):
    import shutil

    root, _uid, _files = local_archive
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me", encoding="utf-8")
    shutil.rmtree(root / ".nbia-server-cache")
    (root / ".nbia-server-cache").symlink_to(victim, target_is_directory=True)
    done = subprocess.run([*CLI, "serve", str(root), "--port", "0"], capture_output=True,
                          text=True, env=env(), timeout=PROMPT)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and ".nbia-server-cache" in lines[0], done.stderr
    assert "symbolic link" in lines[0] and "Traceback" not in done.stderr
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_merge_reports_refuses_a_special_metadata_csv(tmp_path, archive, hostile, kind):
    uid = archive.series[0].series_uid
    cart = write_manifest(tmp_path / "cart.tcia", [uid], hostile.download_url)
    done = run_cli(["download", str(cart), "-d", str(tmp_path / "dl"), "--api", "v1",
                    "--quiet"], env=env(), timeout=PROMPT)
    assert done.returncode == 0, done.stderr
    root = tmp_path / "dl" / ROOT_NAME
    (root / "metadata.csv").unlink()
    plant(root / "metadata.csv", kind)
    done = run_cli(["merge-reports", str(root)], env=env(), timeout=PROMPT)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(root / "metadata.csv") in lines[0], done.stderr
    assert f"is {KINDS[kind]}" in lines[0]


# ------------------------------------------------ a cache swapped or edited under serve


def _swap_for_link(folder: Path, victim: Path) -> Path:
    """Move ``folder`` aside (the real one, still open in the store) and plant a link to
    ``victim`` under its name; returns where the real folder went."""
    moved = folder.with_name(folder.name + "-real")
    folder.rename(moved)
    folder.symlink_to(victim, target_is_directory=True)
    return moved


@pytest.fixture()
def victim(tmp_path) -> Path:  # type: ignore[no-untyped-def]
    """A folder of someone else's files, one named like a blob."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me", encoding="utf-8")
    (folder / ("f" * 32 + ".z")).write_bytes(b"not a blob")
    return folder


def test_clean_up_never_empties_a_blob_folder_swapped_for_a_link(local_archive, victim):
    """Garbage collection opened ``blobs/ff`` as a real folder; it is swapped for a link
    before anything is removed: the clean-up removes only in the folder it opened, and
    a link already there when a folder is opened is not entered at all."""
    from nbia_retriever.server.index import BlobStore

    root, _uid, _files = local_archive
    blobs = root / ".nbia-server-cache" / "blobs"
    (blobs / "ff").mkdir(exist_ok=True)
    (blobs / "ff" / "stale.z").write_bytes(b"no row uses me")
    with BlobStore(blobs) as store:
        assert "ff" in store.folder_names()
        folder = store.folder("ff")
        assert folder is not None
        moved = _swap_for_link(blobs / "ff", victim)
        with folder:
            folder.sweep(set())
        assert store.folder("ff") is None  # a link: nothing to open
        store.collect_garbage(set())
    assert sorted(p.name for p in victim.iterdir()) == ["f" * 32 + ".z", "precious.txt"]
    assert not (moved / "stale.z").exists()  # the folder it opened was the one cleaned


def test_a_new_blob_never_lands_in_a_folder_swapped_for_a_link(local_archive, tmp_path,
                                                               victim):
    """The blob's folder was made and opened; it is swapped for a link before the blob
    is moved in: the blob lands in the real folder, nothing is written into the link's."""
    import zlib

    from nbia_retriever.server.index import BlobStore

    root, _uid, _files = local_archive
    blobs = root / ".nbia-server-cache" / "blobs"
    image = tmp_path / "image.dcm"
    image.write_bytes(b"a new image " * 500)
    with BlobStore(blobs) as store:
        blob = store.compress(image)
        folder = store.folder(blob.md5[:2], create=True)
        assert folder is not None
        moved = _swap_for_link(blobs / blob.md5[:2], victim)
        with folder:
            name = folder.adopt(blob)
    assert name == f"blobs/{blob.md5[:2]}/{blob.md5}.z"
    assert sorted(p.name for p in victim.iterdir()) == ["f" * 32 + ".z", "precious.txt"]
    assert zlib.decompress((moved / f"{blob.md5}.z").read_bytes(), -15) == image.read_bytes()


def served_series(server, uid: str) -> tuple[zipfile.ZipFile, list[str]]:  # type: ignore[no-untyped-def]
    """The series' zip as ``server`` sends it (it must answer 200), and the sorted MD5s
    of its images."""
    import hashlib
    import io
    import zipfile

    import httpx

    response = httpx.get(f"{server.api_url}/v1/getImageWithMD5Hash",
                         params={"SeriesInstanceUID": uid}, timeout=30)
    assert response.status_code == 200
    got = zipfile.ZipFile(io.BytesIO(response.content))
    served = sorted(hashlib.md5(got.read(n)).hexdigest() for n in got.namelist()
                    if n != "md5hashes.csv")
    return got, served


@pytest.mark.parametrize("edit", ["crc32", "series_uid", "other-image"])
def test_an_edited_index_row_is_indexed_again_never_served(local_archive, serve, edit):
    """A row of ``index.sqlite`` edited by hand (its CRC, its series, or pointed at
    another image's blob) fails its MAC: the image is indexed again from the archive and
    the series served is exactly the archive's images, byte for byte."""
    import hashlib
    import sqlite3

    import httpx

    root, uid, files = local_archive
    db = sqlite3.connect(root / ".nbia-server-cache" / "index.sqlite")
    try:
        rows = db.execute("SELECT relpath, size, md5, blob, compressed_size, crc32 "
                          "FROM files ORDER BY relpath").fetchall()
        first, other = rows[0], rows[1]
        if edit == "crc32":
            db.execute("UPDATE files SET crc32 = 12345 WHERE relpath = ?", (first[0],))
        elif edit == "series_uid":
            db.execute("UPDATE files SET series_uid = '1.2.3.4.5' WHERE relpath = ?",
                       (first[0],))
        else:  # same size, so only the MAC tells
            assert first[1] == other[1] and first[2] != other[2]
            db.execute("UPDATE files SET md5 = ?, blob = ?, compressed_size = ?, crc32 = ? "
                       "WHERE relpath = ?", (*other[2:], first[0]))
        db.commit()
    finally:
        db.close()
    server = serve(root)
    got, served = served_series(server, uid)
    assert got.testzip() is None  # every CRC right
    assert served == sorted(hashlib.md5(p.read_bytes()).hexdigest() for p in files)
    gone = httpx.get(f"{server.api_url}/v1/getImageWithMD5Hash",
                     params={"SeriesInstanceUID": "1.2.3.4.5"}, timeout=30)
    assert gone.status_code != 200 or not gone.content.startswith(b"PK")


def test_serve_never_sends_through_a_blob_folder_swapped_after_indexing(local_archive, serve,
                                                                         tmp_path):
    """The server indexed its cache; then ``blobs/<xx>`` is swapped for a link to a
    folder holding a planted ``<md5>.z``: no byte of it is sent (the request fails)."""
    import sqlite3

    import httpx

    root, uid, _files = local_archive
    server = serve(root)
    db = sqlite3.connect(root / ".nbia-server-cache" / "index.sqlite")
    try:
        md5s = [m for (m,) in db.execute("SELECT md5 FROM files")]
        sizes = dict(db.execute("SELECT md5, compressed_size FROM files"))
    finally:
        db.close()
    outside = tmp_path / "outside"
    outside.mkdir()
    blobs = root / ".nbia-server-cache" / "blobs"
    planted = b""
    for md5 in md5s:
        planted = (SECRET * 4)[:sizes[md5]]  # as long as the blob it stands for
        (outside / f"{md5}.z").write_bytes(planted)
        if not (blobs / md5[:2]).is_symlink():
            _swap_for_link(blobs / md5[:2], outside)
    body = b""
    complete = False
    try:
        with httpx.stream("GET", f"{server.api_url}/v1/getImageWithMD5Hash",
                          params={"SeriesInstanceUID": uid}, timeout=30) as response:
            for chunk in response.iter_bytes():
                body += chunk
            complete = response.status_code == 200
    except httpx.RemoteProtocolError:
        pass  # the stream broke off where the blob could not be opened
    assert planted[:64] not in body, "served bytes through a swapped blob folder"
    assert not complete


@pytest.mark.parametrize("damage", ["not-a-database", "a-column-dropped", "a-table-replaced"])
def test_a_damaged_index_database_is_rebuilt_not_a_traceback(local_archive, serve, damage):
    """``index.sqlite`` garbage, or its table not the one this version writes (the
    schema number kept): the index starts afresh and the series is served whole."""
    import hashlib
    import sqlite3


    root, uid, files = local_archive
    path = root / ".nbia-server-cache" / "index.sqlite"
    if damage == "not-a-database":
        path.write_bytes(b"not SQLite at all\n" * 512)
    else:
        db = sqlite3.connect(path)
        if damage == "a-column-dropped":
            db.execute("ALTER TABLE files DROP COLUMN mac")
        else:
            db.execute("DROP TABLE files")
            db.execute("CREATE TABLE files (relpath TEXT PRIMARY KEY, size INTEGER)")
            db.execute("INSERT INTO files VALUES ('x/y.dcm', 1)")
        db.commit()
        db.close()
    server = serve(root)
    _got, served = served_series(server, uid)
    assert served == sorted(hashlib.md5(p.read_bytes()).hexdigest() for p in files)
