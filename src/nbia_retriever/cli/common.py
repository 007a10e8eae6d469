"""What every command shares: exit codes, one-line errors, the API options, logging in.

Exit codes (stable, for scripts and job schedulers): 0 every series complete, 1 some
series failed (or the run stopped), 2 bad usage or an unreadable manifest, 3 login
failed or not allowed, 130 interrupted (Ctrl-C; re-run the same command to resume).
"""

from __future__ import annotations

import csv
import json
import sys
from typing import Any, NoReturn

import click

from ..untrusted import plain, redact

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def inert(text: str) -> str:
    """The one sanitiser of everything printed: messages quote servers (zip entry names,
    error pages), manifests and journals of shared folders; no control character (no
    terminal escape) and no known secret, nor a piece of one, reaches the terminal.
    Line breaks stay (multi-line summaries); each line is plain before it is redacted,
    so a character that ``plain`` drops cannot hide a secret from ``redact``."""
    return "\n".join(redact(plain(line)) for line in text.split("\n"))


def say(text: str, *, err: bool = False) -> None:
    """Print ``text`` through :func:`inert`: how every command prints anything that may
    hold a server's, a manifest's or a journal's text."""
    click.echo(inert(text), err=err)


def cell(text: str) -> Any:
    """A table cell through :func:`inert`, shown verbatim (a ``rich`` Text: server
    strings are never console markup)."""
    from rich.text import Text

    return Text(inert(text))


def _inert_values(data: Any) -> Any:
    if isinstance(data, str):
        return inert(data)
    if isinstance(data, dict):
        return {k: _inert_values(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_inert_values(v) for v in data]
    return data


def say_json(data: Any) -> None:
    """One JSON line, every string in it through :func:`inert` (JSON escapes C0 controls
    but neither C1 ones nor bidirectional overrides, and a log is read on a terminal)."""
    click.echo(json.dumps(_inert_values(data), ensure_ascii=False))


def fail(message: str, code: int, *, as_json: bool = False) -> NoReturn:
    """One clear line on stderr (and one ``error`` event with ``--json``) and a meaningful
    exit code: never a traceback."""
    line = inert(message).replace("\n", " ")
    if as_json:
        sys.stdout.write(json.dumps({"event": "error", "message": line, "exit": code},
                                    ensure_ascii=False) + "\n")
        sys.stdout.flush()
    click.echo(f"nbia-retriever: error: {line}", err=True)
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


def load_manifest(path: str, *, as_json: bool = False) -> Any:
    """The parsed manifest, or exit 2 with one line naming the file (and line)."""
    from pathlib import Path

    from ..errors import ManifestError
    from ..manifest import read_manifest

    if Path(path).is_dir():
        fail(f"{path}: is a folder, not a manifest", EXIT_USAGE, as_json=as_json)
    try:
        return read_manifest(path)
    except ManifestError as exc:
        fail(str(exc), EXIT_USAGE, as_json=as_json)
    except OSError as exc:
        fail(f"{path}: {exc.strerror or exc}", EXIT_USAGE, as_json=as_json)
    except (ValueError, csv.Error) as exc:
        # The parser's contract is ManifestError only; a slip must still not be a traceback.
        fail(f"{path}: cannot read this manifest ({exc})", EXIT_USAGE, as_json=as_json)


def check_api_url(url: str | None, *, as_json: bool = False) -> None:
    """A malformed ``--api-url`` (``ftp://``, no host, bad port) is exit 2, at once."""
    if not url:
        return
    from ..errors import NbiaError
    from ..manifest import api_base_from_download_url

    try:
        api_base_from_download_url(url)
    except NbiaError as exc:
        fail(str(exc).replace("download server URL", "--api-url"), EXIT_USAGE, as_json=as_json)


def host_of(api_url: str) -> str:
    from ..api import Origin

    return Origin.of(api_url).label  # ASCII (xn--) form, IPv6 in brackets


def get_credentials(user: str | None, host: str, *, interactive: bool = True) -> Any:
    """The password from NBIA_PASSWORD, the keyring entry for (host, user), or a hidden
    prompt that names the host.

    The password never comes from argv: command lines are visible to every user of a
    shared HPC node through ``ps``.
    """
    from ..api import Credentials, keyring_service, stored_password

    if not user:
        return None
    password = stored_password(host, user)
    if password is None:
        if interactive and sys.stdin.isatty():
            password = click.prompt(f"Password for {user} at {host}", hide_input=True,
                                    default="", show_default=False, err=True)
        else:
            fail(f"no password for {user!r} at {host}: set NBIA_PASSWORD or store it in the "
                 f"keyring (keyring set {keyring_service(host)} {user})", EXIT_AUTH)
    return Credentials(user, password or "")


def confirm_host_prompt(interactive: bool) -> Any:
    """A callback that asks, naming the host, before a password goes to a host only the
    manifest names; None (the answer is no) when nobody can be asked."""
    if not (interactive and sys.stdin.isatty()):
        return None

    def confirm(host: str) -> bool:
        return bool(click.confirm(
            f"The manifest names the server {host}, which you have not chosen. Send your "
            f"password to {host}?", default=False, err=True))

    return confirm


def warn_insecure(insecure: bool) -> None:
    if insecure:
        click.echo("nbia-retriever: warning: --insecure: TLS certificates are NOT verified; "
                   "anyone on the way can pose as the server", err=True)


def with_api_options(func: Any) -> Any:
    """``--api``, ``--api-url``, ``--user``, ``--insecure``, ``--timeout``, declared once
    with the download options (:mod:`.options`)."""
    # Imported here: ``nbia-retriever --help`` loads this module, not the options.
    from .options import connection_flags

    return connection_flags(func)


def human(size: int | None) -> str:
    from ..report import human_size

    return human_size(size)
