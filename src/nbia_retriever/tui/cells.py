"""Pure formatting for the downloads table: no Textual, no I/O, unit-tested on its own.

Every cell is a :class:`Cell` rather than a ``str`` for two reasons. Textual's DataTable
parses plain strings as console markup, and collection names, patient IDs and error
messages come from the network: ``"[bold]"`` in a Patient ID must show as itself, never
restyle the table or crash it. And a cell carries its own sort key, so sorting by Size
sorts by bytes and sorting by UID compares the dotted numbers as numbers, while the
table still shows "12.3 MB" and "…0.1.2.3.4.5".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from rich.text import Text

from ..models import ALL_STATES, SeriesInfo, SeriesState
from ..report import human_size

#: Characters of a UID kept in the table ("…" + the last ones); the detail panel has it all.
UID_TAIL = 12
BAR_WIDTH = 10
#: Longest Series Description shown in the table; the detail panel has the full text.
TEXT_MAX = 24
#: Longest Collection / Patient ID shown in the table.
NAME_MAX = 14
STATUS_STYLES: dict[str, str] = {
    SeriesState.NOT_STARTED: "",
    SeriesState.QUEUED: "dim",
    SeriesState.DOWNLOADING: "bold cyan",
    SeriesState.PAUSED: "magenta",
    SeriesState.COMPLETE: "green",
    SeriesState.ERROR: "bold red",
    SeriesState.NO_DATA: "yellow",
    SeriesState.NOT_AUTHORIZED: "yellow",
    SeriesState.CANCELLED: "dim",
}
_STATUS_ORDER: dict[str, int] = {state: i for i, state in enumerate(ALL_STATES)}


@functools.total_ordering
class Cell:
    """One table cell: text shown verbatim (never markup), compared by ``key``."""

    __slots__ = ("key", "style", "text")

    def __init__(self, text: str, key: Any = None, style: str = "") -> None:
        self.text = text
        self.key = text.casefold() if key is None else key
        self.style = style

    def __rich__(self) -> Text:
        return Text(self.text, style=self.style, no_wrap=True, overflow="ellipsis", end="")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cell):
            return NotImplemented
        return (self.text, self.style, self.key) == (other.text, other.style, other.key)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Cell):
            return NotImplemented
        result: bool = self.key < other.key
        return result

    __hash__ = None  # type: ignore[assignment]  # mutable-looking value object

    def __repr__(self) -> str:
        return f"Cell({self.text!r})"


def short_uid(uid: str, tail: int = UID_TAIL) -> str:
    """``"…"`` + the last ``tail`` characters: the end of a UID is what tells series apart."""
    return uid if len(uid) <= tail + 1 else "…" + uid[-tail:]


def uid_key(uid: str) -> tuple[tuple[int, int, str], ...]:
    """Compare dotted UIDs part by part as numbers (``1.2.10`` after ``1.2.9``)."""
    return tuple((1, int(p), "") if p.isdigit() else (0, 0, p) for p in uid.split("."))


#: What a number that means nothing right now shows.
EMPTY = "—"
#: No bytes for this long: the ETA shows a dash.
STALL_SECONDS = 2.0


def speed_and_eta(samples: Sequence[tuple[float, float]], total: float, *,
                  active: bool) -> tuple[str, str]:
    """Speed and time left from ``(time, bytes done)`` samples, oldest first.

    Honest by construction: the speed is never negative (bytes done never go backwards,
    and a drop would count as zero); no ETA while nothing moved for
    :data:`STALL_SECONDS` (a stall, a pause: the window's average would promise an end
    that is not coming), none once the run is not ``active`` (finished, paused,
    cancelled), and none without a total.
    """
    if not active or len(samples) < 2:
        return EMPTY, EMPTY
    (t0, b0), (t1, b1) = samples[0], samples[-1]
    rate = max(0.0, (b1 - b0) / (t1 - t0)) if t1 > t0 else 0.0
    older = [b for t, b in samples if t <= t1 - STALL_SECONDS]
    moving = b1 > (older[-1] if older else b0)
    eta = EMPTY
    if rate > 0 and moving and total > b1:
        eta = format_duration((total - b1) / rate)
    return f"{human_size(rate)}/s", eta


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_fraction(state: str, bytes_done: int, expected: int | None) -> float | None:
    """How far a series is, or ``None`` when a bar would say nothing (not started, failed)."""
    if state == SeriesState.COMPLETE:
        return 1.0
    if state in (SeriesState.DOWNLOADING, SeriesState.PAUSED):
        if not expected:
            return 0.0
        # The metadata's size is the archive's own figure; what we write can differ a bit.
        return max(0.0, min(1.0, bytes_done / expected))
    return None


def progress_cell(fraction: float | None, width: int = BAR_WIDTH) -> Cell:
    if fraction is None:
        return Cell("", key=-1.0)
    filled = round(fraction * width)
    bar = "█" * filled + "░" * (width - filled)
    style = "green" if fraction >= 1.0 else "cyan"
    return Cell(f"{bar} {fraction * 100:3.0f}%", key=fraction, style=style)


def status_cell(state: str) -> Cell:
    return Cell(state, key=_STATUS_ORDER.get(state, len(_STATUS_ORDER)),
                style=STATUS_STYLES.get(state, ""))


def text_cell(value: str, max_len: int = TEXT_MAX) -> Cell:
    """Unknown values sort last (ascending); long ones are cut for the table only."""
    shown = value if len(value) <= max_len else value[: max_len - 1] + "…"
    return Cell(shown, key=(0, value.casefold()) if value else (1, ""))


def number_cell(value: int | None, text: str | None = None) -> Cell:
    shown = text if text is not None else ("" if value is None else f"{value:,}")
    return Cell(shown, key=(0, value) if value is not None else (1, 0))


def date_key(text: str) -> tuple[int, str]:
    """Study dates sort by date: NBIA's ``MM-DD-YYYY`` and DICOM's ``YYYYMMDD`` or
    ``YYYY-MM-DD`` as ``YYYYMMDD``; anything else after them, as text."""
    digits = "".join(c for c in text if c.isdigit())
    if len(digits) == 8:
        if text[:4].isdigit():
            return (0, digits)
        return (0, digits[4:] + digits[:4])  # MM-DD-YYYY
    return (1 if text else 2, text)


def row_cells(uid: str, info: SeriesInfo | None, state: str, bytes_done: int,
              marked: bool) -> dict[str, Cell]:
    """Every cell of one row, keyed by column key (see ``COLUMNS``): the series as people
    know it (collection, patient, study date, modality, description, images), the
    UID's tail, and how far it is."""
    expected = info.file_size if info else None
    return {
        "mark": Cell("●" if marked else " ", key=0 if marked else 1, style="bold yellow"),
        "collection": text_cell(info.collection if info else "", NAME_MAX),
        "patient": text_cell(info.patient_id if info else "", NAME_MAX),
        "date": Cell(info.study_date if info else "",
                     key=date_key(info.study_date if info else "")),
        "modality": text_cell(info.modality if info else "", 8),
        "description": text_cell(info.series_description if info else ""),
        "series": Cell(short_uid(uid), key=uid_key(uid)),
        "images": number_cell(info.image_count if info else None),
        "size": number_cell(expected, human_size(expected)),
        "progress": progress_cell(progress_fraction(state, bytes_done, expected)),
        "status": status_cell(state),
    }


#: (column key, header label, width or None for "fit the content").
COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("mark", " ", 1),
    ("collection", "Collection", None),
    ("patient", "Patient ID", None),
    ("date", "Study Date", 10),
    ("modality", "Modality", None),
    ("description", "Series Description", None),
    ("series", "Series UID", UID_TAIL + 1),
    ("images", "Images", 6),
    ("size", "Size", 9),
    ("progress", "Progress", BAR_WIDTH + 5),
    ("status", "Status", 14),
)
#: Terminal widths below which the table leaves out columns (the detail panel shows
#: them for the series under the cursor), widest first: Progress and Status stay in view.
HIDDEN_BELOW: tuple[tuple[int, frozenset[str]], ...] = (
    (150, frozenset({"collection", "series", "size"})),
    (114, frozenset({"collection", "images", "series", "date", "modality", "size"})),
)


def hidden_columns(width: int) -> frozenset[str]:
    """The columns a table ``width`` characters wide leaves out."""
    hidden: frozenset[str] = frozenset()
    for below, columns in HIDDEN_BELOW:
        if width < below:
            hidden = columns
    return hidden


def origin_text(source: str) -> str:
    """`` · from NBIA`` or `` · from IDC s3://bucket/uuid/ v22``: where a series came from,
    as the journal's ``source`` column records it (``idc/source.where_text``); "" when
    unknown. Plain text (the view never renders it as markup)."""
    if not source:
        return ""
    kind, _, rest = source.partition(" ")
    name = {"nbia": "NBIA", "idc": "IDC"}.get(kind, kind)
    return f" · from {name}" + (f" {rest}" if rest else "")
