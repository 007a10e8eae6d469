"""The downloads table: a Textual ``DataTable`` that holds one window of the rows.

A ``DataTable`` row costs about 3 KB and 0.1 ms to add: 200,000 of them (NLST) would
take half a minute and most of a gigabyte before the window could draw. So the table
holds at most :data:`PAGE` rows, a window onto the app's full, sorted list of series;
moving the cursor past either end of the window (arrow keys, Page Up/Down) slides the
window by half its size and the cursor carries on as if the table were whole;
Ctrl+Home and Ctrl+End go to the first and last series. Scrolling inside a window is
the ``DataTable``'s own, which only renders the lines on screen.
"""

from __future__ import annotations

from typing import Protocol

from textual.widgets import DataTable

from .cells import Cell

#: Rows held by the table at once.
PAGE = 500


class Pager(Protocol):
    """What the table asks of its owner when the cursor leaves the window."""

    def turn(self, step: int) -> bool:
        """Slide the window one half-page forward (+1) or back (-1), keeping the cursor
        on the row after (before) the one it was on. False if there is nothing more."""

    def jump(self, end: bool) -> None:
        """Show the first (or last) window."""


class PagedTable(DataTable[Cell]):
    """A ``DataTable`` whose cursor keys page through a window (module docstring)."""

    def __init__(self, pager: Pager, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.pager = pager

    def _at_end(self) -> bool:
        return self.row_count > 0 and self.cursor_row >= self.row_count - 1

    def action_cursor_down(self) -> None:
        if self._at_end() and self.pager.turn(+1):
            return
        super().action_cursor_down()

    def action_cursor_up(self) -> None:
        if self.row_count and self.cursor_row <= 0 and self.pager.turn(-1):
            return
        super().action_cursor_up()

    def action_page_down(self) -> None:
        if self._at_end() and self.pager.turn(+1):
            return
        super().action_page_down()

    def action_page_up(self) -> None:
        if self.row_count and self.cursor_row <= 0 and self.pager.turn(-1):
            return
        super().action_page_up()

    def action_scroll_top(self) -> None:
        self.pager.jump(end=False)
        super().action_scroll_top()

    def action_scroll_bottom(self) -> None:
        self.pager.jump(end=True)
        super().action_scroll_bottom()
