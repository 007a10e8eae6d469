"""``verify ROOT --server [--repair]``: the command-line side of
:mod:`nbia_retriever.verify_server`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .common import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    check_api_url,
    fail,
    get_credentials,
    host_of,
    load_manifest,
    say,
    warn_insecure,
)


def run_server_verify(root: Path, *, repair: bool, manifest_path: str | None, api: str,
                      api_url: str | None, user: str | None, insecure: bool,
                      timeout: float) -> None:
    from ..api import DEFAULT_API_URL, HostPolicy, NbiaClient
    from ..engine.run import resolve_api_url
    from ..errors import AuthError, NbiaError, UsageError
    from ..verify_server import verify_against_server
    from .run import trust_or_exit

    check_api_url(api_url)
    manifest = load_manifest(manifest_path) if manifest_path else None
    try:
        server = resolve_api_url(manifest, api_url) if manifest else (api_url or
                                                                      DEFAULT_API_URL)
    except UsageError as exc:
        fail(str(exc), EXIT_USAGE)
    credentials = None
    trusted: tuple[str, ...] = ()
    if user:
        trusted = trust_or_exit(server, api_url, user, interactive=True, as_json=False)
        credentials = get_credentials(user, host_of(server))
    warn_insecure(insecure)
    policy = HostPolicy(chosen=[api_url] if api_url else [], trusted_hosts=trusted)
    try:
        with NbiaClient(server, version=api, credentials=credentials, timeout=timeout,
                        verify=not insecure, policy=policy) as client:
            result = verify_against_server(root, client)
    except AuthError as exc:
        fail(str(exc), EXIT_AUTH)
    except NbiaError as exc:
        fail(str(exc), EXIT_FAILED)
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
    _repair(root, result, server=server, api=api, api_url=api_url, credentials=credentials,
            trusted=trusted, insecure=insecure, timeout=timeout)


def _repair(root: Path, result: object, *, server: str, api: str, api_url: str | None,
            credentials: object, trusted: tuple[str, ...], insecure: bool,
            timeout: float) -> None:
    """Download the bad series again, into the same root, with its own layout."""
    from ..engine import DownloadOptions, Engine
    from ..errors import NbiaError
    from ..manifest import Manifest
    from ..verify_server import ServerVerifyResult, detect_layout, set_aside
    from .run import exit_code, run_plain

    assert isinstance(result, ServerVerifyResult)
    bad = [c for c in result.bad]
    layout = detect_layout(root, result)
    try:
        aside = set_aside(root, bad)
    except NbiaError as exc:  # .nbia/ itself planted as a link: refused, one line
        fail(str(exc), EXIT_FAILED)
    manifest = Manifest(series_uids=tuple(c.uid for c in bad),
                        headers={"databasketId": root.name + ".tcia",
                                 "downloadServerUrl": ""}, source=None, duplicates_dropped=0)
    options = DownloadOptions(api=api, api_url=server, layout=layout, timeout=timeout,
                              verify_tls=not insecure, credentials=credentials,  # type: ignore[arg-type]
                              trusted_hosts=trusted)
    say(f"repairing {len(bad)} series (their old folders are in {aside})", err=True)
    report = run_plain(Engine(manifest, root.parent, options))
    say(report.summary(), err=True)
    if report.ok:
        shutil.rmtree(aside, ignore_errors=True)
    else:
        say(f"the old folders stay in {aside}", err=True)
    sys.exit(exit_code(report))
