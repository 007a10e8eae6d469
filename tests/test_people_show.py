"""Series shown as people know them (issue 25 item 3): ``list``, the view's table, the
progress lines and the failure lines name a series by Collection, Patient ID, Study
Date, Modality, Series Description and image count (from the metadata), with the UID's
tail where space is short and whole UIDs with ``--wide``; piped, ``list`` is TSV with a
header line and whole cells; ``list`` says where each series comes from when the run's
source can (``--source auto`` with IDC's index); server text stays inert everywhere.

Everything runs against the reference server (or the hostile one) over HTTP on
127.0.0.1; the CLI in a fresh interpreter, on a pty where it draws its live display.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from pathlib import Path

import pytest

from enginehelpers import write_manifest
from hostile_server import Crafted, HostileServer, files_of, record, series_zip
from nbia_retriever.api import NbiaClient
from nbia_retriever.models import SeriesInfo, SeriesState
from nbia_retriever.report import UID_TAIL, SeriesResult, human_size
from nbia_retriever.server import FaultPlan, ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
UNKNOWN = "1.2.826.0.1.3680043.8.498.99999999999999999999999999999999999999"
HEADER = ["Collection", "Patient ID", "Study Date", "Modality", "Series Description",
          "Images", "Size", "License", "License URL", "Bytes", "Study UID", "Series UID"]


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    """Awkward descriptions included (long, '<lung> | "recon"', accents, CJK, empty)."""
    return archive_factory(seed=25, collections=2, patients=2, studies=1, series=2, images=3,
                           rows=16, columns=16, restricted=False)


@pytest.fixture(scope="module")
def srv(archive: ArchiveSummary, module_serve: Callable[..., ReferenceServer]
        ) -> ReferenceServer:
    return module_serve(archive.root)


@pytest.fixture(scope="module")
def infos(archive: ArchiveSummary, srv: ReferenceServer) -> dict[str, SeriesInfo]:
    """What the server says of each series (what the lines must show)."""
    with NbiaClient(srv.api_url) as client:  # as the CLI asks (auto)
        return client.series_metadata([s.series_uid for s in archive.series])


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")
            and not k.lower().endswith("_proxy")}
    base["NBIA_SOURCE"] = "nbia"  # unless a test says otherwise
    return {**base, **extra}


def cli(*args: str | Path, **extra: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "nbia_retriever.cli", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", env=env(**extra),
                          stdin=subprocess.DEVNULL, timeout=120, check=False)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done


def manifest(tmp_path: Path, archive: ArchiveSummary, srv: ReferenceServer | HostileServer,
             extra: tuple[str, ...] = (UNKNOWN,)) -> Path:
    url = srv.download_url if isinstance(srv, ReferenceServer) else srv.url + \
        "/nbia-download/servlet/DownloadServlet"
    return write_manifest(tmp_path / "m.tcia", [s.series_uid for s in archive.series]
                          + list(extra), url)


# -- list, piped: TSV ---------------------------------------------------------------------


def test_list_piped_is_tsv_with_whole_cells(tmp_path: Path, archive: ArchiveSummary,
                                            srv: ReferenceServer,
                                            infos: dict[str, SeriesInfo]) -> None:
    """Not a terminal: a header line, then one line per series, tab-separated, every cell
    whole (descriptions, whole UIDs, sizes with their unit and in bytes); the totals and
    the n/a note on stderr, not in the data."""
    done = cli("list", manifest(tmp_path, archive, srv), COLUMNS="40")
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert rows[0] == HEADER
    assert len(rows) == 1 + len(archive.series) + 1
    for series, row in zip(archive.series, rows[1:], strict=False):
        info = infos[series.series_uid]
        assert row == [info.collection, info.patient_id, info.study_date, info.modality,
                       info.series_description, str(info.image_count),
                       human_size(info.file_size), "CC BY 4.0", info.license_url,
                       str(info.file_size), info.study_uid, series.series_uid]
        assert re.fullmatch(r"\d+(\.\d)? (B|KB|MB|GB)", row[6])
    assert rows[-1][HEADER.index("Size")] == "n/a" and rows[-1][-1] == UNKNOWN
    assert any(len(info.series_description) > 40 for info in infos.values())  # not cut
    images = sum(i.image_count or 0 for i in infos.values())
    assert f"{len(archive.series)} series, {images} images" in done.stderr
    assert "1 series not described by the server" in done.stderr


# -- list, on a terminal ------------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 132])
def test_list_on_a_terminal_fits_and_shows_each_series(tmp_path: Path, archive: ArchiveSummary,
                                                       srv: ReferenceServer,
                                                       infos: dict[str, SeriesInfo],
                                                       width: int) -> None:
    """On a terminal the table fits its width; date, modality, image count, size (with
    its unit) and the UID's tail are never cut, the free text is, with an ellipsis."""
    done = cli("list", manifest(tmp_path, archive, srv), COLUMNS=str(width),
               TTY_COMPATIBLE="1", NO_COLOR="1")
    assert done.returncode == 0, done.stderr
    out = [ANSI.sub("", line) for line in done.stdout.splitlines()]
    assert max(len(line) for line in out) <= width, "\n".join(out)
    header = next(line for line in out if "Study Date" in line)
    for name in ("Study Date", "Modality", "Images", "Size", "Series UID"):
        assert name in header
    for series in archive.series:
        info = infos[series.series_uid]
        tail = "…" + series.series_uid[-UID_TAIL:]
        row = next(line for line in out if tail in line)
        assert series.series_uid not in row
        cells = row.split()
        assert info.study_date in cells and info.modality in cells
        assert human_size(info.file_size) in row and str(info.image_count) in cells
        if width >= 132:  # room for the names whole
            assert info.collection in cells and info.patient_id in cells
            assert info.series_description[:20] in row
    total = next(line for line in out if line.strip().startswith("Total")).split()
    assert total == ["Total", str(sum(i.image_count or 0 for i in infos.values())),
                     *human_size(sum(i.file_size or 0 for i in infos.values())).split()]
    assert f"m.tcia: {len(archive.series) + 1} series (1 n/a)" in "\n".join(out)


def test_list_wide_shows_whole_uids_and_the_study_uid(tmp_path: Path, archive: ArchiveSummary,
                                                      srv: ReferenceServer,
                                                      infos: dict[str, SeriesInfo]) -> None:
    done = cli("list", "--wide", manifest(tmp_path, archive, srv), COLUMNS="80",
               TTY_COMPATIBLE="1", NO_COLOR="1")
    assert done.returncode == 0, done.stderr
    out = [ANSI.sub("", line) for line in done.stdout.splitlines()]
    for series in archive.series:
        info = infos[series.series_uid]
        row = next(line for line in out if series.series_uid in line)
        assert info.study_uid in row and info.study_date in row
        assert info.series_description in row  # whole, even past 80 columns


# -- server text stays inert ------------------------------------------------------------


def test_list_keeps_terminal_escapes_in_server_text_inert(tmp_path: Path,
                                                          archive: ArchiveSummary) -> None:
    """A description with escapes, a tab and a line break: no escape reaches the
    terminal, and the TSV line of that series keeps its columns."""
    evil = archive.series[0]
    with HostileServer() as hostile:
        for series in archive.series:
            meta = record(series, collection="C\x1b]0;pwned\x07", patient="P\x1b[2J1")
            if series is evil:
                meta["Series Description"] = "RED\x1b[31m\tTAB\nLINE\x9b31m"
            hostile.series[series.series_uid] = Crafted(meta, series_zip(files_of(series)))
        path = manifest(tmp_path, archive, hostile, extra=())
        piped = cli("list", path, "--api-url", hostile.api_url)
        terminal = cli("list", path, "--api-url", hostile.api_url, COLUMNS="200",
                       TTY_COMPATIBLE="1", NO_COLOR="1")
    for done in (piped, terminal):
        assert done.returncode == 0, done.stderr
        assert "\x1b[31m" not in done.stdout and "\x1b]0;" not in done.stdout
        assert "\x1b[2J" not in done.stdout and "\x9b" not in done.stdout
        assert "\x07" not in done.stdout
    rows = [line.split("\t") for line in piped.stdout.splitlines()]
    assert all(len(row) == len(HEADER) for row in rows)
    row = next(r for r in rows if r[-1] == evil.series_uid)
    assert "RED" in row[4] and "TAB" in row[4] and "LINE" in row[4]


# -- where each series comes from -------------------------------------------------------


def test_list_says_where_each_series_comes_from(tmp_path: Path, archive: ArchiveSummary,
                                                srv: ReferenceServer) -> None:
    """``--source auto`` with IDC's index: a From column (IDC's bucket, folder and
    version for the series the index holds, nbia for the rest); ``--source nbia`` has
    nothing to say: no column."""
    pytest.importorskip("duckdb")
    from nbia_retriever.server.idcdata import write_idc_index

    left_out = archive.series[-1].series_uid
    view = write_idc_index(archive, tmp_path / "idc", exclude=[left_out])
    path = manifest(tmp_path, archive, srv, extra=())
    done = cli("list", path, "--source", "auto", "--idc-index", tmp_path / "idc")
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert rows[0] == [*HEADER, "From"]
    where = {row[HEADER.index("Series UID")]: row[-1] for row in rows[1:]}
    assert where[left_out] == "nbia"
    for series in archive.series[:-1]:
        assert re.fullmatch(r"idc s3://[\w-]+/[0-9a-f-]{36}/ v\d+", where[series.series_uid]), \
            where[series.series_uid]
    assert view is not None
    terminal = cli("list", path, "--source", "auto", "--idc-index", tmp_path / "idc",
                   COLUMNS="200", TTY_COMPATIBLE="1", NO_COLOR="1")
    assert "From" in terminal.stdout and "idc s3://" in terminal.stdout
    plain = cli("list", path, "--source", "nbia")
    assert plain.stdout.splitlines()[0].split("\t") == HEADER


# -- progress and failure lines (the live display, on a pty) ------------------------------


def test_active_lines_fit_and_show_the_series() -> None:
    from rich.console import Console

    from nbia_retriever.cli.live import series_lines

    results = []
    for i, description in enumerate(["CHEST ABDOMEN PELVIS W CONTRAST PORTAL VENOUS PHASE",
                                     "Tête – Thorax ✓ 肺", "\x1b[2Jevil\x07"]):
        result = SeriesResult(f"1.2.826.0.1.3680043.8.498.{i}7280442341620899765276652")
        result.info = SeriesInfo(result.uid, collection="LIDC-IDRI", patient_id="LIDC-0001",
                                 study_date="01-01-2000", modality="CT",
                                 series_description=description, image_count=133,
                                 file_size=70_000_000)
        result.state = SeriesState.DOWNLOADING
        result.bytes_done = 10_000_000 * i
        results.append(result)
    for width in (80, 120):
        console = Console(width=width, record=True, color_system=None)
        console.print(series_lines(results, width), end="")
        lines = console.export_text().splitlines()
        assert len(lines) == 3 and max(len(line) for line in lines) <= width, lines
        for result, line in zip(results, lines, strict=True):
            assert "01-01-2000" in line and " CT " in line and "133 img" in line
            assert line.rstrip().endswith("…" + result.uid[-UID_TAIL:])
            assert "\x1b" not in line and "\x07" not in line
        assert "28.6%" in lines[2]
    assert "LIDC-IDRI" in lines[0] and "CHEST ABDOMEN PELVIS" in lines[0]


def run_on_pty(args: list[str], *, columns: int = 200) -> tuple[int, str]:
    """``nbia-retriever ARGS`` with stdout and stderr on a pty ``columns`` wide (the live
    display draws); returns its exit code and everything it wrote, escapes removed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "nbia_retriever.cli", *args],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            env=env(TERM="xterm"), close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            raise AssertionError("the CLI wrote nothing for 120 s")
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    code = proc.wait(timeout=60)
    return code, ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


def test_retry_and_failure_lines_name_the_series(tmp_path: Path, archive: ArchiveSummary,
                                                 serve: Callable[..., ReferenceServer],
                                                 infos: dict[str, SeriesInfo]) -> None:
    """The lines the run prints while it runs: a retry and a failure, each naming the
    series as people know it (collection · patient · date · modality · description ·
    images, and the UID's tail), the UID not repeated in the reason."""
    failing = archive.series[1]
    info = infos[failing.series_uid]
    server = serve(archive.root, faults=FaultPlan(script={failing.series_uid: ["http500"] * 9}))
    path = write_manifest(tmp_path / "m.tcia", [s.series_uid for s in archive.series],
                          server.download_url)
    code, out = run_on_pty(["download", str(path), "-d", str(tmp_path / "dl"), "--retries",
                            "1", "--backoff", "0.01", "--processes", "0"])
    assert code == 1, out
    label_start = " · ".join(p for p in (info.collection, info.patient_id, info.study_date,
                                         info.modality) if p)
    tail = "…" + failing.series_uid[-UID_TAIL:]
    retry = next(line for line in out.splitlines() if line.startswith("retrying "))
    assert label_start in retry and tail in retry and "attempt 1" in retry, retry
    failed = next(line for line in out.splitlines() if line.startswith("Error: "))
    assert label_start in failed and f"{info.image_count} images ({tail})" in failed, failed
    assert "HTTP 500" in failed and failing.series_uid not in failed, failed


# -- the view's table ---------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("width", [80, 120, 160])
async def test_the_view_table_shows_series_as_people_know_them(
        tmp_path: Path, archive: ArchiveSummary, srv: ReferenceServer,
        infos: dict[str, SeriesInfo], width: int) -> None:
    """Wide, every column; at 120 and 80 columns the ones the detail panel shows anyway
    go, Progress and Status stay, and so do the patient and the description."""
    from textual.widgets import DataTable

    from nbia_retriever.engine import DownloadOptions
    from nbia_retriever.manifest import read_manifest
    from nbia_retriever.tui import RetrieverApp
    from nbia_retriever.tui.app import READY

    path = manifest(tmp_path, archive, srv, extra=())
    app = RetrieverApp(read_manifest(path), tmp_path / "dl",
                       DownloadOptions(api_url=srv.api_url, source="nbia"))
    async with app.run_test(size=(width, 30)) as pilot:
        deadline = 300
        while app.phase != READY and deadline:
            await pilot.pause(0.1)
            deadline -= 1
        table = app.query_one("#table", DataTable)
        labels = [str(c.label) for c in table.columns.values()]
        expected = {80: ["Patient ID", "Series Description", "Progress", "Status"],
                    120: ["Patient ID", "Study Date", "Modality", "Series Description",
                          "Images", "Progress", "Status"],
                    160: ["Collection", "Patient ID", "Study Date", "Modality",
                          "Series Description", "Series UID", "Images", "Size", "Progress",
                          "Status"]}[width]
        assert [label for label in labels if label.strip()] == expected
        keys = [str(k.value) for k in table.columns]
        for series in archive.series:
            info = infos[series.series_uid]
            row = dict(zip(keys, table.get_row(series.series_uid), strict=True))
            assert row["patient"].text == info.patient_id
            assert row["description"].text == (info.series_description
                                               if len(info.series_description) <= 24
                                               else info.series_description[:23] + "…")
            if width >= 120:
                assert row["date"].text == info.study_date
                assert row["modality"].text == info.modality
                assert row["images"].text == str(info.image_count)
            if width >= 160:
                assert row["series"].text == "…" + series.series_uid[-UID_TAIL:]
                assert row["collection"].text == info.collection
        # Sorting by Study Date sorts by the date, not the text MM-DD-YYYY.
        if width >= 120:
            app.sort_by("date")
            await pilot.pause()
            shown = [infos[str(r.key.value)].study_date for r in table.ordered_rows]
            years = [(d[6:], d[:5]) for d in shown]
            assert years == sorted(years)
