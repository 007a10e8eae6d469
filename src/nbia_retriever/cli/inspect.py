"""``list`` (the downloads table, no download) and ``verify`` (a finished download)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import NbiaError
from ..models import INFO_FIELDS
from ..report import short_uid
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    cell,
    check_api_url,
    fail,
    fail_for,
    human,
    inert,
    load_manifest,
    open_cli_session,
    say,
    say_json,
    warn_insecure,
    with_api_options,
)


@click.command("list")
@click.argument("manifest", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="JSON records instead of a table.")
@click.option("--wide", is_flag=True, help="Whole UIDs (the table no longer fits 80 columns).")
@with_api_options
def list_command(manifest: str, as_json: bool, wide: bool, api: str, api_url: str | None,
                 user: str | None, insecure: bool, timeout: float) -> None:
    """Show the downloads table of MANIFEST (with totals) without downloading."""

    parsed = load_manifest(manifest, as_json=as_json)
    check_api_url(api_url, as_json=as_json)
    session = open_cli_session(parsed, api=api, api_url=api_url, user=user, insecure=insecure,
                               timeout=timeout, as_json=as_json)
    warn_insecure(insecure)
    try:
        with session.open_client() as client:
            infos = client.series_metadata(list(parsed.series_uids), errors={})
    except NbiaError as exc:
        fail_for(exc, as_json=as_json)
    if as_json:
        for uid in parsed.series_uids:
            info = infos.get(uid)
            record: dict[str, object] = ({f: getattr(info, f) for f in INFO_FIELDS} if info
                                         else {"series_uid": uid, "status": "Not available"})
            say_json(record)
        return
    from rich.console import Console  # rich (20 ms) only for list's table: verify prints lines
    from rich.table import Table

    def uid_text(uid: str) -> str:
        return uid if wide else short_uid(uid)

    table = Table(title=cell(f"{Path(manifest).name}: {len(parsed.series_uids):,} series"))
    for column in ("Collection", "Patient ID", "Study UID", "Series UID"):
        table.add_column(column, overflow="fold" if wide else "ellipsis",
                         max_width=None if wide else 18, no_wrap=not wide)
    table.add_column("Images", justify="right", no_wrap=True)
    table.add_column("Size", justify="right", no_wrap=True)
    images = size = 0
    for uid in parsed.series_uids:
        info = infos.get(uid)
        if info is None:
            table.add_row("", "", "", cell(uid_text(uid)), "", "n/a")
            continue
        images += info.image_count or 0
        size += info.file_size or 0
        table.add_row(cell(info.collection), cell(info.patient_id),
                      cell(uid_text(info.study_uid)), cell(uid_text(uid)),
                      str(info.image_count or ""), human(info.file_size))
    table.add_section()
    missing = len(parsed.series_uids) - len(infos)
    table.add_row("Total", "", "", f"{len(infos):,} series"
                  + (f", {missing:,} n/a" if missing else ""), f"{images:,}", human(size))
    console = Console()
    if not console.is_terminal:
        console = Console(width=80)
    if wide:
        # Whole UIDs are for copying: never fold one, even past the terminal's edge.
        natural = Console(width=10_000).measure(table).maximum
        console = Console(width=max(console.width, natural))
    console.print(table)
    if missing:
        click.echo(f"n/a: {missing:,} series not described by the server (unknown, or not "
                   "public: try --user)", err=True)


@click.command()
@click.argument("root", type=click.Path(file_okay=False, exists=True))
@click.option("--quick", is_flag=True, help="Check presence and sizes only, not MD5 hashes.")
@click.option("--server", "against_server", is_flag=True,
              help="Check every series folder against the server (its MD5 of the series "
                   "and its image count), without downloading: ours, adopted or Java-made.")
@click.option("--repair", is_flag=True,
              help="With --server: download again the series that do not match.")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False),
              metavar="M.tcia", help="With --server: the manifest the root was made from "
                                     "(default: the one its journal names).")
@with_api_options
def verify(root: str, quick: bool, against_server: bool, repair: bool,
           manifest_path: str | None, api: str, api_url: str | None, user: str | None,
           insecure: bool, timeout: float) -> None:
    """Re-check a finished download (ROOT: the folder with metadata.csv): against its
    journal (every file missing, altered or unexpected), or with --server against the
    server itself."""
    from ..verify import verify_root  # the checker (and the staging code) only for verify

    if repair and not against_server:
        fail("--repair needs --server (it re-downloads what the server check finds)",
             EXIT_USAGE)
    if against_server:
        from .verify_server import run_server_verify  # only for verify --server

        run_server_verify(Path(root), repair=repair, manifest_path=manifest_path, api=api,
                          api_url=api_url, user=user, insecure=insecure, timeout=timeout)
        return
    try:
        result = verify_root(Path(root), quick=quick)
    except FileNotFoundError as exc:
        fail(str(exc), EXIT_USAGE)
    except NbiaError as exc:  # not errors.exit_code: for verify, a folder it cannot
        fail(str(exc), EXIT_FAILED)  # check (a planted link) is a folder that fails (1)
    except OSError as exc:
        fail(f"{root}: {exc.strerror or exc}", EXIT_FAILED)
    for warning in result.warnings:
        click.echo(inert(warning), err=True)
    for problem in result.problems:
        say(problem)
    say(result.summary())
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)
