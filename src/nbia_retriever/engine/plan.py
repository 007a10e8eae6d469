"""Planning a run: what is done already, what the server says, where each series goes.

Two phases, because a manifest can hold 200,000 series:

* :meth:`Planner.open` is local and bulk: create the root (refusing planted links),
  check the layout it was made with, open this run's journal and read every journal of
  the root once (a series completed by any shard is complete), skip finished series
  with one ``stat`` each (the folder's stamp says whether anything changed since it was
  published), add journal rows for the rest in one transaction. Journal rows are
  untrusted (:mod:`.rows`): a row naming a folder outside the root is never believed
  (one warning per journal, :attr:`Planner.warnings`), and only rows this user signed
  are believed by that one ``stat``; any other is believed when its folder holds at
  least its image count.
* :meth:`Planner.batches` asks the source for metadata batch by batch, in manifest
  order, and yields each batch planned: its folders chosen (:class:`FolderPlanner`,
  deterministic whatever order the answers arrive in), the series that cannot be
  downloaded, and the series whose folder already holds their images (a tree left by
  the Java retriever, or by a run whose journal was lost), adopted without a download.
  The engine starts downloading the first batch while later ones are still on the way.

A row is written as a series completes, a moment after its folder's stamp: too soon to
be believed by the stamp alone (the "racy" rule, :data:`~.journal.RACY_SECONDS`). So the
first re-run after a big download used to count the files of every folder and sign
every row again: 50,000 row rewrites (each row's checked columns sit in its overflow
page: 200 MB of WAL), 4.1 s against 1.1 s for the next re-run. :meth:`Planner.close`
does that work at the end of the download instead, for the rows it wrote that have aged
past the rule (all but the last seconds' worth), when they are a fair share of the root.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import operator
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ..errors import DestinationError, JournalError
from ..errors import LayoutMismatchError as LayoutMismatchError  # re-export
from ..layout import FolderPlanner, Layout, java_clean, series_relpath_variant
from ..models import SeriesInfo, SeriesState
from ..ondisk import STATE_DIR, DownloadRoot
from .journal import RACY_SECONDS, CompleteRecord, FileRecord, Journal
from .rows import file_count, folder_stamp
from .source import Source

#: :meth:`Planner.close` re-signs the rows of the series a run did when they are at least
#: this share of the finished series the root held before (reading every finished row
#: again, ~10 us each, for a few new ones would cost more than it saves the re-run).
SETTLE_SHARE = 0.25

#: Placeholder StudyID used to find a Java study folder when the metadata has none.
_STUDY_MARK = "QQQQSTUDYIDQQQQ"
_CLEAN_PART = "[A-Za-z0-9 .\\-]+"


@contextlib.contextmanager
def bulk() -> Iterator[None]:
    """No cyclic garbage collection while planning allocates its per-series objects.

    Planning 200,000 series creates millions of long-lived objects, none in a cycle;
    the collector would walk them again and again (a quarter of the planning time) to
    find nothing. Reference counting still frees everything as usual; the collector
    runs again afterwards (unless it was already off).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # What planning made is long-lived: aged at once into the oldest generation
        # (freeze then unfreeze moves it there without a traversal). Otherwise the first
        # collection after this would walk every object made since, millions of them.
        if gc.get_freeze_count() == 0:  # (never thaw what the host application froze)
            gc.freeze()
            gc.unfreeze()
        if was:
            gc.enable()


_VARIANT = operator.itemgetter(1)
#: A series ready to download: (uid, its metadata, the variant of its folder name). A
#: tuple: a 1,000,000-series plan makes one per series.
PlannedSeries = tuple[str, SeriesInfo, int]


@dataclass
class PlanBatch:
    ready: list[PlannedSeries] = field(default_factory=list)
    unavailable: list[tuple[str, SeriesState, str, SeriesInfo | None]] = \
        field(default_factory=list)
    adopted: list[tuple[str, SeriesInfo, str, tuple[FileRecord, ...]]] = \
        field(default_factory=list)


@dataclass
class Opened:
    """What :meth:`Planner.open` found: finished series and those left to do."""

    complete: dict[str, str] = field(default_factory=dict)  # uid -> relpath
    todo: list[str] = field(default_factory=list)


class PlanPhase(StrEnum):
    """Where a run's planning is: not claimed yet, being done by one caller (``prepare()``
    or the engine thread), or over (``Engine._claim_plan``)."""

    NEW = "new"
    RUNNING = "running"
    DONE = "done"


class Planner:
    """Plans one run over one root; see the module docstring."""

    def __init__(self, root: DownloadRoot, journal_path: Path, layout: Layout, *,
                 only_failed: bool = False, source: str = "nbia") -> None:
        self.root = root
        self.source = source  # written on this run's journal rows
        #: Per series, when the source routes them (``Source.where``).
        self.source_of: Callable[[str], str] | None = None
        self.journal_path = journal_path
        self.layout = layout
        self.only_failed = only_failed
        self.journal: Journal | None = None
        self.folders = FolderPlanner(layout)
        self.todo: list[str] = []
        self._done_before = 0
        self._seen: list[tuple[str, str, int, int]] = []
        #: One line per journal whose rows named folders outside the root.
        self.warnings: list[str] = []
        self._listing: dict[str, frozenset[str] | None] = {}
        self._to_reserve: list[str] = []  # finished folders, for self.folders
        self._deferred: list[PlanBatch] = []
        self._lock = threading.Lock()

    # -- local -----------------------------------------------------------------------------
    def open(self, uids: Iterable[str], *, create: bool) -> Opened:
        """Phase one (see the module docstring). With ``create`` the root, its layout
        record and this run's journal are created; without, nothing on disk is touched
        (a destination only looked at must not get a ``.nbia/``) and journals are only
        read. Raises DestinationError, UsageError, JournalError."""
        if create:
            self.commit()
        index: dict[str, CompleteRecord] = {}
        mine: dict[str, CompleteRecord] = {}
        self.warnings = []
        for path in self.root.journal_paths():
            if path == self.journal_path and self.journal is not None:
                mine = self.journal.completed_index()
                self._warn(self.journal)
                continue
            try:
                other = Journal(path, readonly=True)
            except DestinationError:
                if path == self.journal_path:
                    raise
                continue  # another run's journal we cannot read is not ours to judge
            try:
                found = other.completed_index()
            except DestinationError:
                found = {}
            finally:
                other.close()
            self._warn(other)
            if path == self.journal_path:
                mine = found
            else:
                index.update(found)
        index.update(mine)
        # Reserved when the first batch is planned (:meth:`batches`): a no-op re-run
        # plans none, and a digest of each of 50,000 finished folders was a twentieth of
        # its time.
        self._to_reserve = [r.relpath for r in index.values() if r.relpath]
        states = self._states() if self.only_failed else {}
        opened = Opened()
        seen: list[tuple[str, str, int, int]] = []
        if not index and not self.only_failed:
            opened.todo = list(uids)  # nothing done yet: one C-level copy
            uids = ()
        for uid in uids:
            record = index.get(uid)
            if record is not None and record.relpath and self._still_there(
                    uid, record, seen if uid in mine else None):
                opened.complete[uid] = record.relpath
                continue
            if self.only_failed and (uid not in states or states[uid] == SeriesState.COMPLETE):
                # "Retry failed series": everything that did not complete, including
                # series a crash left "Downloading"; never-seen series are left alone.
                continue
            opened.todo.append(uid)
        self.todo = opened.todo
        self._done_before = len(opened.complete)
        self._seen = seen
        if self.journal is not None:  # rows written while metadata arrives
            self.journal.ensure(opened.todo, SeriesState.NOT_STARTED, wait=False)
            self.journal.set_folder_mtimes(seen)
            seen.clear()
        return opened

    def _states(self) -> dict[str, str]:
        if self.journal is not None:
            return self.journal.states()
        if not self.journal_path.exists():
            return {}
        with Journal(self.journal_path, readonly=True) as journal:
            return journal.states()

    def commit(self) -> None:
        """Create the root (refusing planted links), check and record its layout, open
        this run's journal, and write what planning found so far. Idempotent."""
        with self._lock:
            if self.journal is not None:
                return
            self.root.create()
            self._check_layout()
            journal = Journal(self.journal_path, source=self.source)
            journal.source_of = self.source_of
            journal.set_info("layout", self.layout.value)
            if self.todo:
                journal.ensure(self.todo, SeriesState.NOT_STARTED, wait=False)
            journal.set_folder_mtimes(self._seen)
            self._seen = []
            for batch in self._deferred:
                self._write(journal, batch)
            self._deferred.clear()
            self.journal = journal

    def _check_layout(self) -> None:
        info = self.root.read_info()
        made = info.get("layout")
        if made is None:
            # Roots of earlier versions recorded it in the journal only.
            for path in self.root.journal_paths():
                try:
                    with Journal(path, readonly=True) as old:
                        made = old.get_info("layout")
                except DestinationError:
                    continue
                if made:
                    break
        if made and made != self.layout.value:
            raise LayoutMismatchError(self.root.path, made)
        if info.get("layout") != self.layout.value:
            self.root.write_info(layout=self.layout.value, format=1)

    def _warn(self, journal: Journal) -> None:
        message = journal.refused_message()
        if message:
            self.warnings.append(message)

    def _still_there(self, uid: str, record: CompleteRecord,
                     seen: list[tuple[str, str, int, int]] | None) -> bool:
        """A finished series' folder still holds its files: no further ``stat`` when its
        stamp (read with the journal) proves nothing changed since this user signed the
        row, a count of its files when not (``seen`` collects the folders of this run's
        own journal to record as checked, and sign)."""
        stamp = record.stamp
        if stamp is None:
            return False
        if record.unchanged(stamp):
            return True
        needs = record.needs
        count = file_count(os.path.join(self.root.path, record.relpath))
        if count is None or count < needs:
            return False
        if seen is not None:
            seen.append((uid, record.relpath, needs, stamp))
        return True

    # -- with the source ---------------------------------------------------------------------
    def batches(self, source: Source, uids: list[str]) -> Iterator[PlanBatch]:
        """Phase two: metadata batch by batch, each planned (see the module docstring)."""
        for batch in source.metadata_batches(uids):
            planned = PlanBatch()
            # Adoption needs folders: a fresh root (nothing but its state when planning
            # began; no series folder is ever named like it) costs no lookup per series.
            existing = self._existing if (self._list("") or frozenset()) - {STATE_DIR} \
                else None
            uids = batch.uids
            infos = list(map(batch.infos.get, uids))
            if any(map(operator.is_, infos, itertools.repeat(None))):  # (no __eq__ calls)
                known = [(u, i) for u, i in zip(uids, infos, strict=True) if i is not None]
                for uid, info in zip(uids, infos, strict=True):
                    if info is not None:
                        continue
                    if uid in batch.errors:
                        planned.unavailable.append(
                            (uid, SeriesState.ERROR, f"metadata: {batch.errors[uid]}", None))
                    else:
                        state, why = source.unavailable(uid)
                        planned.unavailable.append((uid, state, why, None))
                uids, infos = [u for u, _ in known], [i for _, i in known]
            found: list[SeriesInfo] = infos  # type: ignore[assignment]
            if self._to_reserve:
                self.folders.reserve(self._to_reserve)
                self._to_reserve = []
            folders = self.folders.take_many(found)
            if existing is None:  # the common case, without a Python loop per series
                planned.ready = list(zip(uids, found, map(_VARIANT, folders), strict=True))
            else:
                for uid, info, (relpath, variant) in zip(uids, found, folders, strict=True):
                    # (a file of a DRS/PathDB sheet has no series folder to adopt)
                    there = None if ":" in uid else existing(info, relpath, variant)
                    if there is not None:
                        planned.adopted.append((uid, info, there[0], there[1]))
                    else:
                        planned.ready.append((uid, info, variant))
            self._record(planned)
            yield planned
        self.wait_rows()

    def wait_rows(self) -> None:
        """Wait for the journal rows being written in the background (raises
        JournalError when they could not be: the run must stop, as a failed write
        would stop it)."""
        if self.journal is not None:
            self.journal.wait()

    def _record(self, planned: PlanBatch) -> None:
        """Journal what a batch found, or keep it for :meth:`commit` (nothing is written
        before the run starts)."""
        with self._lock:
            if self.journal is None:
                if planned.unavailable or planned.adopted:
                    self._deferred.append(planned)
                return
            journal = self.journal
        self._write(journal, planned)

    def _write(self, journal: Journal, planned: PlanBatch) -> None:
        if planned.unavailable:
            journal.set_states((uid, state, why, None, info)
                               for uid, state, why, info in planned.unavailable)
        if planned.adopted:
            rows = []
            for uid, info, relpath, files in planned.adopted:
                mtime = 0
                with contextlib.suppress(OSError):
                    mtime = folder_stamp(os.stat(self.root.path / relpath,
                                                 follow_symlinks=False))
                rows.append((uid, relpath, files, sum(f.size for f in files), 0, info, mtime,
                             True))
            journal.mark_complete_many(rows)

    # -- adoption ------------------------------------------------------------------------------
    def _existing(self, info: SeriesInfo, relpath: str,
                  variant: int) -> tuple[str, tuple[FileRecord, ...]] | None:
        """A folder at the series' place that holds exactly its number of images."""
        if not info.image_count:
            return None
        candidates = [relpath]
        if not info.study_id and self.layout is Layout.DESCRIPTIVE:
            candidates = self._study_matches(info, variant) or candidates
        for candidate in candidates:
            if not self._exists(candidate):
                continue
            files = _dicom_files(self.root.path / candidate)
            if files is not None and sum(1 for f in files if f.name.lower().endswith(
                    ".dcm")) == info.image_count:
                return candidate, files
        return None

    def _exists(self, relpath: str) -> bool:
        """Via cached listings of the parents: a fresh root costs no ``stat`` per series."""
        top = self._list("")
        if not top or relpath.partition("/")[0] not in top:
            return False  # a fresh root, or a collection not there yet: no stat at all
        parent, _, name = relpath.rpartition("/")
        names = self._list(parent)
        return names is not None and name in names

    def _list(self, relpath: str) -> frozenset[str] | None:
        """Sub-folder names of ``root/relpath`` ("" is the root), cached; None if absent."""
        if relpath in self._listing:
            return self._listing[relpath]
        names: frozenset[str] | None = None
        if relpath:
            above, _, name = relpath.rpartition("/")
            parent = self._list(above)
            if parent is None or name not in parent:
                return None  # not cached: a fresh root would keep one entry per study
        try:
            names = frozenset(e.name for e in os.scandir(os.path.join(self.root.path, relpath))
                              if e.is_dir(follow_symlinks=False))
        except OSError:
            names = None
        self._listing[relpath] = names
        return names

    def _study_matches(self, info: SeriesInfo, variant: int) -> list[str]:
        """Java study folders of this study whatever its StudyID (the metadata of older
        builds has none): ``<date>-<any clean StudyID>-<desc>-<last 5>``."""
        marked = series_relpath_variant(info.replace(study_id=_STUDY_MARK), self.layout, variant)
        study = marked.parts[2]
        if _STUDY_MARK not in study or java_clean(_STUDY_MARK) != _STUDY_MARK:
            return []
        before, _, after = study.partition(_STUDY_MARK)
        pattern = re.compile(re.escape(before) + _CLEAN_PART + re.escape(after))
        names = self._list(f"{marked.parts[0]}/{marked.parts[1]}") or frozenset()
        return [f"{marked.parts[0]}/{marked.parts[1]}/{name}/{marked.parts[3]}"
                for name in sorted(names) if pattern.fullmatch(name)]

    def close(self) -> None:
        if self.journal is not None:
            with contextlib.suppress(JournalError):  # a speed-up for the next run only
                self.settle()
            self.journal.close()
            self.journal = None

    def settle(self) -> int:
        """Sign again, as a re-run would, the rows of this run's finished series whose
        folder stamp is now old enough to be believed alone: the folder still has that
        stamp and at least the row's file count (see the module docstring). Rows of the
        last seconds stay as they are (the next run looks at those few). Returns the
        number of rows signed."""
        journal = self.journal
        if journal is None or not self.todo \
                or len(self.todo) < SETTLE_SHARE * self._done_before:
            return 0
        index = journal.completed_index()
        old_enough = time.time_ns() - int(RACY_SECONDS * 1e9)
        seen: list[tuple[str, str, int, int]] = []
        for uid in self.todo:
            record = index.get(uid)
            if record is None or not record.trusted or not record.relpath:
                continue
            stamp = record.stamp
            if stamp is None or stamp > old_enough or record.unchanged(stamp):
                continue  # gone, still racy, or believed already
            needs = record.needs
            count = file_count(os.path.join(self.root.path, record.relpath))
            if count is not None and count >= needs:
                seen.append((uid, record.relpath, needs, stamp))
        if seen:
            journal.set_folder_mtimes(seen)
        return len(seen)


def _dicom_files(folder: Path) -> tuple[FileRecord, ...] | None:
    """The files of an existing series folder (sizes; MD5s are not computed: ``verify
    --server`` checks adopted folders against the server)."""
    try:
        entries = [e for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    except OSError:
        return None
    records = []
    for entry in sorted(entries, key=lambda e: e.name):
        try:
            size = entry.stat(follow_symlinks=False).st_size
        except OSError:
            return None
        records.append(FileRecord(entry.name, size, ""))
    return tuple(records)
