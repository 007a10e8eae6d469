"""Issue 24, Deliver 4: files that are not series (DRS objects, PathDB slides) land in the
same tree as series, as ``<Collection>/<Patient>/<file name>``.

The engine is driven with a small source of this module (as ``folder_source.py`` shows
a source is): its file streams copy a prepared local file into the spool the engine
bound, honouring the engine's checkpoint (pause, cancel) and progress, exactly the
contract of ``files.source.FileSource``'s ``FileStream.fetch``. What is checked is the
engine's part: dispatch, publishing by one link without overwriting anything, the
journal row and its trust rules, files.csv, ``verify``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import folder_source
from enginehelpers import downloaded_series, expected_series
from nbia_retriever import make_engine
from nbia_retriever.engine.journal import FileRecord, Journal
from nbia_retriever.engine.rows import (
    FolderCheck,
    is_safe_file_relpath,
    row_relpath_ok,
)
from nbia_retriever.engine.source import MetadataBatch, Verdict
from nbia_retriever.errors import NbiaError, NetworkError
from nbia_retriever.models import SeriesInfo, SeriesState, is_file_uid
from nbia_retriever.report import FILES_HEADER, Report
from nbia_retriever.server.synth import ArchiveSummary
from nbia_retriever.verify import verify_root

CHUNK = 64 << 10


@dataclass(frozen=True)
class Fetched:
    """``files.transfer.FetchedFile``'s shape."""

    path: Path
    name: str
    size: int
    md5: str


@dataclass
class Item:
    uri: str
    source_file: Path
    collection: str = "TCGA-BRCA"
    patient: str = "TCGA-A1-0001"
    name: str = "slide.svs"

    def info(self) -> SeriesInfo:
        return SeriesInfo(series_uid=self.uri, collection=self.collection,
                          patient_id=self.patient, modality="SM",
                          series_description=self.name, image_count=1,
                          file_size=self.source_file.stat().st_size)


class CopyStream:
    """A file item's stream: ``fetch`` copies the prepared file into the spool, in
    chunks, resuming a part file an earlier attempt left."""

    def __init__(self, source: FilesSource, item: Item) -> None:
        self.source = source
        self.item = item
        self.bytes_received = 0
        self._aborted = threading.Event()

    def fetch(self, *, checkpoint: Callable[[], None],
              on_progress: Callable[[int], None]) -> Fetched:
        spool = self.source.spool
        assert spool is not None, "the engine bound no spool"
        key = hashlib.sha1(self.item.uri.encode()).hexdigest()
        part = spool / f"{key}.part"
        self.source.fetches.append(self.item.uri)
        if self.item.uri in self.source.fail_once:
            self.source.fail_once.discard(self.item.uri)
            raise NetworkError(f"{self.item.uri}: connection reset (test)")
        if self.item.uri in self.source.broken:
            raise NbiaError(f"{self.item.uri}: not found (test)")  # no retry
        start = part.stat().st_size if part.exists() else 0
        with self.item.source_file.open("rb") as src, part.open("ab") as out:
            src.seek(start)
            written = start
            while chunk := src.read(CHUNK):
                checkpoint()
                if self._aborted.is_set():
                    raise NetworkError("aborted")
                out.write(chunk)
                written += len(chunk)
                self.bytes_received += len(chunk)
                self.source.read_bytes += len(chunk)
                on_progress(written)
                hook = self.source.after_chunk.get(self.item.uri)
                if hook is not None:
                    hook()
        data = part.read_bytes()
        done = spool / f"{key}.file"
        os.replace(part, done)
        done.chmod(0o600)  # as files.transfer keeps a file while it grows: private
        planted = self.source.planted.get(self.item.uri)
        if planted is not None:  # someone swaps the spool file for a link
            done.unlink()
            done.symlink_to(planted)
        return Fetched(done, self.item.name, len(data), hashlib.md5(data).hexdigest())

    def abort(self) -> None:
        self._aborted.set()


class FilesSource:
    """File items from local files; series (if any) from a :class:`FolderSource`."""

    def __init__(self, items: Sequence[Item],
                 series: folder_source.FolderSource | None = None) -> None:
        self.items = {i.uri: i for i in items}
        self.series = series
        self.name = "test-files"
        self.spool: Path | None = None
        self.pieces: Path | None = None
        self.fetches: list[str] = []
        self.read_bytes = 0
        self.fail_once: set[str] = set()
        self.broken: set[str] = set()
        self.planted: dict[str, Path] = {}
        self.after_chunk: dict[str, Callable[[], None]] = {}

    def bind_run(self, spool: Path, budget: object, *, files: Path | None = None) -> None:
        self.pieces, self.spool = spool, files

    def check(self) -> None:
        pass

    def prepare(self) -> None:
        pass

    def metadata_batches(self, uids: Sequence[str]) -> Iterator[MetadataBatch]:
        mine = [u for u in uids if u in self.items]
        if mine:
            yield MetadataBatch(mine, {u: self.items[u].info() for u in mine})
        rest = [u for u in uids if u not in self.items]
        if rest:
            assert self.series is not None
            yield from self.series.metadata_batches(rest)

    def unavailable(self, uid: str) -> tuple[SeriesState, str]:
        return SeriesState.NO_DATA, "unknown"

    def open(self, info: SeriesInfo) -> contextlib.AbstractContextManager[Any]:
        item = self.items.get(info.series_uid)
        if item is not None:
            return contextlib.nullcontext(CopyStream(self, item))
        assert self.series is not None
        return self.series.open(info)

    def verdict(self, error: NbiaError) -> Verdict:
        return Verdict(retry=isinstance(error, NetworkError))

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------ helpers


def blob(path: Path, size: int, seed: int = 0) -> Path:
    """A file of ``size`` pseudo-random bytes (several chunks: progress and cancel)."""
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:size])
    return path


def run(source: FilesSource, dest: Path, uids: Sequence[str] | None = None,
        **options: Any) -> Report:
    keys = list(uids if uids is not None else source.items)
    engine = make_engine(keys, dest, source=source, processes=0, workers=2,  # type: ignore[arg-type]
                         backoff_base=0.01, **options)
    return engine.run()


def files_csv(root: Path) -> list[dict[str, str]]:
    with (root / "files.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == FILES_HEADER
    return [dict(zip(FILES_HEADER, r, strict=True)) for r in rows[1:]]


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file outside ``.nbia`` (links are listed as ``->target``)."""
    found: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == ".nbia":
            continue
        if path.is_symlink():
            found[str(rel)] = b"->" + os.readlink(path).encode()
        elif path.is_file():
            found[str(rel)] = path.read_bytes()
    return found


def journal_entry(root: Path, uid: str) -> Any:
    (path,) = [p for p in (root / ".nbia").glob("journal*.sqlite")]
    with Journal(path, readonly=True) as journal:
        return journal.get(uid)


@pytest.fixture
def items(tmp_path: Path) -> list[Item]:
    src = tmp_path / "remote"
    return [
        Item("drs://nci-crdc.datacommons.io/dg.4DFC/0001", blob(src / "a", 300_000, 1),
             name="clinical.tsv"),
        Item("https://pathdb.example/slides/2.svs", blob(src / "b", 150_000, 2),
             collection="CPTAC-LUAD", patient="C3L-00001", name="C3L-00001-21.svs"),
    ]


# ------------------------------------------------------------------------------- tests


def test_a_file_item_lands_as_collection_patient_name_with_its_rows(
        tmp_path: Path, items: list[Item]) -> None:
    source = FilesSource(items)
    report = run(source, tmp_path / "dl")
    assert report.ok, report.summary()
    root = report.root
    assert source.spool == root / ".nbia" / "files"  # its own spool, bound by the engine
    assert source.pieces == root / ".nbia" / "pieces"
    for item in items:
        relpath = f"{item.collection}/{item.patient}/{item.name}"
        assert (root / relpath).read_bytes() == item.source_file.read_bytes()
        result = report.results[item.uri]
        assert result.state == SeriesState.COMPLETE and result.relpath == relpath
        entry = journal_entry(root, item.uri)
        assert entry.state == SeriesState.COMPLETE and entry.relpath == relpath
        data = item.source_file.read_bytes()
        assert entry.files == (FileRecord(item.name, len(data),
                                          hashlib.md5(data).hexdigest()),)
    rows = {r["Source"]: r for r in files_csv(root)}
    assert set(rows) == {i.uri for i in items}
    first = rows[items[0].uri]
    assert first["Collection"] == "TCGA-BRCA" and first["Subject ID"] == "TCGA-A1-0001"
    assert first["File Name"] == "clinical.tsv"
    assert first["File Location"] == "./TCGA-BRCA/TCGA-A1-0001/clinical.tsv"
    assert first["Size"] == "300000"
    assert first["MD5"] == hashlib.md5(items[0].source_file.read_bytes()).hexdigest()
    assert first["Downloaded At"]
    # Not series: no metadata.csv rows, no LICENSE (no licence info), nothing left spooled.
    assert not (root / "metadata.csv").exists()
    assert not list(root.glob("*/LICENSE"))
    assert list((root / ".nbia" / "files").iterdir()) == []
    # The tree's mode (the umask's), not the spool's private 0600.
    mask = os.umask(0o022)
    os.umask(mask)
    for item in items:
        mode = (root / report.results[item.uri].relpath).stat().st_mode & 0o777
        assert mode == 0o666 & ~mask, oct(mode)
    assert set(tree(root)) == {"files.csv", "TCGA-BRCA/TCGA-A1-0001/clinical.tsv",
                               "CPTAC-LUAD/C3L-00001/C3L-00001-21.svs"}


def test_a_rerun_fetches_nothing_and_writes_no_row_twice(
        tmp_path: Path, items: list[Item]) -> None:
    source = FilesSource(items)
    first = run(source, tmp_path / "dl")
    assert first.ok and len(source.fetches) == 2
    before = tree(first.root)
    again = run(source, tmp_path / "dl")  # at once: the rows are "racy", checked by lstat
    assert again.ok, again.summary()
    assert len(source.fetches) == 2  # nothing fetched again
    assert again.skipped == 2 or again.count(SeriesState.COMPLETE) == 2
    third = run(source, tmp_path / "dl")
    assert third.ok and len(source.fetches) == 2
    assert tree(first.root) == before  # files.csv not grown


def test_a_file_of_another_size_is_not_believed_and_is_replaced_by_a_fresh_copy(
        tmp_path: Path, items: list[Item]) -> None:
    """Only a signed row with the file's unchanged stamp is believed by one stat; any
    other must match its size (a count of one file proves nothing). The damaged file is
    this item's own copy (its row names it): replaced, under the same name."""
    item = items[0]
    source = FilesSource([item])
    report = run(source, tmp_path / "dl")
    published = report.root / report.results[item.uri].relpath
    with published.open("ab") as handle:
        handle.write(b"!")
    again = run(source, tmp_path / "dl")
    assert again.ok, again.summary()
    assert len(source.fetches) == 2
    assert again.results[item.uri].relpath == report.results[item.uri].relpath
    assert published.read_bytes() == item.source_file.read_bytes()
    assert sorted(p.name for p in published.parent.iterdir()) == [item.name]
    assert len(files_csv(report.root)) == 1


def test_verify_server_says_file_items_are_not_checked_against_a_server(
        tmp_path: Path, items: list[Item]) -> None:
    from nbia_retriever.verify_server import find_series_folders

    report = run(FilesSource(items), tmp_path / "dl")
    warnings: list[str] = []
    assert find_series_folders(report.root, warnings) == {}
    assert warnings == ["2 file item(s) not checked against the server (a file item: its "
                        "size and MD5 were checked when it was fetched, and `verify` checks "
                        "them again)"]


def test_a_lost_files_csv_row_is_written_again_from_the_journal(
        tmp_path: Path, items: list[Item]) -> None:
    source = FilesSource(items)
    report = run(source, tmp_path / "dl")
    (report.root / "files.csv").unlink()
    again = run(source, tmp_path / "dl")
    assert again.ok and len(source.fetches) == 2
    assert {r["Source"] for r in files_csv(report.root)} == {i.uri for i in items}


def test_a_foreign_file_with_the_same_name_is_kept_and_ours_takes_the_next_name(
        tmp_path: Path, items: list[Item]) -> None:
    item = items[1]
    folder = tmp_path / "dl" / "manifest" / item.collection / item.patient
    folder.mkdir(parents=True)
    (folder / item.name).write_bytes(b"the user's own slide")
    source = FilesSource([item])
    report = run(source, tmp_path / "dl")
    assert report.ok, report.summary()
    assert report.root == tmp_path / "dl" / "manifest"
    assert (folder / item.name).read_bytes() == b"the user's own slide"
    ours = folder / "C3L-00001-21_2.svs"
    assert ours.read_bytes() == item.source_file.read_bytes()
    assert report.results[item.uri].relpath == f"{item.collection}/{item.patient}/{ours.name}"
    assert files_csv(report.root)[0]["File Name"] == ours.name
    again = run(source, tmp_path / "dl")
    assert again.ok and len(source.fetches) == 1  # its own name, believed on the re-run


def test_the_same_bytes_left_by_a_crash_after_the_link_are_taken_not_doubled(
        tmp_path: Path, items: list[Item]) -> None:
    item = items[1]
    folder = tmp_path / "dl" / "manifest" / item.collection / item.patient
    folder.mkdir(parents=True)
    (folder / item.name).write_bytes(item.source_file.read_bytes())  # linked, not journaled
    report = run(FilesSource([item]), tmp_path / "dl")
    assert report.ok
    assert sorted(p.name for p in folder.iterdir()) == [item.name]


def test_a_planted_link_at_the_leaf_is_never_written_through(
        tmp_path: Path, items: list[Item]) -> None:
    item = items[0]
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"not yours")
    folder = tmp_path / "dl" / "manifest" / item.collection / item.patient
    folder.mkdir(parents=True)
    (folder / item.name).symlink_to(outside)
    report = run(FilesSource([item]), tmp_path / "dl")
    assert report.ok, report.summary()
    assert outside.read_bytes() == b"not yours"
    assert os.readlink(folder / item.name) == str(outside)
    assert (folder / "clinical_2.tsv").read_bytes() == item.source_file.read_bytes()


def test_a_planted_link_at_the_patient_folder_fails_the_item_without_following_it(
        tmp_path: Path, items: list[Item]) -> None:
    item = items[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    collection = tmp_path / "dl" / "manifest" / item.collection
    collection.mkdir(parents=True)
    (collection / item.patient).symlink_to(outside, target_is_directory=True)
    report = run(FilesSource([item]), tmp_path / "dl")
    result = report.results[item.uri]
    assert result.state == SeriesState.ERROR
    assert "symbolic link" in result.error and "Traceback" not in result.error
    assert list(outside.iterdir()) == []


def test_a_file_swapped_for_a_link_after_the_download_is_refused_and_fetched_again(
        tmp_path: Path, items: list[Item]) -> None:
    item = items[0]
    source = FilesSource([item])
    report = run(source, tmp_path / "dl")
    assert report.ok
    published = report.root / report.results[item.uri].relpath
    outside = tmp_path / "outside.tsv"
    outside.write_bytes(item.source_file.read_bytes())  # the same bytes, even
    published.unlink()
    published.symlink_to(outside)
    again = run(source, tmp_path / "dl")
    assert again.ok, again.summary()
    assert len(source.fetches) == 2  # the row was not believed
    assert any("outside the download root" in w for w in again.warnings), again.warnings
    assert published.is_symlink() and outside.read_bytes() == item.source_file.read_bytes()
    fresh = published.with_name("clinical_2.tsv")
    assert fresh.read_bytes() == item.source_file.read_bytes()
    assert again.results[item.uri].relpath.endswith("/clinical_2.tsv")


@pytest.mark.parametrize("name", [
    "../../x.svs", "CON", "a\x1b]0;pwned\x07b.svs", "x" * 300 + ".svs", "/etc/passwd",
    "md5hashes.csv", "..", "C:\\Windows\\evil.dll",
])
def test_hostile_names_stay_inside_their_patient_folder(
        tmp_path: Path, items: list[Item], name: str) -> None:
    item = Item(items[0].uri, items[0].source_file, collection="../../up",
                patient="..", name=name)
    report = run(FilesSource([item]), tmp_path / "dl")
    assert report.ok, report.summary()
    relpath = report.results[item.uri].relpath
    assert is_safe_file_relpath(relpath), relpath
    leaf = report.root / relpath
    assert leaf.resolve().is_relative_to(report.root.resolve())
    assert leaf.read_bytes() == item.source_file.read_bytes()
    assert len(leaf.name.encode()) <= 255 and leaf.name.isprintable()
    assert leaf.name.upper() not in ("CON", "MD5HASHES.CSV")
    assert leaf.parent.parent.parent == report.root  # Collection/Patient/<name>, no deeper
    written = [p for p in (tmp_path / "dl").rglob("*") if p.is_file()]
    assert all(p.is_relative_to(report.root) for p in written)
    rows = files_csv(report.root)
    assert rows[0]["File Location"] == f"./{relpath}"
    assert all(c.isprintable() for c in "".join(rows[0].values()))


def test_a_formula_in_a_name_or_url_is_neutralised_in_files_csv(
        tmp_path: Path, items: list[Item]) -> None:
    item = Item("https://h.example/=cmd.svs", items[1].source_file,
                collection="=HYPERLINK(1)", patient="+P", name="=SUM(A1).svs")
    report = run(FilesSource([item]), tmp_path / "dl")
    assert report.ok, report.summary()
    (row,) = files_csv(report.root)
    assert row["File Name"].startswith("'=") and row["Collection"].startswith("'=")
    assert row["Subject ID"].startswith("'+")


def test_a_mixed_run_puts_series_and_files_each_in_their_place(
        tmp_path: Path, items: list[Item], synthetic_archive: ArchiveSummary) -> None:
    series = folder_source.FolderSource(synthetic_archive.root)
    uids = [s.series_uid for s in synthetic_archive.series][:4]
    first = synthetic_archive.series[0]
    # One slide of a patient who also has series: it sits beside that patient's studies.
    slide = Item("https://pathdb.example/slides/9.svs", items[1].source_file,
                 collection=first.collection, patient=first.patient_id, name="slide.svs")
    source = FilesSource([*items, slide], series=series)
    keys = uids + [i.uri for i in source.items.values()]
    report = run(source, tmp_path / "dl", keys)
    assert report.ok, report.summary()
    want = {u: v for u, v in expected_series(synthetic_archive.root).items() if u in uids}
    assert downloaded_series(report.root) == want
    metadata = (report.root / "metadata.csv").read_text()
    assert all(u in metadata for u in uids) and "pathdb" not in metadata
    assert {r["Source"] for r in files_csv(report.root)} == set(source.items)
    series_folder = report.root / report.results[uids[0]].relpath
    patient_folder = report.root / report.results[slide.uri].relpath
    assert patient_folder.parent == series_folder.parent.parent  # the same patient folder
    assert patient_folder.read_bytes() == slide.source_file.read_bytes()
    result = verify_root(report.root)
    assert result.ok, result.problems
    assert result.series == len(keys)


def test_verify_finds_a_flipped_byte_a_short_file_and_a_missing_one(
        tmp_path: Path, items: list[Item]) -> None:
    third = Item("drs://nci-crdc.datacommons.io/dg.4DFC/0003",
                 blob(tmp_path / "remote" / "c", 70_000, 3), name="notes.txt")
    report = run(FilesSource([*items, third]), tmp_path / "dl")
    root = report.root
    assert verify_root(root).ok
    flipped = root / report.results[items[0].uri].relpath
    data = bytearray(flipped.read_bytes())
    data[1234] ^= 0x01
    flipped.write_bytes(bytes(data))
    short = root / report.results[items[1].uri].relpath
    short.write_bytes(short.read_bytes()[:-1])
    (root / report.results[third.uri].relpath).unlink()
    result = verify_root(root)
    problems = "\n".join(result.problems)
    assert len(result.problems) == 3, problems
    assert f"altered file (MD5) {report.results[items[0].uri].relpath}" in problems
    assert f"altered file (size) {report.results[items[1].uri].relpath}" in problems
    assert f"missing file {report.results[third.uri].relpath}" in problems
    assert "Traceback" not in problems


def test_a_cancel_mid_fetch_leaves_no_half_file_in_the_tree_and_the_next_run_resumes(
        tmp_path: Path, items: list[Item]) -> None:
    item = items[0]
    source = FilesSource([item])
    engine = make_engine([item.uri], tmp_path / "dl", source=source,  # type: ignore[arg-type]
                         processes=0, workers=1, backoff_base=0.01)
    chunks = []

    def cancel_after_two() -> None:
        chunks.append(1)
        if len(chunks) == 2:
            engine.cancel()

    source.after_chunk[item.uri] = cancel_after_two
    report = engine.run()
    assert report.cancelled
    assert report.results[item.uri].state == SeriesState.INTERRUPTED
    assert report.interrupted_bytes == 0  # kept in the spool, not fetched again
    assert tree(report.root) == {}  # no half file (and no row) in the tree
    parts = list((report.root / ".nbia" / "files").glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == 2 * CHUNK
    source.after_chunk.clear()
    source.read_bytes = 0
    again = run(source, tmp_path / "dl")
    assert again.ok, again.summary()
    size = item.source_file.stat().st_size
    assert source.read_bytes == size - 2 * CHUNK  # the rest only
    assert (again.root / again.results[item.uri].relpath).read_bytes() == \
        item.source_file.read_bytes()


def test_a_failed_fetch_is_retried_like_a_series(tmp_path: Path, items: list[Item]) -> None:
    source = FilesSource(items)
    source.fail_once.add(items[0].uri)
    events: list[Any] = []
    engine = make_engine(list(source.items), tmp_path / "dl", source=source,  # type: ignore[arg-type]
                         processes=0, workers=2, backoff_base=0.01)
    engine.subscribe(events.append)
    report = engine.run()
    assert report.ok, report.summary()
    assert report.results[items[0].uri].attempts == 2
    assert any(e.kind == "retry" and e.uid == items[0].uri for e in events)


# ------------------------------------------------------------------------ the row rules


def test_a_row_is_judged_by_its_keys_kind(tmp_path: Path) -> None:
    assert is_file_uid("drs://h/dg.4DFC/x") and not is_file_uid("1.2.3")
    assert row_relpath_ok("drs://h/x", "C/P/f.svs")
    assert not row_relpath_ok("drs://h/x", "C/P/S/f")  # a file item names no folder
    assert not row_relpath_ok("1.2.3", "C/P/f.svs")  # a series names no file
    assert row_relpath_ok("1.2.3", "C/P/S/f")
    for bad in ("../P/f", "C/../f", "C/P/.nbia", "C/P/a:b", "/C/P/f", "C/P/f/", "C/P"):
        assert not is_safe_file_relpath(bad), bad
    root = tmp_path / "root"
    (root / "C" / "P" / "S").mkdir(parents=True)
    (root / "C" / "P" / "f.svs").write_bytes(b"x")
    (root / "C" / "P" / "link.svs").symlink_to(root / "C" / "P" / "f.svs")
    check = FolderCheck(root)
    assert check.folder("C/P/f.svs", file=True) not in (None, False)
    assert check.folder("C/P/link.svs", file=True) is False  # REFUSED
    assert check.folder("C/P/S", file=True) is False  # a folder is not a file
    assert check.folder("C/P/none.svs", file=True) is None
    stamps = check.stamps(["C/P/f.svs", "C/P/link.svs", "C/P/S/x", "C/P/S"])
    assert isinstance(stamps["C/P/f.svs"], int) and stamps["C/P/f.svs"] is not True
    assert stamps["C/P/link.svs"] is False and stamps["C/P/S"] is False
    assert stamps["C/P/S/x"] is None


def test_planted_rows_of_the_wrong_kind_are_refused(tmp_path: Path, items: list[Item]) -> None:
    """A series row naming a file, or a file row naming a series folder, is refused like
    a row naming a folder outside the root: never handed out as Complete."""
    source = FilesSource(items[:1])
    report = run(source, tmp_path / "dl")
    root = report.root
    relpath = report.results[items[0].uri].relpath
    (path,) = list((root / ".nbia").glob("journal*.sqlite"))
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO series (uid, state, relpath, nfiles) VALUES "
                   "('1.2.3.4', 'Complete', ?, 1)", (relpath,))
    with Journal(path, readonly=True) as journal:
        index = journal.completed_index()
        assert "1.2.3.4" not in index and items[0].uri in index
        assert "1.2.3.4" in journal.refused
        entry = journal.get("1.2.3.4")
        assert entry is not None and entry.state != SeriesState.COMPLETE and not entry.relpath


# ------------------------------------------------------------------- merge-reports


def test_merge_reports_counts_file_items_and_rebuilds_their_files_csv_rows(
        tmp_path: Path, items: list[Item]) -> None:
    from nbia_retriever.search import merge_reports

    report = run(FilesSource(items), tmp_path / "dl")
    root = report.root
    result = merge_reports(root)
    assert result.ok and result.complete == 2 and result.files_added == 0, result.summary()
    assert not (root / "metadata.csv").exists()  # no metadata.csv row made for a file
    (root / "files.csv").unlink()
    gone = root / report.results[items[1].uri].relpath
    gone.unlink()
    result = merge_reports(root)
    assert result.complete == 1 and result.files_added == 1, result.summary()
    (missing,) = result.missing
    assert missing.uid == items[1].uri and missing.state == "File missing"
    assert missing.error.startswith("CPTAC-LUAD \u00b7 C3L-00001 \u00b7 C3L-00001-21.svs: ")
    assert [r["Source"] for r in files_csv(root)] == [items[0].uri]
    assert "files.csv: 1 rows added" in result.summary()


def test_a_pause_mid_fetch_holds_the_file_and_resume_finishes_it_in_the_same_attempt(
        tmp_path: Path, items: list[Item]) -> None:
    item = items[0]
    source = FilesSource([item])
    engine = make_engine([item.uri], tmp_path / "dl", source=source,  # type: ignore[arg-type]
                         processes=0, workers=1, backoff_base=0.01)
    states: list[str] = []

    def watch(event: Any) -> None:
        if event.kind == "state" and event.uid == item.uri:
            states.append(str(event.state))
            if event.state == SeriesState.PAUSED:
                engine.resume()  # (called before the worker waits: no race, no sleep)

    engine.subscribe(watch)
    source.after_chunk[item.uri] = lambda: (engine.pause(), source.after_chunk.clear())
    report = engine.run()
    assert report.ok, report.summary()
    assert SeriesState.PAUSED.value in states and states[-1] == SeriesState.COMPLETE.value
    assert report.results[item.uri].attempts == 1 and len(source.fetches) == 1


def test_only_failed_retries_a_file_item_that_failed(tmp_path: Path,
                                                     items: list[Item]) -> None:
    source = FilesSource(items)
    source.broken.add(items[0].uri)
    first = run(source, tmp_path / "dl")
    assert first.results[items[0].uri].state == SeriesState.ERROR
    assert "not found (test)" in first.results[items[0].uri].error
    assert first.results[items[1].uri].state == SeriesState.COMPLETE
    assert not list((first.root / "TCGA-BRCA").glob("*/*"))  # nothing half there
    source.broken.clear()
    fetched = len(source.fetches)
    again = run(source, tmp_path / "dl", only_failed=True)
    assert again.ok, again.summary()
    assert list(again.results) == [items[0].uri]
    assert source.fetches[fetched:] == [items[0].uri]
    assert {r["Source"] for r in files_csv(again.root)} == {i.uri for i in items}


def test_the_engine_says_where_a_planned_file_item_goes(tmp_path: Path,
                                                         items: list[Item]) -> None:
    engine = make_engine([i.uri for i in items], tmp_path / "dl",  # type: ignore[arg-type]
                         source=FilesSource(items), processes=0)
    engine.prepare()
    try:
        assert engine.folder_of(items[1].uri) == "CPTAC-LUAD/C3L-00001/C3L-00001-21.svs"
    finally:
        engine.close()


def test_a_failed_file_item_is_named_by_collection_patient_and_file_name() -> None:
    from nbia_retriever.report import failure_line, item_label

    info = SeriesInfo(series_uid="drs://h/dg.4DFC/1", collection="C", patient_id="P\x1b[2J",
                      series_description="s.svs")
    assert item_label(info.series_uid, info) == "C \u00b7 P[2J \u00b7 s.svs"  # no escape
    line = failure_line(info.series_uid, "not found on h", 1, info)
    assert line.startswith("C \u00b7 P") and line.endswith("(drs://h/dg.4DFC/1): not found on h "
                                                          "(1 attempt)")
    assert "\x1b" not in line
    assert failure_line("1.2.3", "boom", 2, info) == "1.2.3: boom (2 attempts)"


def test_a_link_swapped_into_the_spool_is_never_published(tmp_path: Path,
                                                         items: list[Item]) -> None:
    item = items[0]
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"not for the tree")
    source = FilesSource([item])
    source.planted[item.uri] = outside
    report = run(source, tmp_path / "dl")
    result = report.results[item.uri]
    assert result.state == SeriesState.ERROR and "not the regular file" in result.error
    assert tree(report.root) == {}
    assert outside.read_bytes() == b"not for the tree"


def test_a_fifo_at_the_leaf_and_a_linked_files_csv_neither_hang_nor_fail_the_item(
        tmp_path: Path, items: list[Item]) -> None:
    """A FIFO where the file goes is never opened (it would block for ever): the next
    name. files.csv a link outside: not written through; the files are published and
    each says files.csv could not be updated."""
    item = items[1]
    root = tmp_path / "dl" / "manifest"
    folder = root / item.collection / item.patient
    folder.mkdir(parents=True)
    os.mkfifo(folder / item.name)
    victim = tmp_path / "victim.csv"
    victim.write_text("precious\n")
    (root / "files.csv").symlink_to(victim)
    engine = make_engine([item.uri], tmp_path / "dl", source=FilesSource([item]),  # type: ignore[arg-type]
                         processes=0)
    messages: list[str] = []
    engine.subscribe(lambda e: messages.append(e.message) if e.kind == "message" else None)
    report = engine.run()
    assert report.ok, report.summary()
    assert (folder / "C3L-00001-21_2.svs").read_bytes() == item.source_file.read_bytes()
    assert victim.read_text() == "precious\n"
    assert any("could not update files.csv" in m for m in messages), messages
    again = run(FilesSource([item]), tmp_path / "dl")  # the re-run neither
    assert again.ok and victim.read_text() == "precious\n"
