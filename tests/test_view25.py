"""The view for people, round 2 (issue 25 item 5), driven with Textual's Pilot against the
reference server over real HTTP on 127.0.0.1.

* Trust is decided before the password is asked; a refused login keeps the finished rows.
* Long messages wrap (the status line, the quit dialog).
* Quitting mid-download prints the summary, the folder and the resume command, and exits
  with the CLI's code (130 interrupted).
* Every key says something when it cannot act.
* The progress line counts the streams really open.
* ``-d`` may name the download root itself (as ``verify`` takes it); rows say where they
  came from.

Waiting is always for a condition the user could see, bounded by a deadline; never a sleep.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from textual.geometry import Region
from textual.widget import Widget
from textual.widgets import Input, Label

from nbia_retriever.engine import DownloadOptions, Engine
from nbia_retriever.errors import EXIT_INTERRUPTED
from nbia_retriever.manifest import read_manifest
from nbia_retriever.models import SeriesState
from nbia_retriever.server import FaultPlan, ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary
from nbia_retriever.tui import RetrieverApp
from nbia_retriever.tui.app import FINISHED, READY, RUNNING
from nbia_retriever.tui.screens import ConfirmQuitScreen, LoginScreen
from tui_helpers import DEADLINE, wait_for

pytestmark = pytest.mark.anyio

SIZE = (130, 36)
NARROW = (80, 24)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    """4 public series (collection A) + 4 restricted ones (collection B, alice only)."""
    return archive_factory(seed=11, collections=2, patients=2, studies=1, series=2, images=4,
                           awkward=False)


@pytest.fixture
def server(archive: ArchiveSummary, serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    return serve(archive.root)


@pytest.fixture(autouse=True)
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's config file: one of this test's, never the real one."""
    path = tmp_path / "config" / "config.toml"
    monkeypatch.setenv("NBIA_RETRIEVER_CONFIG", str(path))
    return path


def make_app(archive: ArchiveSummary, server: ReferenceServer, dest: Path, *,
             manifest: str = "manifest.tcia", api_url: bool = True, workers: int = 2,
             **kwargs: object) -> RetrieverApp:
    options = DownloadOptions(api_url=server.api_url if api_url else None, workers=workers,
                              retries=1, backoff_base=0.01, timeout=20)
    return RetrieverApp(read_manifest(archive.root / manifest), dest, options,
                        show_rates=False, **kwargs)  # type: ignore[arg-type]


def manifest_naming(archive: ArchiveSummary, server: ReferenceServer, folder: Path) -> Path:
    """manifest-all.tcia whose downloadServerUrl is the reference server: a server only
    the manifest names (the user passes no --api-url)."""
    text = (archive.root / "manifest-all.tcia").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^downloadServerUrl=.*$", f"downloadServerUrl={server.api_url}", text)
    path = folder / "shared.tcia"
    path.write_text(text, encoding="utf-8")
    return path


def shown(widget: Widget) -> str:
    """The text a widget shows on screen, its lines joined by spaces (so a sentence
    wrapped over several lines reads whole, and a cut one does not)."""
    strips = widget.render_lines(Region(0, 0, widget.size.width, widget.size.height))
    return " ".join(" ".join("".join(s.text for s in strip).split()) for strip in strips)


def streaming(app: RetrieverApp) -> int:
    """Series downloading (a stalled server: part of the zip, then silence)."""
    return sum(1 for r in list(app.engine.results.values())
               if r.state == SeriesState.DOWNLOADING)


def states(app: RetrieverApp) -> dict[str, str]:
    return {uid: row.state for uid, row in app.rows.items()}


# -- trust before the password; a refused login keeps the finished rows ------------------


async def test_trust_is_asked_before_the_password(archive: ArchiveSummary,
                                                  server: ReferenceServer, tmp_path: Path,
                                                  config_file: Path) -> None:
    manifest = manifest_naming(archive, server, tmp_path)
    options = DownloadOptions(workers=2, retries=1, backoff_base=0.01, timeout=20)
    app = RetrieverApp(read_manifest(manifest), tmp_path / "dl", options, show_rates=False)
    public = {s.series_uid for s in archive.series if not s.restricted}
    restricted = {s.series_uid for s in archive.series if s.restricted}
    host = server.api_url.split("/")[2]
    password = archive.users["alice"]
    async with app.run_test(size=NARROW) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("s")
        await wait_for(pilot, lambda: app.phase == FINISHED, "the public series")
        assert {states(app)[u] for u in public} == {SeriesState.COMPLETE}

        # A wrong password, after trusting the host for this run: refused, nothing lost.
        await pilot.press("l")
        dialog = app.screen
        assert isinstance(dialog, LoginScreen)
        question = shown(dialog.query_one("#login-trust", Label))
        assert f"Only the manifest names {host}" in question and "password?" in question
        assert not dialog.query_one("#login-fields").display  # no password before trust
        assert "password" not in shown(dialog).replace("password?", "")
        await pilot.click("#trust-run")
        assert dialog.query_one("#login-fields").display
        assert dialog.query_one("#password", Input).has_focus or dialog.query_one(
            "#username", Input).has_focus
        dialog.query_one("#username", Input).value = "alice"
        dialog.query_one("#password", Input).value = "wrong"
        await pilot.click("#login")
        await wait_for(pilot, lambda: "Login refused" in app.message, "the refusal")
        # The dialog's Log in button is its own (the window's #login did reopen it).
        assert not isinstance(app.screen, LoginScreen)
        assert app.phase == FINISHED and app.credentials is None
        assert {states(app)[u] for u in public} == {SeriesState.COMPLETE}  # kept
        # The whole reason is on screen, wrapped at 80 columns, not cut at the edge.
        status = app.query_one("#status", Label)
        await wait_for(pilot, lambda: shown(status).endswith("failed: HTTP 400"),
                       f"the whole message, not {shown(status)!r}")
        assert shown(status) == " ".join(app.message.split())
        assert status.size.height == 2 and app.screen.region.contains_region(status.region)

        # The right password: the host stays trusted for this run (no question again).
        await pilot.press("l")
        dialog = app.screen
        assert isinstance(dialog, LoginScreen)
        assert not dialog.query("#login-trust")
        assert f"goes to {host} only" in shown(dialog.query_one("#login-host", Label))
        dialog.query_one("#username", Input).value = "alice"
        dialog.query_one("#password", Input).value = password
        await pilot.click("#login")
        await wait_for(pilot, lambda: app.phase != RUNNING and "as alice" in str(
            app.query_one("#user", Label).render()) and app.phase in (READY, FINISHED)
            and not app._preparing, "the login")
        assert {states(app)[u] for u in public} == {SeriesState.COMPLETE}
        assert {states(app)[u] for u in restricted} == {SeriesState.NOT_STARTED}
    assert not config_file.exists()  # "this run" writes nothing


async def test_trust_always_goes_to_the_config_file(archive: ArchiveSummary,
                                                    server: ReferenceServer, tmp_path: Path,
                                                    config_file: Path) -> None:
    config_file.parent.mkdir(parents=True)
    config_file.write_text('# mine\nproxy = "http://127.0.0.1:9"\n\n[licenses]\n'
                           'accepted = ["C"]\n', encoding="utf-8")
    manifest = manifest_naming(archive, server, tmp_path)
    options = DownloadOptions(workers=2, retries=1, backoff_base=0.01, timeout=20)
    app = RetrieverApp(read_manifest(manifest), tmp_path / "dl", options, show_rates=False)
    host = server.api_url.split("/")[2]
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("l")
        await pilot.click("#trust-always")
        dialog = app.screen
        dialog.query_one("#username", Input).value = "alice"
        dialog.query_one("#password", Input).value = archive.users["alice"]
        await pilot.click("#login")
        await wait_for(pilot, lambda: app.phase == READY and app._fallback is None,
                       "the login")
        assert not isinstance(app.screen, LoginScreen)
        assert app.credentials is not None and "refused" not in app.message
    text = config_file.read_text(encoding="utf-8")
    assert text.count("# mine") == 1  # the user's text stays
    data = tomllib.loads(text)
    assert data["trusted_hosts"] == [host] and data["licenses"] == {"accepted": ["C"]}

    # A second window trusts it without asking.
    again = RetrieverApp(read_manifest(manifest), tmp_path / "dl", options, show_rates=False)
    async with again.run_test(size=SIZE) as pilot:
        await pilot.press("l")
        assert isinstance(again.screen, LoginScreen)
        assert not again.screen.query("#login-trust")
        assert again.screen.query_one("#login-fields").display


def test_remember_trusted_host_edits_only_its_key(tmp_path: Path) -> None:
    from nbia_retriever.tui.trust import remember_trusted_host  # new in issue 25

    path = tmp_path / "c.toml"
    assert remember_trusted_host("a.example", path) == path
    assert tomllib.loads(path.read_text())["trusted_hosts"] == ["a.example"]
    path.write_text('trusted_hosts = [\n  "[::1]:8443", # lab\n  "b.example",\n]\n'
                    'proxy = "socks5h://127.0.0.1:1080"\n', encoding="utf-8")
    remember_trusted_host("xn--bcher-kva.example", path)
    data = tomllib.loads(path.read_text())
    assert data == {"trusted_hosts": ["[::1]:8443", "b.example", "xn--bcher-kva.example"],
                    "proxy": "socks5h://127.0.0.1:1080"}
    before = path.read_text()
    remember_trusted_host("b.example", path)  # already there: untouched
    assert path.read_text() == before


# -- long messages wrap --------------------------------------------------------------------


async def test_the_quit_dialog_text_is_whole(archive: ArchiveSummary,
                                            serve: Callable[..., ReferenceServer],
                                            tmp_path: Path) -> None:
    stalled = FaultPlan(script={s.series_uid: ["stall:600"] * 10 for s in archive.series})
    slow = serve(archive.root, faults=stalled)
    app = make_app(archive, slow, tmp_path / "dl")
    async with app.run_test(size=NARROW) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("s")
        await wait_for(pilot, lambda: streaming(app) == 2, "2 streams")
        # In 80 columns the counts stay whole beside the bar (the bar gives way).
        counts = app.query_one("#counts", Label)
        await wait_for(pilot, lambda: shown(counts) == "0/4 done · 2 streams open",
                       "the counts")
        assert app.screen.region.contains_region(counts.region)
        await pilot.press("q")
        dialog = app.screen
        assert isinstance(dialog, ConfirmQuitScreen)
        box = dialog.query_one("#dialog")
        for label in dialog.query(Label):  # on screen, inside the dialog's frame
            assert box.content_region.contains_region(label.region), shown(label)
        text = " ".join(shown(label) for label in dialog.query(Label))
        assert ("Finished series are kept; the rest resume when you open this manifest "
                "again with the same destination.") in text
        await pilot.press("n")
        app.engine.cancel()
        await wait_for(pilot, lambda: app.phase == FINISHED, "the cancel")


# -- quitting mid-download: the ending and the exit code -----------------------------------


async def test_quitting_mid_download_gives_the_ending(archive: ArchiveSummary,
                                                     serve: Callable[..., ReferenceServer],
                                                     tmp_path: Path) -> None:
    manifest = read_manifest(archive.root / "manifest.tcia")
    first = manifest.series_uids[0]
    # One series completes; the others' streams stall until the user quits.
    stalled = FaultPlan(script={uid: ["stall:600"] * 10 for uid in manifest.series_uids[1:]})
    slow = serve(archive.root, faults=stalled)
    app = make_app(archive, slow, tmp_path / "dl", workers=2)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("s")
        await wait_for(pilot, lambda: app.rows[first].state == SeriesState.COMPLETE
                       and streaming(app) == 2, "one series and 2 streams")
        await pilot.press("q", "y")
        deadline = time.monotonic() + DEADLINE
        while app.is_running:
            assert time.monotonic() < deadline, "q, y did not quit"
            await asyncio.sleep(0.01)
    assert app.return_code == EXIT_INTERRUPTED
    ending = app.ending or ""
    assert ending.startswith(f"1 of {len(manifest.series_uids)} series complete")
    assert "series interrupted" in ending
    assert f"files in {app.engine.root}" in ending
    assert f"resume: nbia-retriever open {manifest.source}" in ending
    assert f"-d {tmp_path / 'dl'}" in ending


async def test_quitting_a_finished_window_exits_0_and_untouched_quietly(
        archive: ArchiveSummary, server: ReferenceServer, tmp_path: Path) -> None:
    app = make_app(archive, server, tmp_path / "dl")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("q")
    assert app.return_code == 0 and app.ending is None  # nothing was started

    app = make_app(archive, server, tmp_path / "dl")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("s")
        await wait_for(pilot, lambda: app.phase == FINISHED, "the run")
        await pilot.press("q")
    assert app.return_code == 0
    assert app.ending is not None and app.ending.startswith("4 of 4 series complete")
    assert "resume" not in app.ending


def test_open_prints_the_ending_and_exits_with_its_code(archive: ArchiveSummary,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's side: what the window left in ``ending``/``return_code`` is printed
    and becomes the exit code (the window itself is driven in the tests above)."""
    from nbia_retriever.cli import main

    def run(self: RetrieverApp, *args: object, **kwargs: object) -> None:
        self.ending = "0 of 4 series complete\nresume: nbia-retriever open m.tcia"
        self._return_code = EXIT_INTERRUPTED

    monkeypatch.setattr(RetrieverApp, "run", run)
    result = CliRunner().invoke(main, ["open", str(archive.root / "manifest.tcia"), "-d",
                                       str(tmp_path), "--api-url",
                                       "http://127.0.0.1:9/nbia-api/services"])
    assert result.exit_code == EXIT_INTERRUPTED
    assert "resume: nbia-retriever open m.tcia" in result.output


# -- every key says something --------------------------------------------------------------


async def test_keys_that_cannot_act_say_why(archive: ArchiveSummary, server: ReferenceServer,
                                           tmp_path: Path) -> None:
    app = make_app(archive, server, tmp_path / "dl")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        for key, said in (("e", "The error report is saved once a run has finished"),
                          ("f", "Retry failed works once a run has finished"),
                          ("p", "Nothing to pause"), ("r", "Nothing to resume"),
                          ("c", "Nothing to cancel")):
            await pilot.press(key)
            # A notification (toast), as every other message of the window
            await wait_for(pilot, lambda said=said: any(
                said in n.message for n in app._notifications), key)
        assert app.phase == READY


# -- the streams really open ---------------------------------------------------------------


async def test_the_progress_line_counts_open_streams(archive: ArchiveSummary,
                                                    serve: Callable[..., ReferenceServer],
                                                    tmp_path: Path) -> None:
    stalled = FaultPlan(script={s.series_uid: ["stall:600"] * 10 for s in archive.series})
    slow = serve(archive.root, faults=stalled)
    app = make_app(archive, slow, tmp_path / "dl", workers=3)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("s")
        # Three streams answered and stalled: the server holds three open image requests.
        await wait_for(pilot, lambda: "3 streams open" in str(
            app.query_one("#counts", Label).render()), "3 streams open")
        assert streaming(app) == 3
        app.engine.cancel()
        await wait_for(pilot, lambda: app.phase == FINISHED, "the cancel")
        assert "streams open" not in str(app.query_one("#counts", Label).render())


async def test_open_streams_are_not_the_limiters_target(archive: ArchiveSummary,
                                                       serve: Callable[..., ReferenceServer],
                                                       tmp_path: Path) -> None:
    """The issue's "5 streams" while 10 series were downloading: a busy answer (429) lowers
    the limiter's target, but the streams already open stay open until their series end;
    the line counts those."""
    uids = read_manifest(archive.root / "manifest.tcia").series_uids
    plan = FaultPlan(retry_after=0.01, script={
        **{uid: ["stall:600"] * 10 for uid in uids[:3]}, uids[3]: ["http429"] * 10})
    slow = serve(archive.root, faults=plan)
    app = make_app(archive, slow, tmp_path / "dl", workers=4)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("s")
        await wait_for(pilot, lambda: streaming(app) == 3
                       and app.engine.stats().concurrency < 3, "a throttle")
        await wait_for(pilot, lambda: "3 streams open" in str(
            app.query_one("#counts", Label).render()), "3 streams open")
        app.engine.cancel()
        await wait_for(pilot, lambda: app.phase == FINISHED, "the cancel")


# -- the -d folder and where each row came from --------------------------------------------


async def test_dest_may_name_the_download_root(archive: ArchiveSummary,
                                              server: ReferenceServer, tmp_path: Path) -> None:
    manifest = read_manifest(archive.root / "manifest.tcia")
    first = Engine(manifest, tmp_path / "dl", DownloadOptions(api_url=server.api_url))
    first.remove(manifest.series_uids[2:])
    assert first.run().ok
    root = first.root
    app = make_app(archive, server, root)  # the root itself, as verify takes it
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        assert app.engine.root == root and app.dest == tmp_path / "dl"
        assert [states(app)[u] for u in manifest.series_uids[:2]] == [SeriesState.COMPLETE] * 2
        assert "2 already complete" in app.message
        # Typed in the window too.
        field = app.query_one("#dest", Input)
        field.value = str(root)
        field.focus()
        await pilot.press("enter")
        assert app.dest == tmp_path / "dl"
        detail = str(app.query_one("#detail").render())
        assert "from NBIA" in detail


# -- the whole command on a terminal ---------------------------------------------------------

#: Escape sequences (CSI, OSC/DCS strings, charset and keypad switches) and CRs.
ANSI = re.compile(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[\]P_^][^\x07\x1b]*(\x07|\x1b\\)"
                  r"|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\r")


class Terminal:
    """``nbia-retriever ARGS`` on a pty (stdin too): keys in, the screen's text out."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        import fcntl
        import struct
        import termios

        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("COLUMNS", "LINES", "NO_COLOR", "TEXTUAL")
                   and not k.lower().endswith("_proxy")}
        self.proc = subprocess.Popen([sys.executable, "-m", "nbia_retriever.cli", *args],
                                     stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                                     env={**environ, "TERM": "xterm-256color"},
                                     close_fds=True, start_new_session=True)
        os.close(slave)
        self.raw = b""

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def read_until(self, seen: Callable[[str], bool], what: str) -> None:
        deadline = time.monotonic() + 60
        while not seen(self.text):
            left = deadline - time.monotonic()
            assert left > 0, f"waited 60 s for {what}; the terminal shows: {self.text[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the program closed the terminal
                    data = b""
                if not data:
                    assert seen(self.text), f"ended before {what}: {self.text[-2000:]!r}"
                    return
                self.raw += data

    def press(self, key: str) -> None:
        os.write(self.master, key.encode())

    def close(self) -> int:
        """Everything up to the end of the program's output; its exit code."""
        deadline = time.monotonic() + 60
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"still running after 60 s: {self.text[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            try:
                data = os.read(self.master, 65536) if ready else b"?"
            except OSError:  # EIO: the program closed the terminal
                break
            if not data:
                break
            if ready:
                self.raw += data
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        return code


def test_open_on_a_terminal_quit_mid_download(archive: ArchiveSummary,
                                              serve: Callable[..., ReferenceServer],
                                              tmp_path: Path) -> None:
    """The whole command, as a user runs it: start, q, y; after the window the summary,
    the folder and the command that resumes, and exit code 130 (as download's Ctrl-C)."""
    stalled = FaultPlan(script={s.series_uid: ["stall:600"] * 10 for s in archive.series})
    slow = serve(archive.root, faults=stalled)
    manifest = archive.root / "manifest.tcia"
    term = Terminal(["open", str(manifest), "-d", "dl", "--api-url", slow.api_url,
                     "--retries", "1"], tmp_path)
    try:
        term.read_until(lambda t: "s: start" in t, "the metadata")
        term.press("s")
        term.read_until(lambda t: "streams open" in t, "the download")
        term.press("q")
        term.read_until(lambda t: "Quit now?" in t, "the quit dialog")
        term.press("y")
        code = term.close()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    tail = term.text.rpartition("Quit now?")[2]
    assert code == EXIT_INTERRUPTED, tail
    assert "0 of 4 series complete" in tail and "series interrupted" in tail
    ending = tail[tail.index("0 of 4 series complete"):]
    assert "\nfiles in dl/manifest-" in ending, ending
    assert f"resume: nbia-retriever open {manifest} -d dl --api-url {slow.api_url}" in tail
    assert "Traceback" not in term.text


def test_the_dialog_names_hosts_in_ascii_and_refuses_plain_http(tmp_path: Path) -> None:
    """No network: what the login dialog would say for a lookalike host that only a
    manifest names (its xn-- form, asked about) and for plain http (refused, no fields)."""
    from nbia_retriever.session import open_session
    from nbia_retriever.tui.trust import login_trust

    path = tmp_path / "lookalike.tcia"
    path.write_text("downloadServerUrl=https://services.cancerim\u0430gingarchive.net/nbia-api/"
                    "services\nListOfSeriesToDownload=\n1.2.3\n", encoding="utf-8")
    trust = login_trust(open_session(read_manifest(path)))
    assert trust.ask and not trust.refused
    assert trust.host == "services.xn--cancerimgingarchive-xop.net"
    plain = login_trust(open_session(api_url="http://nbia.example.org/nbia-api/services"))
    assert "nbia.example.org is plain http" in plain.refused and not plain.ask
    chosen = login_trust(open_session(api_url="https://nbia.example.org/nbia-api/services"))
    assert not chosen.ask and not chosen.refused  # --api-url is the user's choice


async def test_a_refused_host_gets_no_password_field(archive: ArchiveSummary,
                                                    server: ReferenceServer,
                                                    tmp_path: Path) -> None:
    from nbia_retriever.tui.trust import LoginTrust

    app = make_app(archive, server, tmp_path / "dl")
    async with app.run_test(size=NARROW) as pilot:
        answers: list[object] = []
        reason = "nbia.example.org is plain http: anyone on the way could read the password."
        app.push_screen(LoginScreen(trust=LoginTrust("nbia.example.org", refused=reason)),
                        answers.append)
        await pilot.pause()
        dialog = app.screen
        assert reason in shown(dialog.query_one("#login-refused", Label))
        assert not dialog.query_one("#password", Input).display
        assert not dialog.query_one("#login").display
        await pilot.press("enter")  # the focused Cancel: nothing is sent anywhere
        assert answers == [None]


def test_destination_for_reads_folders_as_verify_does(archive: ArchiveSummary,
                                                      tmp_path: Path) -> None:
    from nbia_retriever.layout import root_folder_name
    from nbia_retriever.tui.app import destination_for

    manifest = read_manifest(archive.root / "manifest.tcia")
    mine = tmp_path / "dl" / root_folder_name(manifest.root_name)
    other = tmp_path / "dl" / "manifest-other"
    for root in (mine, other):
        (root / ".nbia").mkdir(parents=True)
    assert destination_for(mine, manifest) == (
        tmp_path / "dl", f"{mine} is this manifest's download: continuing it. ")
    assert destination_for(tmp_path / "dl", manifest) == (tmp_path / "dl", "")  # -d folder
    kept, note = destination_for(other, manifest)
    assert kept == other and "the download of another manifest" in note
    assert destination_for(tmp_path / "new", manifest) == (tmp_path / "new", "")
    assert not (tmp_path / "new").exists()  # read-only
