"""The selection commands: ``collections``, ``search``, ``manifest merge|info``,
``merge-reports``.

Kept out of ``cli.py`` (and imported lazily by its command registry) so that
``download`` on a cluster node never pays for them. Each command is a thin shell over
:mod:`nbia_retriever.search`, which holds the logic and is usable from Python; this
module only turns errors into one line and an exit code, and results into tables.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..errors import NbiaError, UsageError
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    cell,
    check_api_url,
    fail,
    fail_for,
    inert,
    load_manifest,
    open_cli_session,
    say,
    say_json,
    warn_insecure,
    with_api_options,
)
from .common import human as _human


def _client_options(api: str, user: str | None, insecure: bool, timeout: float, *,
                    manifest: Any = None, chosen: str | None = None) -> dict[str, Any]:
    """Client settings of the command's session (:mod:`nbia_retriever.session`); with
    ``--user`` the server must be trusted (exit 3 otherwise) before the password is
    asked for, and the session's host policy goes with the password."""

    warn_insecure(insecure)
    session = open_cli_session(manifest, api=api, api_url=chosen, user=user,
                               insecure=insecure, timeout=timeout)
    options: dict[str, Any] = {"version": session.version, "timeout": session.timeout,
                               "verify": session.verify}
    if user:
        options["credentials"] = session.credentials
        options["policy"] = session.policy
    return options


def _console() -> Any:
    """A rich console; wide when piped, so logs get whole UIDs instead of folded ones."""

    console = Console()
    return console if console.is_terminal else Console(width=200)


def query_api_options(func: Any) -> Any:
    """``with_api_options``, with the right default server in ``--api-url``'s help: these
    commands have no manifest to take the server from."""
    func = with_api_options(func)
    for param in getattr(func, "__click_params__", []):
        if param.name == "api_url":
            param.help = ("Services root of the NBIA server, e.g. "
                          "http://127.0.0.1:8080/nbia-api/services (default: the public "
                          "TCIA API).")
    return func


# ------------------------------------------------------------------------- collections


@click.command("collections", short_help="List collections (--counts: patients, series, size).")
@click.option("--counts", is_flag=True,
              help="Also count patients, series, images and bytes (2 requests per collection).")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line.")
@query_api_options
def collections_command(counts: bool, as_json: bool, api: str, api_url: str | None,
                        user: str | None, insecure: bool, timeout: float) -> None:
    """List the collections of the server (default: the public TCIA API; --api-url URL
    for another NBIA server).

    With --counts, a collection whose counts the server did not answer is still listed,
    with "?" in place of the missing numbers and one warning line on stderr saying why
    (exit 0: the rest of the table is right). Exit 1 when no count came at all.
    """
    from ..search import collections  # search (11 ms more) not at --help: only when a command runs

    check_api_url(api_url)
    try:
        items = collections(api_url, counts=counts,
                            **_client_options(api, user, insecure, timeout, chosen=api_url))
    except NbiaError as exc:
        fail_for(exc)
    for item in items:
        if item.get("error"):
            item["error"] = inert(item["error"])
    unanswered = [item for item in items if item.get("error")]
    if as_json:
        for item in items:
            say_json(item)
    else:

        table = Table(title=f"{len(items)} collections",
                      caption="?: the server did not answer this count (see the warnings)"
                      if unanswered else None)
        table.add_column("Collection", overflow="fold")
        if counts:
            for name in ("Patients", "Series", "Images", "Size"):
                table.add_column(name, justify="right")
        for item in items:
            if counts:
                mark = "?" if item.get("error") else ""
                table.add_row(cell(item["collection"]), _int(item.get("patients"), mark),
                              _int(item.get("series"), mark), _int(item.get("images"), mark),
                              _human(item.get("size")) if item.get("size") is not None
                              else mark)
            else:
                table.add_row(cell(item["collection"]))
        _console().print(table)
    if unanswered:
        _warn_unanswered(items, unanswered, as_json=as_json)


def _warn_unanswered(items: list[dict[str, Any]], unanswered: list[dict[str, Any]], *,
                     as_json: bool) -> None:
    """One warning line per collection whose counts did not come (capped like ``-q``);
    exit 1 when not a single count came."""
    from .download_command import QUIET_REASONS  # only merge-reports -q needs it

    for item in unanswered[:QUIET_REASONS]:
        say(f"nbia-retriever: warning: {item['collection']}: counts not available "
            f"(?): {item['error']}", err=True)
    if len(unanswered) > QUIET_REASONS:
        click.echo(f"nbia-retriever: warning: ... and {len(unanswered) - QUIET_REASONS:,} "
                   "more collections without counts (--json gives every error)", err=True)
    if len(unanswered) == len(items) and not any(
            item.get(key) is not None for item in items
            for key in ("patients", "series", "images", "size")):
        fail(f"the server answered none of the counts of the {len(items):,} collections "
             "(they are listed without them)", EXIT_FAILED, as_json=as_json)
    click.echo(f"nbia-retriever: warning: {len(unanswered):,} of {len(items):,} collections "
               "without counts (marked ?)", err=True)


def _int(value: int | None, missing: str = "") -> str:
    return missing if value is None else f"{value:,}"


# ------------------------------------------------------------------------------ search


@click.command("search", short_help="Find series; save them as a manifest (-o cart.tcia).")
@click.option("--collection", metavar="NAME", help="Collection (exact, any case).")
@click.option("--patient", metavar="ID", help="PatientID.")
@click.option("--study", metavar="UID", help="StudyInstanceUID.")
@click.option("--modality", metavar="CODE", help="Modality, e.g. CT, MR, PT.")
@click.option("--body-part", metavar="NAME", help="BodyPartExamined, e.g. CHEST.")
@click.option("--manufacturer", metavar="NAME", help="Manufacturer, e.g. SIEMENS.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="CART.tcia",
              help="Write the selection as a .tcia manifest (for download or the Java tool).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the selection as CSV (getSeries columns; download reads it too).")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line, no table.")
@click.option("--show", type=click.IntRange(0), default=50, show_default=True,
              help="Table rows to show (0: all); totals always cover every series.")
@query_api_options
def search_command(collection: str | None, patient: str | None, study: str | None,
                   modality: str | None, body_part: str | None, manufacturer: str | None,
                   output: str | None, csv_path: str | None, as_json: bool, show: int,
                   api: str, api_url: str | None, user: str | None, insecure: bool,
                   timeout: float) -> None:
    """Find series by collection, patient, study, modality, body part or manufacturer,
    show them with their total size, and save the selection with -o CART.tcia.

    The server is the public TCIA API unless --api-url names another. Exit 1 when
    nothing matches.
    """
    from ..search import search_series, write_cart, write_csv  # search: not at --help

    check_api_url(api_url)
    filters = {"collection": collection, "patient": patient, "study": study,
               "modality": modality, "body_part": body_part, "manufacturer": manufacturer}
    if not any(v and v.strip() for v in filters.values()):
        fail("give at least one filter, e.g. --collection NAME (an unfiltered search "
             "would list every series of the archive)", EXIT_USAGE)
    try:
        records = search_series(api_url, **filters,  # type: ignore[arg-type]
                                **_client_options(api, user, insecure, timeout,
                                                  chosen=api_url))
    except NbiaError as exc:
        fail_for(exc)
    if not records:
        wanted = ", ".join(f"{k}={v}" for k, v in filters.items() if v)
        fail(f"no series match {wanted}", EXIT_FAILED)
    try:
        if output:
            write_cart(records, output, api_url)
        if csv_path:
            write_csv(records, csv_path, api_url)
    except NbiaError as exc:
        fail_for(exc)
    images = sum(r.image_count or 0 for r in records)
    size = sum(r.file_size or 0 for r in records)
    if as_json:
        for record in records:
            say_json(record.to_dict())
    else:

        title = f"{len(records):,} series, {images:,} images, {_human(size)}"
        table = Table(title=title)
        for name in ("Collection", "Patient ID", "Series Instance UID", "Modality",
                     "Series Description"):
            table.add_column(name, overflow="fold")
        table.add_column("Images", justify="right")
        table.add_column("Size", justify="right")
        shown = records if show == 0 else records[:show]
        for r in shown:
            table.add_row(cell(r.collection), cell(r.patient_id), cell(r.series_uid),
                          cell(r.modality), cell(r.series_description), _int(r.image_count),
                          _human(r.file_size))
        if len(shown) < len(records):
            table.add_row("", "", f"... {len(records) - len(shown):,} more (--show 0: all)",
                          "", "", "", "")
        table.add_section()
        table.add_row("Total", "", f"{len(records):,} series", "", "", f"{images:,}",
                      _human(size))
        _console().print(table)
    for path, what in ((output, "manifest"), (csv_path, "CSV")):
        if path:
            click.echo(f"wrote {what} {path}: {len(records):,} series, {_human(size)}",
                       err=True)
    sys.exit(EXIT_OK)


# ---------------------------------------------------------------------------- manifest


@click.group("manifest")
def manifest_group() -> None:
    """Combine and inspect manifests."""


@manifest_group.command("merge")
@click.argument("sources", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              metavar="OUT.tcia", help="The merged manifest.")
@click.option("--force", is_flag=True,
              help="Merge manifests of different servers (the first one's server is kept).")
def merge_command(sources: tuple[str, ...], output: str, force: bool) -> None:
    """Merge SOURCES (manifests, spreadsheets, UID lists) into one manifest: union in
    order, duplicates dropped, headers from the first."""
    from ..search import merge_manifests  # search: not at --help

    try:
        path, written, dropped = merge_manifests(sources, output, force=force)
    except NbiaError as exc:
        fail_for(exc)
    note = f" ({dropped:,} duplicates dropped)" if dropped else ""
    click.echo(f"wrote {path}: {written:,} series from {len(sources)} manifests{note}")


@manifest_group.command("info")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--offline", is_flag=True, help="Only what the file says; no server request.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@with_api_options
def info_command(manifest: str, offline: bool, as_json: bool, api: str, api_url: str | None,
                 user: str | None, insecure: bool, timeout: float) -> None:
    """Describe MANIFEST: series, server, and (from the server's metadata) collections,
    images and total size."""
    from ..search import manifest_summary  # search and the session: not at --help
    from ..session import resolve_server

    check_api_url(api_url)
    parsed = load_manifest(manifest)
    try:
        resolve_server(parsed, api_url)  # a malformed server URL is exit 2, offline too
    except UsageError as exc:
        fail_for(exc)
    try:
        info = manifest_summary(manifest, offline=offline, api_url=api_url,
                                **({} if offline else
                                   _client_options(api, user, insecure, timeout,
                                                   manifest=parsed, chosen=api_url)))
    except NbiaError as exc:
        fail_for(exc)
    except OSError as exc:
        fail(f"{manifest}: {exc.strerror or exc}", EXIT_USAGE)
    if as_json:  # a manifest's headers and a server's collection names: sanitised
        say_json(info)
        return
    dropped = info["duplicates_dropped"]
    lines = [
        f"file:            {info['file']} ({info['kind']})",
        f"series:          {info['series']:,}"
        + (f" ({dropped:,} duplicates dropped)" if dropped else ""),
        f"server:          {info['download_server_url'] or '(none: public TCIA)'}",
        f"download folder: {info['root_name']}",
        f"retries:         {info['retries']}",
        f"annotations:     {'yes' if info['include_annotation'] else 'no'}",
    ]
    if info["manifest_version"]:
        lines.append(f"version:         {info['manifest_version']}")
    if not offline:
        lines.append(f"images:          {info['images']:,}")
        lines.append(f"size:            {_human(info['size'])}")
        lines.append(f"collections:     {len(info['collections'])}")
        for name, row in info["collections"].items():
            lines.append(f"  {name}: {row['series']:,} series, {row['images']:,} images, "
                         f"{_human(row['size'])}")
        missing = info["not_available"]
        if missing:
            lines.append(f"not available:   {len(missing):,} series (unknown, or not public: "
                         "log in with --user)")
    say("\n".join(lines))


# ---------------------------------------------------------------------- merge-reports


@click.command("merge-reports", short_help="Check a sharded download; list what is missing.")
@click.argument("root", type=click.Path(file_okay=False, exists=True))
@click.option("--manifest", "manifest", type=click.Path(dir_okay=False), metavar="M.tcia",
              help="The series that should be there (default: every series of the journals).")
@click.option("--check", is_flag=True, help="Only report; do not rewrite metadata.csv.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def merge_reports_command(root: str, manifest: str | None, check: bool,
                          as_json: bool) -> None:
    """After a sharded download (download --shard K/N into one destination), combine the
    shards' journals and metadata.csv and list every series still missing.

    ROOT is the download root (the folder with metadata.csv), or its destination folder
    (the -d folder: its one download root, or the one --manifest makes there; several are
    listed for you to name one). Run it once every shard has finished. Exit 1 if
    anything is missing.
    """
    from ..search import merge_reports  # search: not at --help
    from .verify_server import root_or_exit

    name = load_manifest(manifest).root_name if manifest else None
    folder = root_or_exit(root, name)  # several roots: listed, one a line (exit 2)
    try:
        result = merge_reports(folder, manifest=manifest, fix=not check)
    except NbiaError as exc:  # not errors.exit_code: whatever stops a merge, ROOT or the
        fail(str(exc), EXIT_USAGE)  # manifest given is what cannot be used (2)

    for warning in result.warnings:
        click.echo(inert(warning), err=True)
    # Journals and rows of every shard (a shared folder): printed through the sanitiser.
    if as_json:
        data = {
            "root": str(result.root), "expected": result.expected, "complete": result.complete,
            "journals": result.journals, "ok": result.ok, "conflicts": result.conflicts,
            "missing": [asdict(m) for m in result.missing],
            "csv": {"rows": result.csv_rows, "duplicates": result.csv_duplicates,
                    "headers_removed": result.csv_headers_removed,
                    "bad_lines": result.csv_bad_lines, "added": result.csv_added,
                    "rewritten": result.csv_rewritten},
        }
        say_json(data)
    else:
        for conflict in result.conflicts:
            say(f"conflict: {conflict}")
        for m in result.missing:
            where = f" [shard {m.shard}]" if m.shard else ""
            detail = f": {m.error}" if m.error else ""
            say(f"missing {m.uid}{where} ({m.state}){detail}")
        say(result.summary())
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)
