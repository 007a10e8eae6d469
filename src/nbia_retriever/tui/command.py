"""``nbia-retriever open MANIFEST``: the click command that starts the window."""

from __future__ import annotations

import os
import sys
from typing import Any
from urllib.parse import urlsplit

import click
from click.core import ParameterSource

from ..api import Credentials
from ..api import stored_password as lookup_password
from ..cli.common import (
    EXIT_USAGE,
    check_api_url,
    fail,
    fail_for,
    inert,
    load_manifest,
    warn_insecure,
    with_api_options,
)
from ..cli.options import download_flags, options_from_params
from ..engine.options import DownloadOptions
from ..errors import UsageError
from ..session import session_for
from .app import RetrieverApp


def stored_password(host: str, user: str) -> str | None:
    """NBIA_PASSWORD or the keyring entry for (host, user); ``None`` means "ask in the
    window".

    Never from argv (visible to every user of a shared node through ``ps``) and never a
    terminal prompt: the window has its own masked password field.
    """
    return lookup_password(host, user)


@click.command("open")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("-d", "--dest", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Destination folder (changeable in the window).")
@download_flags("open")
@with_api_options
@click.option("--web", is_flag=True,
              help="Serve the window to a browser instead, one window per page "
                   "(pip install 'nbia-retriever[web]').")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="With --web: address to listen on. Beyond loopback, whoever has the "
                   "printed address can use the window, its downloads and login.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="With --web: TCP port.")
@click.option("--public-url", metavar="URL",
              help="With --web: the address browsers use, behind a reverse proxy "
                   "(default: the one they opened).")
@click.pass_context
def open_command(ctx: click.Context, /, manifest: str, dest: str, user: str | None, web: bool,
                 host: str, port: int, public_url: str | None, **flags: Any) -> None:
    """Open MANIFEST in the interactive downloads window (any terminal, SSH, or a browser
    with --web): choose rows and destination, then Start, Pause, Resume."""
    web_only = [f"--{name.replace('_', '-')}" for name in ("host", "port", "public_url")
                if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if web_only and not web:
        fail(f"{', '.join(web_only)}: only with --web", EXIT_USAGE)
    parsed = load_manifest(manifest)
    values = options_from_params(flags)  # the same options as ``download``, same defaults
    check_api_url(values["api_url"])
    try:
        options = DownloadOptions(**values)
        session = session_for(parsed, options)  # the window's one session
    except UsageError as exc:
        fail_for(exc)
    warn_insecure(not options.verify_tls)
    if web:
        serve_web(manifest, host=host, port=port, public_url=public_url,
                  host_given=ctx.get_parameter_source("host") is ParameterSource.COMMANDLINE,
                  dest=dest, options=options, user=user)
        return
    ask_login = None
    if user:
        password = stored_password(session.host, user)
        if password is None:
            ask_login = user
        else:
            options.credentials = session.credentials = Credentials(user, password)
    app = RetrieverApp(parsed, dest, options, manifest_name=os.path.basename(manifest),
                       ask_login=ask_login, session=session)
    app.run()
    if app.ending:  # a download ran: its summary, folder and resume command, as download's
        click.echo(inert(app.ending))
    if app.return_code:
        sys.exit(app.return_code)


def serve_web(manifest: str, *, host: str, port: int, public_url: str | None,
              host_given: bool, dest: str, options: DownloadOptions, user: str | None) -> None:
    """``open --web``: textual-serve runs the plain ``open`` (same manifest, destination
    and options; the user name, never a password) for each browser session."""
    try:  # here: textual-serve is an extra, and only --web needs it
        from .web import WebServer, child_argv, is_loopback, shell_command
    except ImportError:
        fail("--web needs textual-serve: pip install 'nbia-retriever[web]'", EXIT_USAGE)
    if public_url is not None:
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            fail("--public-url must be an http:// or https:// address", EXIT_USAGE)
    if not is_loopback(host):
        if not host_given:
            fail(f"not serving on {host} unless --host names it on the command line",
                 EXIT_USAGE)
        click.echo(f"warning: listening on {host}: whoever has the printed address can start "
                   "downloads, change the destination and use the login", err=True)
    argv = child_argv(manifest, dest=dest, options=options, user=user)
    title = f"{RetrieverApp.TITLE} \N{EM DASH} {os.path.basename(manifest)}"
    server = WebServer(shell_command(argv), host=host, port=port, title=title,
                       public_url=public_url)
    try:
        server.serve()
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_USAGE)
