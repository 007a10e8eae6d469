"""Command-line interface: every action of the interactive view is also a command here.

Exit codes (stable, for scripts and job schedulers): 0 every series complete, 1 some
series failed (or the run stopped), 2 bad usage or an unreadable manifest, 3 login
failed, 130 interrupted (Ctrl-C; re-run the same command to resume).
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from . import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

#: Subcommands are imported on first use so that `download` never pays for the server
#: stack (aiohttp) or the interactive view (Textual).
LAZY_COMMANDS = {
    "serve": ("nbia_retriever.server", "serve_command"),
    "synth": ("nbia_retriever.synth", "synth_command"),
    "open": ("nbia_retriever.tui", "open_command"),
    "collections": ("nbia_retriever.cli_tools", "collections_command"),
    "search": ("nbia_retriever.cli_tools", "search_command"),
    "manifest": ("nbia_retriever.cli_tools", "manifest_group"),
    "merge-reports": ("nbia_retriever.cli_tools", "merge_reports_command"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[cmd_name]
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                return None
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nbia-retriever")
def main() -> None:
    """Download DICOM series from TCIA and other NBIA servers, from a .tcia manifest."""


def fail(message: str, code: int) -> None:
    """One clear line on stderr and a meaningful exit code: never a traceback."""
    click.echo(f"nbia-retriever: error: {message}", err=True)
    sys.exit(code)


def parse_shard(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        k_text, n_text = value.split("/", 1)
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise click.BadParameter("use K/N, e.g. 3/10") from None
    if not (n >= 1 and 1 <= k <= n):
        raise click.BadParameter("K must be between 1 and N")
    return k, n


def get_credentials(user: str | None, *, interactive: bool = True) -> Any:
    """The password from NBIA_PASSWORD, the system keyring, or a hidden prompt.

    The password never comes from argv: command lines are visible to every user of a
    shared HPC node through ``ps``.
    """
    from .api import Credentials

    if not user:
        return None
    password = os.environ.get("NBIA_PASSWORD")
    if password is None:
        try:
            import keyring

            password = keyring.get_password("nbia-retriever", user)
        except Exception:
            password = None
    if password is None:
        if interactive and sys.stdin.isatty():
            password = click.prompt(f"Password for {user}", hide_input=True, default="",
                                    show_default=False)
        else:
            fail(f"no password for {user!r}: set NBIA_PASSWORD or store it in the keyring "
                 "(keyring set nbia-retriever USER)", EXIT_AUTH)
    return Credentials(user, password or "")


def load_manifest(path: str) -> Any:
    from .errors import ManifestError
    from .manifest import read_manifest

    try:
        return read_manifest(path)
    except ManifestError as exc:
        fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        fail(f"{path}: {exc.strerror or exc}", EXIT_USAGE)
    except (ValueError, csv.Error) as exc:
        # The parser's contract is ManifestError only; a slip must still not be a traceback.
        fail(f"{path}: cannot read this manifest ({_inert(str(exc))})", EXIT_USAGE)


api_options = [
    click.option("--api", "api", type=click.Choice(["auto", "v1", "v2", "v4"]), default="auto",
                 show_default=True, help="API version (auto: v4, v1 if absent, v2 if logged in)."),
    click.option("--api-url", metavar="URL",
                 help="Services root, e.g. http://127.0.0.1:8080/nbia-api/services "
                      "(default: from the manifest's downloadServerUrl)."),
    click.option("--user", metavar="NAME",
                 help="Log in for limited-access collections (password: NBIA_PASSWORD, "
                      "keyring, or prompt)."),
    click.option("--insecure", is_flag=True, help="Do not verify TLS certificates (unsafe)."),
    click.option("--timeout", type=float, default=60.0, show_default=True,
                 help="Seconds without data before an attempt fails."),
]


def with_api_options(func: Any) -> Any:
    for option in reversed(api_options):
        func = option(func)
    return func


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("-d", "--dest", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Destination folder; the download goes into a folder named after the "
                   "manifest's databasketId.")
@click.option("-w", "--workers", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Series downloaded at once.")
@click.option("--max-connections", type=click.IntRange(1, 64), default=None,
              help="Cap on concurrent series streams; concurrency also halves by itself "
                   "when the server answers 429/503 and recovers after.")
@click.option("--retries", type=click.IntRange(0, 100), default=None,
              help="Retries per series (default: the manifest's noOfrRetry, else 4).")
@click.option("--layout", type=click.Choice(["descriptive", "classic"]), default="descriptive",
              show_default=True, help="Folder layout below Collection/Patient.")
@click.option("--no-md5", is_flag=True, help="Do not ask for or check MD5 hashes.")
@click.option("--only-failed", is_flag=True,
              help="Retry only the series that failed in an earlier run.")
@click.option("--error-report", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the failed series (table columns + error) to this CSV.")
@click.option("--shard", metavar="K/N", help="Download only part K of N (cluster job arrays).")
@click.option("-q", "--quiet", is_flag=True, help="No progress display; errors and summary only.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line on stdout.")
@click.option("--backoff", type=float, default=2.0, show_default=True, hidden=True,
              help="Base of the exponential retry backoff, seconds.")
@with_api_options
def download(manifest: str, dest: str, workers: int, max_connections: int | None,
             retries: int | None, layout: str,
             no_md5: bool, only_failed: bool, error_report: str | None, shard: str | None,
             quiet: bool, as_json: bool, backoff: float, api: str, api_url: str | None,
             user: str | None, insecure: bool, timeout: float) -> None:
    """Download every series of MANIFEST (a .tcia file, spreadsheet or list of UIDs).

    Re-running the same command resumes: finished series are skipped in milliseconds.
    """
    from .engine import DownloadOptions, Engine
    from .report import write_error_report

    parsed = load_manifest(manifest)
    if error_report:
        # Find out now, not after a day of downloading, that the report cannot be written.
        folder = Path(error_report).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            fail(f"--error-report {error_report}: folder {folder} is missing or not writable",
                 EXIT_USAGE)
    options = DownloadOptions(
        workers=workers, retries=retries, timeout=timeout, api=api, api_url=api_url,
        layout=layout, md5=not no_md5, only_failed=only_failed,
        credentials=get_credentials(user, interactive=not as_json), verify_tls=not insecure,
        backoff_base=backoff, shard=parse_shard(shard), max_connections=max_connections,
    )
    engine = Engine(parsed, dest, options)
    if parsed.duplicates_dropped and not as_json:
        click.echo(f"note: {parsed.duplicates_dropped} duplicate series dropped from {manifest}",
                   err=True)
    if as_json:
        lock = threading.Lock()

        def emit(event: Any) -> None:
            line = json.dumps(event.as_dict(), ensure_ascii=False)
            with lock:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()

        engine.subscribe(emit)
        report = _run_plain(engine)
    elif quiet or not sys.stderr.isatty():
        if not quiet:
            engine.subscribe(_plain_printer())
        report = _run_plain(engine)
    else:
        from ._progress import run_with_progress

        report = run_with_progress(engine)
    if error_report:
        try:
            n = write_error_report(Path(error_report), report.results.values())
        except OSError as exc:
            n = 0
            click.echo(f"nbia-retriever: error: cannot write {error_report}: "
                       f"{exc.strerror or exc}", err=True)
        if n and not as_json:
            click.echo(f"error report: {n} failed series written to {error_report}", err=True)
    if as_json:
        sys.stdout.write(json.dumps({"event": "summary", **_summary_dict(report)}) + "\n")
    else:
        click.echo(_inert(report.summary()), err=quiet)
    if report.auth_failed:
        sys.exit(EXIT_AUTH)
    if report.cancelled and not report.fatal:
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_OK if report.ok else EXIT_FAILED)


def _summary_dict(report: Any) -> dict[str, Any]:
    from .models import SeriesState

    return {
        "root": str(report.root),
        "series": len(report.results),
        "complete": report.count(SeriesState.COMPLETE),
        "failed": len(report.failed),
        "skipped": report.skipped,
        "bytes": report.bytes_downloaded,
        "elapsed": round(report.elapsed, 3),
        "fatal": report.fatal,
        "failures": [{"uid": r.uid, "state": r.state, "error": r.error} for r in report.failed],
    }


def _plain_printer() -> Any:
    """Line-per-event output for logs and non-terminals (HPC batch jobs)."""
    from .models import SeriesState

    def printer(event: Any) -> None:
        if event.kind == "state" and event.state in SeriesState.FINAL:
            extra = f": {event.message}" if event.message else ""
            click.echo(_inert(f"{event.state:<14} {event.uid}{extra}"), err=True)
        elif event.kind == "retry":
            click.echo(_inert(f"{'Retrying':<14} {event.uid} (attempt {event.attempt}: "
                              f"{event.message})"), err=True)
        elif event.kind in ("planned", "throttle"):
            click.echo(_inert(event.message), err=True)

    return printer


def _inert(text: str) -> str:
    """Messages quote servers (zip entry names, error pages): escape control characters
    so that none of them can drive the user's terminal."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def _run_plain(engine: Any) -> Any:
    engine.start()
    try:
        while not engine.finished:
            engine.wait(0.5)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, _exit_at_once)
        click.echo("interrupted: stopping (re-run the same command to resume)", err=True)
        engine.cancel()
        engine.wait()
    return engine.report


def _exit_at_once(signum: int, frame: object) -> None:
    """An impatient second Ctrl-C: stop now, still with exit code 130 and no traceback.

    Safe: nothing is published before it is verified and journaled, and a re-run clears
    whatever staging the workers leave. ``os._exit`` skips joining them.
    """
    os.write(2, b"interrupted again: stopped at once (re-run the same command to resume)\n")
    os._exit(EXIT_INTERRUPTED)


@main.command("list")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="JSON records instead of a table.")
@with_api_options
def list_command(manifest: str, as_json: bool, api: str, api_url: str | None, user: str | None,
                 insecure: bool, timeout: float) -> None:
    """Show the downloads table of MANIFEST (with totals) without downloading."""
    from dataclasses import asdict

    from .api import NbiaClient
    from .errors import AuthError, NbiaError
    from .manifest import api_base_from_download_url

    parsed = load_manifest(manifest)
    url = api_url or (api_base_from_download_url(parsed.download_server_url)
                      if parsed.download_server_url else None)
    kwargs: dict[str, Any] = {"version": api, "credentials": get_credentials(user),
                              "timeout": timeout, "verify": not insecure}
    try:
        with (NbiaClient(url, **kwargs) if url else NbiaClient(**kwargs)) as client:
            infos = client.series_metadata(list(parsed.series_uids))
    except AuthError as exc:
        fail(str(exc), EXIT_AUTH)
    except NbiaError as exc:
        fail(str(exc), EXIT_FAILED)
    if as_json:
        for uid in parsed.series_uids:
            info = infos.get(uid)
            record = asdict(info) if info else {"series_uid": uid, "status": "Not available"}
            click.echo(json.dumps(record, ensure_ascii=False, default=dict))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{Path(manifest).name}: {len(parsed.series_uids)} series")
    for column in ("Collection", "Patient ID", "Study Instance UID", "Series Instance UID"):
        table.add_column(column, overflow="fold")
    table.add_column("Images", justify="right")
    table.add_column("Size", justify="right")
    images = size = 0
    for uid in parsed.series_uids:
        info = infos.get(uid)
        if info is None:
            table.add_row("", "", "", uid, "", "not available")
            continue
        images += info.image_count or 0
        size += info.file_size or 0
        table.add_row(info.collection, info.patient_id, info.study_uid, uid,
                      str(info.image_count or ""), _human(info.file_size))
    table.add_section()
    missing = len(parsed.series_uids) - len(infos)
    table.add_row("Total", "", "", f"{len(infos)} series"
                  + (f" ({missing} not available)" if missing else ""),
                  f"{images:,}", _human(size))
    Console().print(table)


def _human(size: int | None) -> str:
    from .report import human_size

    return human_size(size)


@main.command()
@click.argument("root", type=click.Path(file_okay=False, exists=True))
@click.option("--quick", is_flag=True, help="Check presence and sizes only, not MD5 hashes.")
def verify(root: str, quick: bool) -> None:
    """Re-check a finished download (ROOT: the folder with metadata.csv) against its
    journal; report every file missing, altered or unexpected."""
    import sqlite3

    from .verify import verify_root

    try:
        result = verify_root(Path(root), quick=quick)
    except FileNotFoundError as exc:
        fail(str(exc), EXIT_USAGE)
    except sqlite3.Error as exc:
        fail(f"{root}: cannot read the download journal: {exc}", EXIT_FAILED)
    except OSError as exc:
        fail(f"{root}: {exc.strerror or exc}", EXIT_FAILED)
    for problem in result.problems:
        click.echo(problem)
    click.echo(result.summary())
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)


if __name__ == "__main__":  # pragma: no cover
    main()
