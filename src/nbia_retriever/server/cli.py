"""``nbia-retriever serve ARCHIVE``: the reference server from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import NbiaError
from ..ondisk import atomic_write_text
from .app import format_manifest
from .builds import BUILDS
from .faults import FaultPlan
from .runner import ReferenceServer, run_server


@click.command("serve")
@click.argument("archive", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (keep 127.0.0.1 unless you mean to share it).")
@click.option("--port", default=8080, show_default=True, type=int,
              help="TCP port; 0 picks a free one.")
@click.option("--faults", "faults_spec", default=None, metavar="SPEC",
              help="Fault injection, e.g. 'reset=0.2,short=0.1,http429=0.1:2,stall=0.05:3,"
                   "bandwidth=10mbit,max_per_series=2' (see nbia_retriever.server.faults).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed for faults and for the image order inside zips.")
@click.option("--token-lifetime", default=None, type=float, metavar="S",
              help="Access-token lifetime in seconds (default: archive config, else 7200).")
@click.option("--build", type=click.Choice(list(BUILDS)), default="current",
              show_default=True,
              help="Which NBIA server build to play (v4 columns, IncludeMD5, no v4 at all; "
                   "see nbia_retriever.server.builds).")
@click.option("--zip-stored", "stored", is_flag=True,
              help="Send images as STORED zip entries (sizes in the header) instead of "
                   "DEFLATED ones with data descriptors.")
def serve_command(archive: Path, host: str, port: int, faults_spec: str | None, seed: int,
                  token_lifetime: float | None, build: str, stored: bool) -> None:
    """Serve ARCHIVE (a folder of DICOM files, one sub-folder per collection) as an NBIA
    server: the v1, v2 and v4 REST API, OAuth tokens and streamed series zips."""
    try:
        plan = FaultPlan.parse(faults_spec, seed=seed) if faults_spec else None
    except NbiaError as exc:
        raise click.BadParameter(str(exc), param_hint="--faults") from None

    def ready(server: ReferenceServer) -> None:
        index = server.index
        images = sum(s.image_count for s in index.series.values())
        manifest: Path | None = index.cache_dir / "manifest-reference-server.tcia"
        public = sorted(uid for uid, s in index.series.items()
                        if not server.config.is_restricted(s.collection))
        try:  # a new file renamed into place: a link planted there is replaced, not followed
            atomic_write_text(manifest, format_manifest(server.download_url, public))  # type: ignore[arg-type]
        except OSError:
            manifest = None
        click.echo(f"Serving {archive}: {len(index.collections)} collections, "
                   f"{len(index.series)} series, {images} images")
        if index.skipped:
            click.echo(f"Skipped {len(index.skipped)} unreadable .dcm files "
                       f"(first: {index.skipped[0]})")
        api = "v1, v2 with a token" + (", v4" if server.service.build.has_v4 else "")
        click.echo(f"API:      {server.api_url}  ({api}; build {build})")
        click.echo(f"Manifest: {server.manifest_url}  (every public series)")
        if manifest is not None:
            click.echo(f"          also written to {manifest}")
        click.echo(f"Faults:   {plan.describe() if plan else 'none'}")
        click.echo("Press Ctrl+C to stop.")

    try:
        run_server(archive, host, port, faults_spec, seed, token_lifetime=token_lifetime,
                   build=build, stored=stored, on_ready=ready)
    except NbiaError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                                   ) from None
