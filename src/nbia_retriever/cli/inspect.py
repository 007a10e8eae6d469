"""``list`` (the downloads table, no download) and ``verify`` (a finished download)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..errors import NbiaError
from ..models import INFO_FIELDS, SeriesInfo
from ..report import short_uid
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    cell,
    check_api_url,
    fail,
    fail_for,
    fit_widths,
    human,
    inert,
    load_manifest,
    open_cli_session,
    say,
    say_json,
    series_fields,
    warn_insecure,
    with_api_options,
)


def source_flags(func: Any) -> Any:
    """``--source``, ``--idc-index``, ``--idc-endpoint``, ``--gen3-endpoint`` as
    ``download`` declares them:
    ``list`` shows the series of the run that command would make."""
    # at decoration time, as the other commands' flags are built (no module-level cost)
    from dataclasses import fields

    from ..engine.options import DownloadOptions, flag_of  # (as above)
    from .options import click_option

    for option in reversed([o for o in fields(DownloadOptions) if o.name in SOURCE_FIELDS]):
        how = flag_of(option)
        if how is not None:
            func = click_option(option, how)(func)
    return func


SOURCE_FIELDS = ("source", "idc_index", "idc_endpoint", "gen3_endpoint")
#: The columns of ``list`` (table and TSV): what people know a series by, then its size
#: and its licence (what ``download --license``/``--exclude-license`` match, and what
#: may ask for an agreement before the first download).
LIST_COLUMNS = ("Collection", "Patient ID", "Study Date", "Modality", "Series Description",
                "Images", "Size", "License")


@click.command("list")
@click.argument("manifest", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="JSON records instead of a table.")
@click.option("--wide", is_flag=True, help="Whole UIDs, Study UID too (the table no longer "
                                           "fits 80 columns).")
@source_flags
@with_api_options
def list_command(manifest: str, as_json: bool, wide: bool, api: str, api_url: str | None,
                 user: str | None, insecure: bool, timeout: float, **how: Any) -> None:
    """Show the downloads table of MANIFEST (with totals) without downloading: each
    series as people know it (collection, patient, study date, modality, description,
    images, size, licence), and where it comes from when the run can say. Piped (not a
    terminal), the table is tab-separated values with a header line, every cell whole."""
    from ..engine.options import DownloadOptions  # the engine's options only for list

    parsed = load_manifest(manifest, as_json=as_json)
    check_api_url(api_url, as_json=as_json)
    try:
        options = DownloadOptions(api=api, api_url=api_url, verify_tls=not insecure,
                                  timeout=timeout, **how)
    except NbiaError as exc:
        fail_for(exc, as_json=as_json)
    if parsed.kind == "s5cmd":  # IDC objects by version: the run's UIDs (engine.run)
        from ..idc.source import resolve_for_run

        try:
            parsed, options, notes = resolve_for_run(parsed, options)
        except NbiaError as exc:
            fail_for(exc, as_json=as_json)
        for note in notes:
            say(note, err=True)
    session = open_cli_session(parsed, api=api, api_url=api_url, user=user, insecure=insecure,
                               timeout=timeout, as_json=as_json)
    warn_insecure(insecure)
    uids = list(parsed.keys)
    infos: dict[str, SeriesInfo] = {}
    try:
        if parsed.files:  # a DRS/PathDB sheet: its rows describe the files (no key needed)
            from ..engine.route import files_source

            source = files_source(parsed, session, options)
        else:
            source = session.source(options)
        try:
            # What must be refused before anything is asked of a server; a files source
            # needs no key to list what its sheet says.
            inner = getattr(source, "series", source) if parsed.files else source
            if inner is not None:
                inner.check()
            for batch in source.metadata_batches(uids):
                infos.update(batch.infos)
            where = getattr(source, "where", None)
            origin = {uid: where(uid) for uid in uids} if callable(where) else None
        finally:
            source.close()
    except NbiaError as exc:
        fail_for(exc, as_json=as_json)
    if as_json:
        for uid in uids:
            info = infos.get(uid)
            record: dict[str, object] = ({f: getattr(info, f) for f in INFO_FIELDS} if info
                                         else {"series_uid": uid, "status": "Not available"})
            if origin is not None:
                record["from"] = origin[uid]
            say_json(record)
        return
    missing = len(uids) - len(infos)
    from rich.console import Console  # rich (20 ms) only for list's table: verify prints lines

    console = Console()
    if console.is_terminal:
        print_list_table(Path(manifest).name, uids, infos, origin, wide=wide, console=console)
    else:
        print_list_tsv(uids, infos, origin)
        images = sum(i.image_count or 0 for i in infos.values())
        size = sum(i.file_size or 0 for i in infos.values())
        click.echo(f"{len(infos):,} series, {images:,} images, {human(size) or '0 B'}"
                   + (f"; {missing:,} n/a" if missing else ""), err=True)
    if missing:
        click.echo(f"n/a: {missing:,} series not described by the server (unknown, or not "
                   "public: try --user)", err=True)


def list_row(uid: str, info: SeriesInfo | None) -> list[str]:
    """The :data:`LIST_COLUMNS` of one series (raw text: the printers make it inert)."""
    from ..engine.licenses import license_label  # (pure; the engine's licence rules)

    if info is None:
        return [*series_fields(None), "", "n/a", ""]
    return [*series_fields(info), "" if info.image_count is None else f"{info.image_count:,}",
            human(info.file_size), license_label(info)]


def print_list_tsv(uids: list[str], infos: dict[str, SeriesInfo],
                   origin: dict[str, str] | None) -> None:
    """Tab-separated values with a header line: whole cells (whole UIDs, sizes with their
    units and in bytes), for ``cut``, ``sort``, a spreadsheet. No cell holds a tab or a
    line break (:func:`inert` makes them spaces), so every line is one series."""
    header = [*LIST_COLUMNS, "License URL", "Bytes", "Study UID", "Series UID"]
    if origin is not None:
        header.append("From")
    lines = ["\t".join(header)]
    for uid in uids:
        info = infos.get(uid)
        row = [*list_row(uid, info), info.license_url if info else "",
               "" if info is None or info.file_size is None else str(info.file_size),
               info.study_uid if info else "", uid]
        if origin is not None:
            row.append(origin[uid])
        lines.append("\t".join(inert(c).replace("\n", " ") for c in row))
    click.echo("\n".join(lines))


def print_list_table(title: str, uids: list[str], infos: dict[str, SeriesInfo],
                     origin: dict[str, str] | None, *, wide: bool, console: Any) -> None:
    """The table on a terminal: fits its width (80 columns at least) by cutting the
    free text (collection, patient, description, where from) with an ellipsis; dates,
    modality, counts, sizes and the UID's tail are never cut. ``wide``: whole cells,
    Study UID too, even past the terminal's edge (UIDs are for copying)."""
    # rich (20 ms) only for list's table: verify prints lines
    from rich import box
    from rich.cells import cell_len
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..engine.licenses import license_label  # (pure; the engine's licence rules)

    missing = len(uids) - len(infos)
    images = sum(i.image_count or 0 for i in infos.values())
    size = sum(i.file_size or 0 for i in infos.values())
    # One licence for every series (the usual case): said once under the table, so
    # that 80 columns keep room for what tells series apart; a column when they differ.
    licences = {(license_label(i), i.license_url.strip()) for i in infos.values()}
    one = next(iter(licences)) if len(licences) == 1 and not wide else None
    rows = []
    for uid in uids:
        info = infos.get(uid)
        row = list_row(uid, info)
        if one is not None:
            row.pop(LIST_COLUMNS.index("License"))
        if wide:
            row.append(info.study_uid if info else "")
        row.append(uid if wide else short_uid(uid))
        if origin is not None:
            row.append(origin[uid])
        rows.append([inert(c) for c in row])
    header = [*(c for c in LIST_COLUMNS if one is None or c != "License"),
              *(["Study UID"] if wide else []), "Series UID",
              *(["From"] if origin is not None else [])]
    total = ["Total", "", "", "", "", f"{images:,}", human(size)]
    total += [""] * (len(header) - len(total))
    free = {"Collection", "Patient ID", "Series Description", "From", "License"}
    naturals = [max(cell_len(text) for text in (name, *(r[i] for r in [*rows, total])))
                for i, name in enumerate(header)]
    widths = list(naturals)
    if not wide:  # the free columns share what the others leave
        loose = [i for i, name in enumerate(header) if name in free]
        # Two characters a column besides its text (the box's, the padding's: measured).
        room = console.width - sum(naturals[i] for i in range(len(header)) if i not in loose) \
            - 2 * len(header)
        for i, width in zip(loose, fit_widths([naturals[i] for i in loose], room),
                            strict=True):
            widths[i] = width
    counted = f"{title}: {len(uids):,} series" + (f" ({missing:,} n/a)" if missing else "")
    table = Table(title=cell(counted), box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True, padding=(0, 1))
    for name, width in zip(header, widths, strict=True):
        table.add_column(name, width=width, no_wrap=True, overflow="ellipsis",
                         justify="right" if name in ("Images", "Size") else "left")
    for row in rows:
        table.add_row(*(Text(c) for c in row))
    table.add_section()
    table.add_row(*(Text(c) for c in total))
    if wide:
        # Whole UIDs are for copying: never fold one, even past the terminal's edge.
        natural = Console(width=10_000).measure(table).maximum
        console = Console(width=max(console.width, natural))
    console.print(table)
    if one is not None and one[0]:
        name, url = one
        console.print(cell(f"License: {name}" + (f" ({url})" if url and url != name else "")
                           + " for every series"))


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
    """Re-check a finished download (ROOT: the folder with metadata.csv, or the -d
    folder of the download when it holds one): against its journal (every file missing,
    altered or unexpected), or with --server against the server the files came from
    (the one its journal recorded, unless --api-url or --manifest names another)."""
    from ..verify import verify_root  # the checker (and the staging code) only for verify
    from .verify_server import root_or_exit, run_server_verify

    if repair and not against_server:
        fail("--repair needs --server (it re-downloads what the server check finds)",
             EXIT_USAGE)
    folder = root_or_exit(root)  # ROOT, or the -d folder holding one root (issue 25)
    if against_server:
        run_server_verify(folder, repair=repair, manifest_path=manifest_path, api=api,
                          api_url=api_url, user=user, insecure=insecure, timeout=timeout)
        return
    try:
        result = verify_root(folder, quick=quick)
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
