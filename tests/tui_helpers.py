"""What the terminal view's tests share (test_tui, test_view24, test_view25)."""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.pilot import Pilot

#: How long a test waits for the view to reach a state before it fails, saying which.
DEADLINE = 30.0


async def wait_for(pilot: Pilot[None], condition: Callable[[], bool], what: str, *,
                   within: float = DEADLINE) -> None:
    """Let the app run until ``condition()`` holds; an AssertionError naming ``what``
    after ``within`` seconds (a state never reached fails, it does not hang)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.01)
