"""Command-line interface: every action of the interactive view is also a command here."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nbia-retriever")
def main() -> None:
    """Download DICOM series from TCIA and other NBIA servers, from a .tcia manifest."""
