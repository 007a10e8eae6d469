"""The view's licence question (issue 25 item 9): before the first download of a
collection whose licence is not a plain CC BY, a dialog shows the collection, the
licence's name and URL, and asks once; a yes is remembered in the config file
(``[licenses] accepted``, by the engine's gate), a no leaves that collection's series out
(Not Authorized, the reason on their row).

The engine asks from its planning thread (``DownloadOptions.confirm_license``); the
dialog lives in the app's event loop, so :func:`license_asker` hands the question over
with ``call_from_thread`` and waits for the answer there. If the window closes first,
the answer is no.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label

from ..config import config_path
from ..untrusted import plain
from .screens import _Dialog


class LicenseScreen(_Dialog, ModalScreen[bool]):
    """A collection's licence, and "Accept" or "Not this collection". ``True``: accept."""

    DEFAULT_CSS = """
    LicenseScreen {
        align: center middle;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,n", "refuse", "Not this collection"),
        Binding("y", "accept", "Accept"),
    ]
    #: No is the default answer (Enter on the focused button refuses).
    AUTO_FOCUS = "#refuse"

    def __init__(self, collection: str, name: str, url: str) -> None:
        super().__init__()
        # Server text: shown as plain text (no markup, no control characters).
        self.collection, self.name_, self.url = plain(collection), plain(name), plain(url)

    def compose(self) -> ComposeResult:
        what = f"{self.name_} ({self.url})" if self.name_ and self.url else self.name_ or self.url
        with Vertical(id="license-dialog", classes="dialog wide"):
            yield Label(f"Licence of {self.collection}", classes="dialog-title", markup=False)
            yield Label(f"The {self.collection} collection is distributed under the {what}.",
                        id="license-text", classes="dialog-text", markup=False)
            yield Label("Do you agree to its terms? Your answer is remembered for this "
                        f"collection in {config_path()}.", classes="dialog-text",
                        markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Accept", variant="primary", id="accept")
                yield Button("Not this collection", id="refuse")

    @on(Button.Pressed, "#accept")
    def action_accept(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#refuse")
    def action_refuse(self) -> None:
        self.dismiss(False)


def license_asker(app: Any) -> Callable[[str, str, str], bool]:
    """``confirm_license`` for an engine of ``app``: the dialog, from the engine's thread."""

    def confirm(collection: str, name: str, url: str) -> bool:
        done = threading.Event()
        answer: list[bool] = [False]

        def dismissed(result: bool | None) -> None:
            answer[0] = bool(result)
            done.set()

        try:
            app.call_from_thread(app.push_screen, LicenseScreen(collection, name, url),
                                 dismissed)
        except RuntimeError:  # not running, or called from its own thread: nobody to ask
            return False
        while not done.wait(0.2):  # a closed window answers no
            if not app.is_running:
                return False
        return answer[0]

    return confirm


__all__ = ["LicenseScreen", "license_asker"]
