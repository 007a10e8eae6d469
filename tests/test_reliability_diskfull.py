"""Disk full: the run stops with one clear line, nothing corrupt is published, and the
same command finishes the job once space is free again.

Two ways to run out of space. ``RLIMIT_FSIZE`` (any user, any machine) makes every write
past a file size fail with EFBIG (SIGXFSZ ignored, so the write fails instead of the
process dying): it hits the big image writes, like a quota would. A small tmpfs (root
only; skipped otherwise) is the real thing, ENOSPC for *whatever* writes next: the
journal (SQLite has its own "database or disk is full" error), ``metadata.csv``, a
LICENSE, an image, at fill levels that move the failure across all of them.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from enginehelpers import download_report, expected_series, write_manifest
from nbia_retriever import download
from nbia_retriever.report import METADATA_HEADER, MetadataCsv
from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary
from reliability_helpers import CLI, assert_root_clean, metadata_rows, tmpfs

ROOT_NAME = "manifest-1700000000000"
IMAGE_LIMIT = 512 * 1024  # RLIMIT_FSIZE: the 512x512 images (~513 KiB) cannot be written


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    # 3 series of 2 images of ~513 KiB each: about 3.2 MB in all.
    return archive_factory(seed=41, collections=1, patients=1, studies=1, series=3, images=2,
                           rows=512, columns=512, restricted=False)


@pytest.fixture(scope="module")
def expected(archive: ArchiveSummary) -> dict[str, dict[str, str]]:
    return expected_series(archive.root)


@pytest.fixture(scope="module")
def server(archive: ArchiveSummary,
           module_serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    return module_serve(archive.root)


@pytest.fixture()
def cart(tmp_path: Path, server: ReferenceServer, archive: ArchiveSummary) -> Path:
    return write_manifest(tmp_path / "cart.tcia", [s.series_uid for s in archive.series],
                          server.download_url)


def limit_file_size(limit: int):  # type: ignore[no-untyped-def]
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def cli_download(cart: Path, dest: Path, *extra: str, preexec=None  # type: ignore[no-untyped-def]
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "download", str(cart), "-d", str(dest), "--backoff", "0.01", "-w", "2", *extra],
        capture_output=True, text=True, timeout=120, preexec_fn=preexec, check=False,
    )


def assert_one_clear_stop(done: subprocess.CompletedProcess[str]) -> None:
    output = done.stdout + done.stderr  # the summary goes to stdout unless --quiet
    assert done.returncode == 1, output
    assert "Traceback" not in output and "Exception" not in output, output
    stops = [line for line in output.splitlines() if line.startswith("stopped: ")]
    assert len(stops) == 1, output
    assert "re-run the same command to resume" in stops[0]


def test_file_size_limit_stops_the_run_then_rerun_completes(tmp_path, cart, archive,
                                                             expected):
    dest = tmp_path / "dl"
    full = cli_download(cart, dest, preexec=limit_file_size(IMAGE_LIMIT))
    assert_one_clear_stop(full)
    assert "disk full" in full.stdout + full.stderr
    root = dest / ROOT_NAME
    assert_root_clean(root, expected=expected)
    assert metadata_rows(root) == []
    again = cli_download(cart, dest, "--quiet")
    assert again.returncode == 0, again.stderr
    assert_root_clean(root, complete=[s.series_uid for s in archive.series], expected=expected)


def test_metadata_csv_append_that_hits_a_full_disk_leaves_no_torn_row(tmp_path):
    # The append runs in a child whose file-size limit ends the write mid-row; the parent
    # (no limit) then appends the same series again, as the engine's re-run would.
    path = tmp_path / "metadata.csv"
    first = MetadataCsv(path)
    first.append(["1.2.3", *["x"] * (len(METADATA_HEADER) - 1)])
    limit = path.stat().st_size + 40  # the next row is ~100 bytes: it is cut at 40
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from nbia_retriever.report import MetadataCsv, METADATA_HEADER\n"
        "csv = MetadataCsv(Path(sys.argv[1]))\n"
        "try:\n"
        "    csv.append(['1.2.4', *['y' * 5] * (len(METADATA_HEADER) - 1)])\n"
        "except OSError as exc:\n"
        "    sys.exit(exc.errno)\n"
    )
    child = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                           text=True, preexec_fn=limit_file_size(limit), check=False)
    assert child.returncode == 27, child.stderr  # EFBIG
    assert path.read_bytes().endswith(b"\n"), "the failed append left a torn row"
    again = MetadataCsv(path)
    assert "1.2.4" not in again
    again.append(["1.2.4", *["y" * 5] * (len(METADATA_HEADER) - 1)])
    rows = metadata_rows(tmp_path)
    assert [r[0] for r in rows] == ["1.2.3", "1.2.4"]


def test_a_torn_last_row_from_a_power_cut_is_repaired(tmp_path):
    path = tmp_path / "metadata.csv"
    MetadataCsv(path).append(["1.2.3", *["x"] * (len(METADATA_HEADER) - 1)])
    with path.open("ab") as handle:
        handle.write(b"1.2.4,SomeColl")  # the row that was being written when power went
    repaired = MetadataCsv(path)
    assert "1.2.4" not in repaired
    repaired.append(["1.2.4", *["y"] * (len(METADATA_HEADER) - 1)])
    assert [r[0] for r in metadata_rows(tmp_path)] == ["1.2.3", "1.2.4"]


# --------------------------------------------------------------------------- real tmpfs


def fill(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` until only ``leave`` bytes are free."""
    filler = folder / "filler"
    stat = os.statvfs(folder)
    with filler.open("wb") as handle:
        handle.write(bytes(max(0, stat.f_bavail * stat.f_frsize - leave)))
    return filler


# Free space left before the run, in KiB: from nothing (the journal cannot even be
# created) through the journal, metadata.csv and staging, to one series fitting.
FREE_KIB = [0, 24, 100, 1200, 2300]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("free_kib", FREE_KIB)
def test_real_full_disk_at_every_fill_level(tmp_path, cart, archive, expected, free_kib):
    uids = [s.series_uid for s in archive.series]
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        filler = fill(mnt, free_kib * 1024)
        dest = mnt / "dl"
        crashed: list[BaseException] = []
        hook, threading.excepthook = threading.excepthook, lambda a: crashed.append(a.exc_value)
        try:
            report = download_report(cart, dest, backoff_base=0.01, workers=2)
        finally:
            threading.excepthook = hook
        assert crashed == [], f"an engine thread died: {crashed!r}"
        assert not report.ok
        assert report.fatal and "\n" not in report.fatal
        assert "re-run the same command" in report.fatal
        filler.unlink()  # space is free again (the checks below need some too)
        root = dest / ROOT_NAME
        if (root / ".nbia" / "journal.sqlite").exists():
            assert_root_clean(root, expected=expected, settled=False)
        again = download(cart, dest, backoff_base=0.01, workers=2)
        assert again.ok, again.summary()
        assert_root_clean(root, complete=uids, expected=expected)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_real_full_disk_through_the_cli_is_one_line(tmp_path, cart, archive, expected):
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        filler = fill(mnt, 0)
        full = cli_download(cart, mnt / "dl")
        assert_one_clear_stop(full)
        filler.unlink()
        again = cli_download(cart, mnt / "dl", "--quiet")
        assert again.returncode == 0, again.stderr
        assert_root_clean(mnt / "dl" / ROOT_NAME,
                          complete=[s.series_uid for s in archive.series], expected=expected)
