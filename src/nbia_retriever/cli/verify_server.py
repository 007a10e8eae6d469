"""``verify ROOT --server [--repair]``: the command-line side of
:mod:`nbia_retriever.verify_server`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import NbiaError
from ..manifest import Manifest
from ..verify_server import ServerVerifyResult, detect_layout, set_aside, verify_against_server
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    check_api_url,
    fail,
    fail_for,
    load_manifest,
    open_cli_session,
    run_exit_code,
    say,
    warn_insecure,
)

if TYPE_CHECKING:
    from ..session import Session


def run_server_verify(root: Path, *, repair: bool, manifest_path: str | None, api: str,
                      api_url: str | None, user: str | None, insecure: bool,
                      timeout: float) -> None:

    check_api_url(api_url)
    manifest = load_manifest(manifest_path) if manifest_path else None
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
