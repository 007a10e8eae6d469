"""``verify ROOT --server [--repair]``: the command-line side of
:mod:`nbia_retriever.verify_server`; and what every command that takes a download root
shares: the folder the user typed (:func:`root_or_exit`) and the server the root came
from (:func:`origin_or_exit`).

The server of ``verify --server`` is, in order: ``--api-url``; the server of
``--manifest``; the server the root's journal recorded (:func:`.journal.root_origin`);
public TCIA. A recorded server is used as the download used it: one the user chose
(``--api-url`` then) as chosen, one a manifest named as that manifest's claim, so the
host policy asks before a password goes there exactly as the download did. A record
this user did not write (no MAC of theirs: someone else's journal in a shared folder)
is shown and asked about, and without anyone to ask it is refused (exit 2, naming the
``--api-url`` that would use it).
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..engine.journal import root_origin
from ..errors import AmbiguousRootError, DestinationError, NbiaError
from ..manifest import Manifest
from ..verify import find_download_root
from ..verify_server import ServerVerifyResult, detect_layout, set_aside, verify_against_server
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    check_api_url,
    fail,
    fail_for,
    inert,
    load_manifest,
    open_cli_session,
    run_exit_code,
    say,
    warn_insecure,
)

if TYPE_CHECKING:
    from ..session import Session


def root_or_exit(folder: str | Path, manifest_root_name: str | None = None) -> Path:
    """The download root the user meant by ``folder`` (itself, or the one root of a
    ``-d`` folder: :func:`~nbia_retriever.verify.find_download_root`); several roots
    there are listed one a line, with exit 2; none is one line, exit 2."""
    try:
        root = find_download_root(folder, manifest_root_name)
    except AmbiguousRootError as exc:
        click.echo(inert(f"nbia-retriever: error: {exc.folder} holds {len(exc.roots)} "
                         "download roots; name one of them:"), err=True)
        for one in exc.roots:
            click.echo(inert(f"  {one}"), err=True)
        sys.exit(EXIT_USAGE)
    except DestinationError as exc:
        fail(str(exc), EXIT_USAGE)
    if root != Path(folder):
        say(f"download root: {root}", err=True)
    return root


def origin_or_exit(root: Path, api_url: str | None, manifest: Manifest | None,
                   *, interactive: bool = True) -> tuple[str | None, Manifest | None]:
    """``(api_url, manifest)`` for the session of a command on ``root``: the user's own
    choice when given, else the server ``root``'s journal recorded (module docstring);
    ``(None, None)``: nothing recorded, public TCIA as before."""
    if api_url or manifest is not None:
        return api_url, manifest
    origin = root_origin(root)
    if origin is None or origin.server is None:
        return None, None
    server = origin.server
    if not origin.trusted:
        where = f"{origin.journal} was not written by you"
        if not (interactive and sys.stdin.isatty()):
            fail(f"{where}; it names the server {server}: pass --api-url {server} to use "
                 "it (or --api-url URL for another)", EXIT_USAGE)
        if not click.confirm(inert(f"{where}. It names the server {server}. Ask that "
                                   "server about these files?"), default=False, err=True):
            fail(f"not asking {server}: pass --api-url URL to choose the server", EXIT_USAGE)
    say(f"server: {server} (where the files of {root} came from)", err=True)
    if origin.chosen and origin.trusted:  # the user named it with --api-url then
        return server, None
    # A manifest's claim stays a claim: the policy decides about a password as then.
    headers = dict(line.split("=", 1) for line in origin.headers.splitlines() if "=" in line)
    if not any(k.casefold() == "downloadserverurl" for k in headers):
        headers = {"downloadServerUrl": server}
    return None, Manifest(series_uids=(), headers=headers, source=origin.manifest or None)


def run_server_verify(root: Path, *, repair: bool, manifest_path: str | None, api: str,
                      api_url: str | None, user: str | None, insecure: bool,
                      timeout: float) -> None:

    check_api_url(api_url)
    manifest = load_manifest(manifest_path) if manifest_path else None
    api_url, manifest = origin_or_exit(root, api_url, manifest)
    session = open_cli_session(manifest, api=api, api_url=api_url, user=user,
                               insecure=insecure, timeout=timeout)
    warn_insecure(insecure)
    try:
        with session.open_client() as client:
            result = verify_against_server(root, client, timeout=timeout, verify=not insecure)
    except NbiaError as exc:
        fail_for(exc)
    except OSError as exc:
        fail(f"{root}: {exc.strerror or exc}", EXIT_FAILED)
    for warning in result.warnings:
        say(warning, err=True)
    for check in result.checks:
        if check.bad:
            say(check.line())
    if not result.checks:
        fail(f"{root}: no series folders here (Collection/Patient/Study/Series)", EXIT_USAGE)
    say(result.summary())
    if result.ok or not repair:
        if not result.ok:
            say(f"next: add --repair to download the {len(result.bad)} series again "
                f"(nbia-retriever verify {shlex.quote(str(root))} --server --repair)")
        sys.exit(EXIT_OK if result.ok else EXIT_FAILED)
    _repair(root, result, session)


def _repair(root: Path, result: object, session: Session) -> None:
    """Download the bad series again, into the same root, with its own layout, through
    the session the verification used."""
    from ..engine import DownloadOptions, Engine  # the engine only for --repair
    from .download_command import run_plain

    assert isinstance(result, ServerVerifyResult)
    bad = [c for c in result.bad]
    layout = detect_layout(root, result)
    try:
        aside = set_aside(root, bad)
    except NbiaError as exc:  # .nbia/ itself planted as a link: refused, one line; the
        fail(str(exc), EXIT_FAILED)  # repair failed (1), as verify's own checks do
    manifest = Manifest(series_uids=tuple(c.uid for c in bad),
                        headers={"databasketId": root.name + ".tcia",
                                 "downloadServerUrl": ""}, source=None, duplicates_dropped=0)
    options = DownloadOptions(api=session.version, api_url=session.api_url, layout=layout,
                              timeout=session.timeout, verify_tls=session.verify,
                              credentials=session.credentials)
    say(f"repairing {len(bad)} series (their old folders are in {aside})", err=True)
    report = run_plain(Engine(manifest, root.parent, options, session=session))
    say(report.summary(), err=True)
    if report.ok:
        shutil.rmtree(aside, ignore_errors=True)
    else:
        say(f"the old folders stay in {aside}", err=True)
    sys.exit(run_exit_code(report))
