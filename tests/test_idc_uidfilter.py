"""IDC's UID filter (``idc/uidfilter.py``): a run whose series IDC does not hold starts no
duckdb child once the index is known, and the answers stay exactly the index's.

Why it matters: ``--source auto`` is the default, so without the filter every NBIA run
with the index installed started the reader child (0.2-0.4 s, ~170 MB more peak memory).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from nbia_retriever.idc.index import IdcIndex
from nbia_retriever.idc.uidfilter import UidFilter, filter_path

if TYPE_CHECKING:
    from s3_fixtures import S3Archive


def started(index: IdcIndex) -> bool:
    """Whether this index object has ever started its reader child."""
    return index._reader._child is not None


def test_a_known_index_opens_without_a_child_and_looks_up_only_what_it_may_hold(
        tmp_path: Path, s3_archive: S3Archive) -> None:
    folder = tmp_path / "index"
    shutil.copytree(s3_archive.index_dir, folder)
    first = IdcIndex.open(folder)  # checks the columns and files the UIDs: a child
    assert started(first)
    first.release()
    held = sorted(s3_archive.view.current)[:2]
    expected = first.by_series_uid(held)
    assert set(expected) == set(held)

    again = IdcIndex.open(folder)
    assert not started(again), "a known index started the reader child to open"
    assert again.version == first.version
    assert again.by_series_uid([s3_archive.nbia_only, "1.2.3.4.5"]) == {}
    assert not started(again), "UIDs the index does not hold started the reader child"
    assert again.by_series_uid(held) == expected  # and those it holds are looked up
    assert started(again)
    again.release()


def test_a_changed_or_damaged_filter_is_rebuilt_never_believed(
        tmp_path: Path, s3_archive: S3Archive) -> None:
    folder = tmp_path / "index"
    shutil.copytree(s3_archive.index_dir, folder)
    IdcIndex.open(folder).release()
    files = {p.stem: p for p in folder.glob("*.parquet")}
    cache = filter_path(files)
    assert cache is not None and cache.is_file()

    cache.write_bytes(b"NBIAUID1" + b"\xff" * 20)  # not ours: ignored, rebuilt
    index = IdcIndex.open(folder)
    assert started(index)
    index.release()
    assert UidFilter.load(cache) is not None

    # Another index in the same place (a file changed): another filter, checked anew.
    target = folder / "idc_index.parquet"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert filter_path({p.stem: p for p in folder.glob("*.parquet")}) != cache
    index = IdcIndex.open(folder)
    assert started(index)
    index.release()
    uid = sorted(s3_archive.view.current)[0]
    assert uid in IdcIndex.open(folder).by_series_uid([uid])


def test_the_filter_never_says_no_for_a_uid_it_was_built_with() -> None:
    uids = [f"1.2.840.{i}.{i * 7919 % 100003}" for i in range(20_000)]
    built = UidFilter.build(uids, {"checked": True})
    assert all(built.may_hold(u) for u in uids)
    # Digests are 64-bit: other UIDs are (all but certainly) told apart.
    assert sum(built.may_hold(f"2.25.{i}") for i in range(20_000)) == 0
