"""Command-line interface: every action of the interactive view is also a command here.

A package of small modules, each imported only when its command runs (a ``download`` on
a cluster node never pays for the server stack or the interactive view):

* ``common``: exit codes, one-line errors, the API options, logging in;
* ``download_command``: ``download`` and its output modes (``live``: its terminal
  display);
* ``inspect``: ``list`` and ``verify``;
* ``tools``: ``collections``, ``search``, ``manifest merge|info``, ``merge-reports``.

Exit codes: see :mod:`.common` (0 complete, 1 failures, 2 usage, 3 login, 130 Ctrl-C).
"""

from __future__ import annotations

import importlib

import click

from .._version import __version__
from .common import EXIT_AUTH, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, fail

#: command name -> (module, attribute), imported on first use.
LAZY_COMMANDS = {
    "download": ("nbia_retriever.cli.download_command", "download"),
    "list": ("nbia_retriever.cli.inspect", "list_command"),
    "verify": ("nbia_retriever.cli.inspect", "verify"),
    "serve": ("nbia_retriever.server", "serve_command"),
    "synth": ("nbia_retriever.server.synth", "synth_command"),
    "open": ("nbia_retriever.tui", "open_command"),
    "collections": ("nbia_retriever.cli.tools", "collections_command"),
    "search": ("nbia_retriever.cli.tools", "search_command"),
    "manifest": ("nbia_retriever.cli.tools", "manifest_group"),
    "merge-reports": ("nbia_retriever.cli.tools", "merge_reports_command"),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (:data:`LAZY_COMMANDS`).

    A command module that fails to import raises its ``ImportError`` (a broken install
    must say which package is missing, not "No such command").
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[cmd_name]
            command = getattr(importlib.import_module(module), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{module}.{attr} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nbia-retriever")
def main() -> None:
    """Download DICOM series from TCIA and other NBIA servers, from a .tcia manifest."""


def __getattr__(name: str) -> click.Command:
    """``from nbia_retriever.cli import download`` works, loading only that command."""
    for command, (module, attr) in LAZY_COMMANDS.items():
        if name in (attr, command.replace("-", "_")):
            found = getattr(importlib.import_module(module), attr)
            assert isinstance(found, click.Command)
            return found
    raise AttributeError(name)


__all__ = ["EXIT_AUTH", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "fail",
           "main"]
