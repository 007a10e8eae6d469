"""``verify``: re-check a finished download against its journal(s).

Silent corruption after the fact (a bad disk, a sync tool, a careless script) is as bad
as a broken download. The journal knows the name, size and MD5 of every file it
published, so this re-hashes them and lists what is missing, altered or unexpected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .journal import Journal
from .models import SeriesState

STATE_DIR = ".nbia"


@dataclass
class VerifyResult:
    series: int = 0
    files: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        status = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return f"verified {self.series} series, {self.files} files: {status}"


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_root(root: Path, *, quick: bool = False,
                on_series: Callable[[str], None] | None = None) -> VerifyResult:
    """Check every complete series of every journal under ``root/.nbia``."""
    journals = sorted((root / STATE_DIR).glob("journal*.sqlite"))
    if not journals:
        raise FileNotFoundError(f"{root}: no download journal here (expected {STATE_DIR}/)")
    result = VerifyResult()
    for path in journals:
        with Journal(path) as journal:
            for entry in journal.entries(SeriesState.COMPLETE):
                result.series += 1
                if on_series:
                    on_series(entry.uid)
                folder = root / entry.relpath
                if not folder.is_dir():
                    result.problems.append(f"missing series {entry.uid}: {entry.relpath}")
                    continue
                expected = {f.name: f for f in entry.files}
                present = {p.name for p in folder.iterdir() if p.is_file()}
                for name, record in expected.items():
                    result.files += 1
                    file = folder / name
                    if name not in present:
                        result.problems.append(f"missing file {entry.relpath}/{name}")
                    elif file.stat().st_size != record.size:
                        result.problems.append(f"altered file (size) {entry.relpath}/{name}")
                    elif not quick and _md5(file) != record.md5:
                        result.problems.append(f"altered file (MD5) {entry.relpath}/{name}")
                for name in sorted(present - set(expected)):
                    result.problems.append(f"unexpected file {entry.relpath}/{name}")
    return result
