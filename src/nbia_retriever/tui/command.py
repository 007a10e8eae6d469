"""``nbia-retriever open MANIFEST``: the click command that starts the window."""

from __future__ import annotations

import os

import click


def stored_password(host: str, user: str) -> str | None:
    """NBIA_PASSWORD or the keyring entry for (host, user); ``None`` means "ask in the
    window".

    Never from argv (visible to every user of a shared node through ``ps``) and never a
    terminal prompt: the window has its own masked password field.
    """
    from ..api import stored_password as lookup

    return lookup(host, user)


@click.command("open")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("-d", "--dest", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Destination folder (changeable in the window).")
@click.option("--api", type=click.Choice(["auto", "v1", "v2", "v4"]), default="auto",
              show_default=True, help="API version.")
@click.option("--api-url", metavar="URL",
              help="Services root (default: from the manifest's downloadServerUrl).")
@click.option("--user", metavar="NAME",
              help="Log in for limited-access collections (password: NBIA_PASSWORD, keyring, "
                   "or the window's login dialog).")
@click.option("-w", "--workers", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Series downloaded at once.")
@click.option("--layout", type=click.Choice(["descriptive", "classic"]), default="descriptive",
              show_default=True, help="Folder layout below Collection/Patient.")
def open_command(manifest: str, dest: str, api: str, api_url: str | None, user: str | None,
                 workers: int, layout: str) -> None:
    """Open MANIFEST in the interactive downloads window (any terminal, SSH, or a browser
    through textual-serve): choose rows and destination, then Start, Pause, Resume."""
    from ..api import Credentials
    from ..cli.common import EXIT_USAGE, check_api_url, fail, host_of, load_manifest
    from ..engine import DownloadOptions
    from ..engine.run import resolve_api_url
    from ..errors import UsageError
    from .app import RetrieverApp

    parsed = load_manifest(manifest)
    check_api_url(api_url)
    try:
        server = resolve_api_url(parsed, api_url)
    except UsageError as exc:
        fail(str(exc), EXIT_USAGE)
    credentials = None
    ask_login = None
    if user:
        password = stored_password(host_of(server), user)
        if password is None:
            ask_login = user
        else:
            credentials = Credentials(user, password)
    options = DownloadOptions(workers=workers, api=api, api_url=api_url, layout=layout,
                              credentials=credentials)
    app = RetrieverApp(parsed, dest, options, manifest_name=os.path.basename(manifest),
                       ask_login=ask_login)
    app.run()
