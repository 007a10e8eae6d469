"""The modal dialogs: destination picker, login, save error report, quit while running.

Each returns its answer through ``dismiss`` (``None`` = cancelled) and touches nothing
else: the app decides what an answer means (a new engine, a CSV file...), so the dialogs
stay trivially testable and cannot start work behind the app's back.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar, NamedTuple

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label

from ..api import Credentials
from .trust import TRUST_ALWAYS, TRUST_RUN, LoginTrust


class FolderTree(DirectoryTree):
    """Folders only, hidden ones left out: a destination is never a file."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".") and self._safe_is_dir(p)]


def existing_ancestor(path: Path) -> Path:
    """The nearest folder that exists, so the tree opens near what the user typed."""
    path = path.expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return Path.home()


class _Dialog:
    """A dialog's button presses stay in the dialog: the window has buttons of the same
    ids (``#login``, ``#cancel``), and a press bubbling up to it would act twice (the
    dialog's Log in reopened the login dialog; its Cancel cancelled a pending Start)."""

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()


class DestinationScreen(_Dialog, ModalScreen[Path | None]):
    """Pick the destination folder in a tree, or type it (a folder that does not exist
    yet is fine: the download creates it)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("backspace", "up", "Parent folder", show=False),
        Binding("ctrl+u", "up", "Parent folder"),
    ]

    def __init__(self, current: Path) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        start = existing_ancestor(self.current)
        with Vertical(id="dest-dialog", classes="dialog wide"):
            yield Label("Destination folder", classes="dialog-title")
            yield FolderTree(start, id="tree")
            yield Input(str(self.current), placeholder="folder", id="path")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Parent folder", id="up")
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        # The cursor in the path, at its end: type or paste a folder at once; Shift+Tab
        # moves up to the tree.
        path = self.query_one("#path", Input)
        path.focus()
        path.cursor_position = len(path.value)

    @on(DirectoryTree.DirectorySelected)
    def _chosen(self, event: DirectoryTree.DirectorySelected) -> None:
        self.query_one("#path", Input).value = str(event.path)

    def action_up(self) -> None:
        tree = self.query_one("#tree", FolderTree)
        parent = Path(tree.path).parent
        tree.path = parent
        self.query_one("#path", Input).value = str(parent)

    @on(Button.Pressed, "#up")
    def _up(self) -> None:
        self.action_up()

    @on(Input.Submitted, "#path")
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        text = self.query_one("#path", Input).value.strip()
        if not text:
            self.notify("Type a folder or pick one in the tree.", severity="warning")
            return
        self.dismiss(Path(text).expanduser())

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class LoginAnswer(NamedTuple):
    """The login dialog's answer: ``action`` "login" (with ``credentials``) or "logout";
    ``trust`` is "" (the host was trusted already), :data:`~.trust.TRUST_RUN` or
    :data:`~.trust.TRUST_ALWAYS`."""

    action: str
    credentials: Credentials | None
    trust: str = ""


class LoginScreen(_Dialog, ModalScreen[LoginAnswer | None]):
    """Username and password for limited-access collections.

    Answers a :class:`LoginAnswer` or ``None`` (cancelled). The password field is masked
    and is cleared before the dialog closes, so no widget keeps it after the answer has
    been handed over.

    Trust comes first: when only the manifest names the server (``trust.ask``), the
    dialog names the host (ASCII form) and offers to trust it for this run or always;
    the username and password fields appear only after that answer, so no password is
    typed for a host that will not get it. A host no answer can make safe
    (``trust.refused``: plain http) shows why and offers no fields at all.
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, username: str = "", logged_in: bool = False, host: str = "",
                 trust: LoginTrust | None = None) -> None:
        super().__init__()
        self.username = username
        self.logged_in = logged_in
        self.trust = trust or LoginTrust(host)
        self.host = self.trust.host or host
        #: The trust answer given in this dialog ("" until then, or when not asked).
        self.trusted = ""

    def compose(self) -> ComposeResult:
        trust = self.trust
        with Vertical(id="dialog", classes="dialog"):
            yield Label("Log in for limited-access collections", classes="dialog-title")
            if trust.refused:
                yield Label(Text(trust.refused), id="login-refused", classes="dialog-text")
            elif trust.ask:
                # Plain text, never markup: the host comes from a shared manifest.
                yield Label(Text(
                    f"Only the manifest names {self.host}: you did not choose this server. "
                    f"Trust {self.host} with your password?"), id="login-trust",
                    classes="dialog-text")
                with Horizontal(classes="dialog-buttons", id="trust-buttons"):
                    yield Button("Trust for this run", variant="primary", id="trust-run")
                    yield Button("Trust always", id="trust-always",
                                 tooltip="Adds it to trusted_hosts in your config file")
                    yield Button("Cancel", id="trust-cancel")
            if self.host and not trust.refused:
                yield Label(Text(f"The password goes to {self.host} only."), id="login-host",
                            classes="dialog-text")
            with Vertical(id="login-fields"):
                yield Input(self.username, placeholder="username", id="username")
                yield Input(placeholder="password", password=True, id="password")
                with Horizontal(classes="dialog-buttons"):
                    yield Button("Log in", variant="primary", id="login",
                                 disabled=bool(trust.refused))
                    yield Button("Log out", id="logout", disabled=not self.logged_in)
                    yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        if self.trust.ask:
            self.query_one("#login-fields").display = False
            self.query_one("#login-host").display = False
            self.query_one("#trust-run", Button).focus()
        elif self.trust.refused:
            for widget in (*self.query(Input), self.query_one("#login", Button)):
                widget.display = False
            self.query_one("#cancel", Button).focus()
        else:
            self.query_one("#password" if self.username else "#username", Input).focus()

    @on(Button.Pressed, "#trust-run")
    @on(Button.Pressed, "#trust-always")
    def _trusted(self, event: Button.Pressed) -> None:
        self.trusted = TRUST_ALWAYS if event.button.id == "trust-always" else TRUST_RUN
        self.query_one("#trust-buttons").display = False
        self.query_one("#login-trust").display = False
        self.query_one("#login-host").display = True
        self.query_one("#login-fields").display = True
        self.query_one("#password" if self.username else "#username", Input).focus()

    @on(Input.Submitted, "#username")
    def _next_field(self) -> None:
        self.query_one("#password", Input).focus()

    @on(Input.Submitted, "#password")
    @on(Button.Pressed, "#login")
    def _login(self) -> None:
        if self.trust.refused or (self.trust.ask and not self.trusted):
            return  # no password goes anywhere before trust is decided
        username = self.query_one("#username", Input).value.strip()
        password_input = self.query_one("#password", Input)
        if not username:
            self.notify("Type a username.", severity="warning")
            self.query_one("#username", Input).focus()
            return
        credentials = Credentials(username, password_input.value)
        password_input.value = ""
        self.dismiss(LoginAnswer("login", credentials, self.trusted))

    @on(Button.Pressed, "#logout")
    def _logout(self) -> None:
        self.query_one("#password", Input).value = ""
        self.dismiss(LoginAnswer("logout", None))

    @on(Button.Pressed, "#cancel")
    @on(Button.Pressed, "#trust-cancel")
    def action_cancel(self) -> None:
        self.query_one("#password", Input).value = ""
        self.dismiss(None)


class SaveReportScreen(_Dialog, ModalScreen[Path | None]):
    """Where to write the error report (CSV of the failed rows)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, default: Path, failed: int) -> None:
        super().__init__()
        self.default = default
        self.failed = failed

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="dialog wide"):
            yield Label(f"Save the error report ({self.failed} series)", classes="dialog-title")
            yield Input(str(self.default), id="path")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()

    @on(Input.Submitted, "#path")
    @on(Button.Pressed, "#save")
    def _save(self) -> None:
        text = self.query_one("#path", Input).value.strip()
        if not text:
            self.notify("Type a file name.", severity="warning")
            return
        self.dismiss(Path(text).expanduser())

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmQuitScreen(_Dialog, ModalScreen[bool]):
    """Quitting would stop running downloads: ask first. ``True``: quit."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,n", "stay", "Keep downloading"),
        Binding("q,y", "quit_now", "Quit"),
    ]

    def __init__(self, active: int) -> None:
        super().__init__()
        self.active = active

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="dialog"):
            yield Label(f"{self.active} series are downloading. Quit now?",
                        classes="dialog-title")
            yield Label("Finished series are kept; the rest resume when you open this "
                        "manifest again with the same destination.", classes="dialog-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Quit", variant="error", id="quit")
                yield Button("Keep downloading", variant="primary", id="stay")

    def on_mount(self) -> None:
        self.query_one("#stay", Button).focus()

    @on(Button.Pressed, "#quit")
    def action_quit_now(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#stay")
    def action_stay(self) -> None:
        self.dismiss(False)
