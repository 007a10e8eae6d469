"""Scaling out: shards downloading concurrently into one folder, merge-reports, SLURM.

The shard run is real: three ``nbia-retriever download --shard K/3`` processes start
together against the reference server over 127.0.0.1 and share one destination, as
the tasks of a job array do on a cluster's shared filesystem. The checks do not depend
on how the processes interleave: whatever the order, every series must be on disk
exactly once, identical to the archive, owned by exactly one shard.
"""

from __future__ import annotations

import csv
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from click.testing import CliRunner

from enginehelpers import downloaded_series, expected_series, write_manifest
from nbia_retriever.cli import main
from nbia_retriever.engine import shard_of
from nbia_retriever.engine.journal import Journal
from nbia_retriever.models import SeriesState
from nbia_retriever.report import METADATA_HEADER
from nbia_retriever.search import merge_reports
from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary
from nbia_retriever.verify import verify_root

SHARDS = 3
BASKET = "manifest-1700000000000.tcia"
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "slurm-array.sh"


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    return archive_factory(seed=5, collections=2, patients=2, studies=1, series=3, images=4,
                           rows=16, columns=16, restricted=False)


@pytest.fixture(scope="module")
def uids(archive: ArchiveSummary) -> list[str]:
    return [s.series_uid for s in archive.series]


@pytest.fixture(scope="module")
def sharded(archive: ArchiveSummary, uids: list[str],
            tmp_path_factory: pytest.TempPathFactory,
            module_serve: Callable[..., ReferenceServer]) -> dict[str, Any]:
    """Run the three shards at once; return what the checks need."""
    work = tmp_path_factory.mktemp("shards")
    dest = work / "dest"
    server = module_serve(archive.root)
    manifest = write_manifest(work / BASKET, uids, server.download_url, basket=BASKET)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "nbia_retriever.cli", "download", str(manifest),
             "-d", str(dest), "--shard", f"{k}/{SHARDS}", "--quiet", "--workers", "2",
             "--backoff", "0.01", "--timeout", "20"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for k in range(1, SHARDS + 1)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    return {"dest": dest, "root": dest / "manifest-1700000000000", "manifest": manifest,
            "codes": [p.returncode for p in procs], "outputs": outputs,
            "requests": list(server.requests)}


def journal_uids(root: Path) -> dict[int, dict[str, str]]:
    """shard k -> {uid: state} from each shard's own journal."""
    found: dict[int, dict[str, str]] = {}
    for k in range(1, SHARDS + 1):
        path = root / ".nbia" / f"journal-{k}-of-{SHARDS}.sqlite"
        assert path.is_file(), f"shard {k} wrote no journal"
        with Journal(path) as journal:
            found[k] = journal.states()
    return found


def folders_per_series(root: Path) -> dict[str, set[Path]]:
    folders: dict[str, set[Path]] = {}
    for path in root.rglob("*.dcm"):
        if ".nbia" in path.relative_to(root).parts:
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        folders.setdefault(str(ds.SeriesInstanceUID), set()).add(path.parent)
    return folders


def test_every_shard_has_work(uids):
    """Guards the test itself: a shard with no series would prove nothing."""
    assert {shard_of(u, SHARDS) for u in uids} == set(range(1, SHARDS + 1))


def test_concurrent_shards_download_everything_exactly_once(sharded, archive, uids):
    for code, (_out, err) in zip(sharded["codes"], sharded["outputs"], strict=True):
        assert code == 0, f"shard failed ({code}): {err}"
    root: Path = sharded["root"]
    # Byte-identical to the archive, named by the rule, one folder per series.
    assert downloaded_series(root) == expected_series(archive.root)
    folders = folders_per_series(root)
    assert set(folders) == set(uids)
    assert all(len(f) == 1 for f in folders.values()), folders
    # Each series was fetched once over the wire: the shards never duplicated work.
    images = Counter(r.series_uid for r in sharded["requests"]
                     if r.path.endswith("/getImage") and r.status == 200)
    assert images == Counter(set(uids))
    # No staging leftovers.
    assert not any((root / ".nbia" / "staging").iterdir())


def test_shard_journals_are_disjoint_and_cover_the_manifest(sharded, uids):
    journals = journal_uids(sharded["root"])
    seen: set[str] = set()
    for k, states in journals.items():
        assert not seen & set(states), f"shard {k} touched another shard's series"
        seen |= set(states)
        assert all(shard_of(u, SHARDS) == k for u in states)
        assert set(states.values()) == {SeriesState.COMPLETE}
    assert seen == set(uids)


def test_shared_metadata_csv_has_each_series_once(sharded, uids):
    path: Path = sharded["root"] / "metadata.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(METADATA_HEADER)
    # Appends from three processes: every line whole (no interleaving), and every series
    # exactly once. A repeated header line is possible (two shards may both find the file
    # empty); merge-reports removes it, and it must not count as a series.
    assert all(len(r) == len(METADATA_HEADER) for r in rows)
    data = [r for r in rows if r != list(METADATA_HEADER)]
    assert Counter(r[0] for r in data) == Counter(set(uids))
    for row in data:
        location = row[METADATA_HEADER.index("File Location")]
        assert (sharded["root"] / location).is_dir()


def test_merge_reports_finds_nothing_missing(sharded, uids):
    result = CliRunner().invoke(main, ["merge-reports", str(sharded["dest"]),
                                       "--manifest", str(sharded["manifest"])])
    assert result.exit_code == 0, result.output
    assert f"{len(uids)} of {len(uids)} series complete ({SHARDS} journal(s)" in result.output
    assert "missing" not in result.output
    lines = (sharded["root"] / "metadata.csv").read_text(encoding="utf-8").splitlines()
    assert lines.count(",".join(METADATA_HEADER)) == 1
    assert len(lines) == 1 + len(uids)
    assert verify_root(sharded["root"]).ok


# ---------------------------------------------------------- merge-reports on damaged roots


@pytest.fixture()
def copy(sharded, tmp_path) -> Path:
    """A private copy of the finished download root, to damage."""
    root = tmp_path / "manifest-1700000000000"
    shutil.copytree(sharded["root"], root)
    return root


def test_merge_reports_repairs_metadata_csv(copy, uids):
    path = copy / "metadata.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], [line for line in lines[1:] if line != lines[0]]
    dropped = rows.pop(0)  # a row lost to a crash between journal commit and CSV append
    damaged = [header, rows[0], header, *rows[1:], rows[1], "1.2.3,truncated"]
    path.write_text("\n".join(damaged) + "\n", encoding="utf-8")

    result = merge_reports(copy, fix=False)
    assert (result.csv_headers_removed, result.csv_duplicates, result.csv_bad_lines,
            result.csv_added) == (1, 1, 1, 1)
    assert not result.csv_rewritten
    assert path.read_text(encoding="utf-8").splitlines() == damaged  # --check: untouched

    result = merge_reports(copy)
    assert result.ok and result.csv_rewritten and result.csv_rows == len(uids)
    with path.open(newline="", encoding="utf-8") as handle:
        got = list(csv.reader(handle))
    assert got[0] == list(METADATA_HEADER)
    assert sorted(r[0] for r in got[1:]) == sorted(uids)
    rebuilt = next(r for r in got if r[0] == dropped.split(",")[0])
    original = next(csv.reader([dropped]))
    same = [c for c in METADATA_HEADER if c != "Download Timestamp"]
    idx = [METADATA_HEADER.index(c) for c in same]
    assert [rebuilt[i] for i in idx] == [original[i] for i in idx]
    # Idempotent: a second run finds a clean file and leaves it alone.
    again = merge_reports(copy)
    assert not again.csv_rewritten and "clean" in again.summary()


def test_merge_reports_lists_missing_series_with_their_shard(copy, sharded, uids):
    journals = journal_uids(copy)
    gone_uid = next(iter(journals[1]))
    with Journal(copy / ".nbia" / "journal-1-of-3.sqlite") as journal:
        relpath = journal.completed()[gone_uid]
    shutil.rmtree(copy / relpath)
    (copy / ".nbia" / "journal-3-of-3.sqlite").unlink()  # shard 3 never ran
    runner = CliRunner()

    result = runner.invoke(main, ["merge-reports", str(copy), "--check"])
    assert result.exit_code == 1
    assert f"missing {gone_uid} [shard 1/3] (Folder missing)" in result.output
    assert "(2 journal(s)" in result.output  # without the manifest: only what journals know

    result = runner.invoke(main, ["merge-reports", str(copy), "--check",
                                  "--manifest", str(sharded["manifest"])])
    assert result.exit_code == 1
    never = sorted(u for u in uids if shard_of(u, SHARDS) == 3)
    for uid in never:
        assert f"missing {uid} [shard 3/3] (Not Started): in no journal" in result.output
    assert f"{len(never) + 1} series missing" in result.output


def test_merge_reports_detects_two_series_in_one_folder(copy):
    journals = journal_uids(copy)
    first, second = list(journals[1])[:1] + list(journals[2])[:1]
    db = sqlite3.connect(copy / ".nbia" / "journal-2-of-3.sqlite")
    with db:
        target = sqlite3.connect(copy / ".nbia" / "journal-1-of-3.sqlite").execute(
            "SELECT relpath FROM series WHERE uid = ?", (first,)).fetchone()[0]
        db.execute("UPDATE series SET relpath = ? WHERE uid = ?", (target, second))
    db.close()
    result = merge_reports(copy, fix=False)
    assert not result.ok
    assert any(first in c and second in c and target in c for c in result.conflicts)


# ------------------------------------------------------------- shards add up, afterwards

@pytest.mark.parametrize("shard_args", [[], ["--shard", "2/2"]], ids=["plain", "other-N"])
def test_a_later_run_counts_what_the_shards_finished(copy, sharded, archive, serve, uids,
                                                     shard_args):
    """After the three shards, a run without --shard (or with another N) into the same
    root finds every series complete in the shards' journals: the server sees no image
    request; verify and merge-reports count every series once."""
    dest = copy.parent
    server = serve(archive.root)
    result = CliRunner().invoke(main, [
        "download", str(sharded["manifest"]), "-d", str(dest), "--api-url",
        server.api_url, "--json", *shard_args])
    images = [r for r in server.requests if "/getImage" in r.path]
    assert result.exit_code == 0, result.output
    assert images == []
    expected = len(uids) if not shard_args else sum(1 for u in uids if shard_of(u, 2) == 2)
    assert f'"skipped": {expected}' in result.output
    report = verify_root(copy)
    assert report.ok and report.series == len(uids), report
    merged = merge_reports(copy, manifest=sharded["manifest"], fix=False)
    assert merged.ok and merged.complete == merged.expected == len(uids)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_view_shows_what_the_shards_finished(copy, sharded, archive, serve, uids):
    from nbia_retriever.engine import DownloadOptions
    from nbia_retriever.manifest import read_manifest
    from nbia_retriever.tui import RetrieverApp
    from nbia_retriever.tui.app import READY

    server = serve(archive.root)
    app = RetrieverApp(read_manifest(sharded["manifest"]), copy.parent,
                       DownloadOptions(api_url=server.api_url), show_rates=False)
    async with app.run_test(size=(130, 36)) as pilot:
        while app.phase != READY:
            await pilot.pause(0.01)
        states = {uid: row.state for uid, row in app.rows.items()}
        text = app.message
    images = [r for r in server.requests if "/getImage" in r.path]
    assert set(states) == set(uids)
    assert set(states.values()) == {SeriesState.COMPLETE}
    assert f"{len(uids)} already complete" in text and images == []


def test_merge_reports_on_a_folder_that_is_no_download(tmp_path):
    result = CliRunner().invoke(main, ["merge-reports", str(tmp_path)])
    assert result.exit_code == 2
    assert "no download here" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- SLURM


def fake_tools(tmp_path: Path) -> tuple[Path, Path]:
    """A fake ``sbatch`` and ``nbia-retriever`` that log their arguments, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name, reply in (("sbatch", "4242"), ("nbia-retriever", "")):
        tool = bin_dir / name
        tool.write_text(
            "#!/usr/bin/env bash\n"
            f'{{ echo "== {name}"; printf "%s\\n" "$@"; }} >> "{log}"\n'
            + (f'echo "{reply}"\n' if reply else ""),
            encoding="utf-8")
        tool.chmod(0o755)
    return bin_dir, log


def submit_cart(tmp_path: Path, sbatch_args: str,
                tasks: str) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """The Slurm script run from ``tmp_path`` on a one-series cart with the fake tools
    (:func:`fake_tools`) and ``NBIA_SBATCH_ARGS``: (its run, the manifest, the calls log)."""
    bin_dir, log = fake_tools(tmp_path)
    manifest = write_manifest(tmp_path / "cart.tcia", ["1.2.3"], "http://127.0.0.1:9/x")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", NBIA_SBATCH_ARGS=sbatch_args)
    done = subprocess.run(["bash", str(SCRIPT), str(manifest), str(tmp_path / "out"), tasks],
                          env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    return done, manifest, log


def calls(log: Path) -> list[list[str]]:
    result: list[list[str]] = []
    for line in log.read_text(encoding="utf-8").splitlines():
        if line.startswith("== "):
            result.append([line[3:]])
        else:
            result[-1].append(line)
    return result


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_submits_the_array_then_the_check(tmp_path):
    done, manifest, log = submit_cart(tmp_path, "--account=lab", "5")
    assert done.returncode == 0, done.stderr
    array, check = calls(log)
    dest = str((tmp_path / "out").resolve())
    assert array == ["sbatch", "--parsable", "--account=lab", "--array=1-5", str(SCRIPT),
                     str(manifest.resolve()), dest]
    assert check[:4] == ["sbatch", "--parsable", "--account=lab", "--dependency=afterany:4242"]
    # The check's command goes as arguments of a batch script, never as --wrap text
    # (test_trust_slurm.py: names that dash would run as code).
    assert not any(a.startswith("--wrap") for a in check)
    assert check[-5:] == ["nbia-retriever", "merge-reports", dest, "--manifest",
                          str(manifest.resolve())]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_task_downloads_its_shard(tmp_path):
    bin_dir, log = fake_tools(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", NBIA_USER="alice",
               SLURM_ARRAY_TASK_ID="4", SLURM_ARRAY_TASK_MIN="2", SLURM_ARRAY_TASK_COUNT="6")
    done = subprocess.run(["bash", str(SCRIPT), "m.tcia", "/scratch/out"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert calls(log) == [["nbia-retriever", "download", "m.tcia", "-d", "/scratch/out",
                           "--shard", "3/6", "--quiet", "--max-connections", "2",
                           "--user", "alice"]]
    done = subprocess.run(["bash", str(SCRIPT), "m.tcia"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "usage" in done.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(("budget", "workers", "expected"), [
    (None, None, ["--max-connections", "5"]),          # 16 // 3: the default budget, shared
    ("2", None, ["--max-connections", "1"]),           # never below 1
    ("1000", None, ["--max-connections", "64"]),       # never above download's limit
    ("9", "2", ["--max-connections", "3", "--workers", "2"]),  # pinned workers
])
def test_slurm_tasks_share_the_connection_budget(tmp_path, budget, workers, expected):
    bin_dir, log = fake_tools(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NBIA_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_ARRAY_TASK_ID="1",
               SLURM_ARRAY_TASK_COUNT="3")
    if budget is not None:
        env["NBIA_MAX_CONNECTIONS"] = budget
    if workers is not None:
        env["NBIA_WORKERS"] = workers
    done = subprocess.run(["bash", str(SCRIPT), "m.tcia", "/out"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert calls(log) == [["nbia-retriever", "download", "m.tcia", "-d", "/out",
                           "--shard", "1/3", "--quiet", *expected]]
