"""``nbia-retriever serve ARCHIVE``: the reference server from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import NbiaError
from ..ondisk import atomic_write_text
from .app import format_manifest
from .builds import BUILDS
from .faults import FaultPlan
from .gen3 import Gen3Faults
from .runner import ReferenceServer, run_server
from .s3 import S3Faults


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
@click.option("--s3-port", type=click.IntRange(min=0), default=None, metavar="PORT",
              help="Also serve the archive as Imaging Data Commons' public buckets: "
                   "anonymous, path-style S3 at the root of this second port (0 picks a "
                   "free one). Its URL is the endpoint for --idc-endpoint and s5cmd's "
                   "--endpoint-url. Restricted collections and --idc-exclude series are "
                   "left out.")
@click.option("--s3-faults", "s3_faults_spec", default=None, metavar="SPEC",
              help="S3 faults, e.g. 'latency=50ms,rate=10MB,slowdown=3,corrupt=UID:1,"
                   "missing=UID,reset=UID,truncate=UID,multipart=UID' (UID: a "
                   "SeriesInstanceUID, crdc_series_uuid or object key; see "
                   "nbia_retriever.server.s3).")
@click.option("--idc-index-out", type=click.Path(file_okay=False, path_type=Path),
              default=None, metavar="DIR",
              help="Write idc_index.parquet, collections_index.parquet and "
                   "prior_versions_index.parquet for the same IDC view to DIR (for "
                   "--idc-index).")
@click.option("--idc-version", type=click.IntRange(min=2), default=22, show_default=True,
              help="The IDC release the index files describe.")
@click.option("--idc-revised", multiple=True, metavar="UID",
              help="Give this series an older version too (prior_versions_index, served "
                   "under its own crdc_series_uuid). Repeatable.")
@click.option("--idc-exclude", multiple=True, metavar="UID",
              help="Leave this series out of IDC (it then comes from NBIA). Repeatable.")
@click.option("--gen3-port", type=click.IntRange(min=0), default=None, metavar="PORT",
              help="Also serve the archive as the CRDC's Gen3 does (Fence tokens, signed "
                   "URLs, GA4GH DRS) on this port (0 picks a free one), with its signed-URL "
                   "host and a PathDB on two more free ports: series zips "
                   "(<SeriesInstanceUID>.zip), reports and pathology slides. Its URL is "
                   "the --gen3-endpoint.")
@click.option("--gen3-faults", "gen3_faults_spec", default=None, metavar="SPEC",
              help="Gen3/PathDB faults, e.g. 'token_ttl=60,token_uses=3,url_uses=1,"
                   "drop_after=1000000:2,wrong_byte=dg.4DFC/UUID,ignore_range,"
                   "forbidden=ID,missing=ID,no_drs,rate=80mbit,first_byte_delay=50ms,"
                   "latency=100ms,etag=off' (see nbia_retriever.server.gen3).")
@click.option("--gen3-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR",
              help="Write credentials.json (for --auth), drs-manifest.csv and "
                   "pathdb-manifest.csv for the Gen3 and PathDB servers to DIR.")
def serve_command(archive: Path, host: str, port: int, faults_spec: str | None, seed: int,
                  token_lifetime: float | None, build: str, stored: bool,
                  s3_port: int | None, s3_faults_spec: str | None,
                  idc_index_out: Path | None, idc_version: int,
                  idc_revised: tuple[str, ...], idc_exclude: tuple[str, ...],
                  gen3_port: int | None, gen3_faults_spec: str | None,
                  gen3_out: Path | None) -> None:
    """Serve ARCHIVE (a folder of DICOM files, one sub-folder per collection) as an NBIA
    server: the v1, v2 and v4 REST API, OAuth tokens and streamed series zips; with
    --s3-port, also as IDC's S3 buckets; with --gen3-port, also as CRDC's Gen3 and
    PathDB."""
    try:
        plan = FaultPlan.parse(faults_spec, seed=seed) if faults_spec else None
    except NbiaError as exc:
        raise click.BadParameter(str(exc), param_hint="--faults") from None
    try:
        s3_plan = S3Faults.parse(s3_faults_spec)
    except NbiaError as exc:
        raise click.BadParameter(str(exc), param_hint="--s3-faults") from None
    try:
        gen3_plan = Gen3Faults.parse(gen3_faults_spec)
    except NbiaError as exc:
        raise click.BadParameter(str(exc), param_hint="--gen3-faults") from None
    if gen3_out is not None and gen3_port is None:
        raise click.BadParameter("needs --gen3-port", param_hint="--gen3-out")

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
        if server.s3 is not None:
            view = server.s3.view
            click.echo(f"S3:       {server.s3.url}  (IDC v{view.version}: "
                       f"{len(view.current)} series, {len(view.prior)} prior versions, "
                       f"{len(view.objects)} objects; anonymous, path-style)")
            click.echo(f"S3 faults: {s3_plan.describe()}")
        if server.gen3 is not None:
            gen3 = server.gen3
            click.echo(f"Gen3:     {gen3.url}  (Fence + GA4GH DRS: {len(gen3.objects)} "
                       f"objects; signed URLs on {gen3.files_url})")
            click.echo(f"PathDB:   {gen3.pathdb_url}  ({len(gen3.slides)} slides)")
            click.echo(f"Gen3 faults: {gen3_plan.describe()}")
            if server.gen3_out is not None:
                click.echo(f"Gen3 files: {server.gen3_out}  (credentials.json for --auth, "
                           "drs-manifest.csv, pathdb-manifest.csv)")
        if server.idc_index is not None:
            click.echo(f"IDC index: {server.idc_index}  (use with --idc-index)")
        click.echo("Press Ctrl+C to stop.")

    try:
        run_server(archive, host, port, faults_spec, seed, token_lifetime=token_lifetime,
                   build=build, stored=stored, s3_port=s3_port,
                   s3_faults_spec=s3_faults_spec, idc_index_out=idc_index_out,
                   idc_version=idc_version, idc_revised=idc_revised,
                   idc_exclude=idc_exclude, gen3_port=gen3_port,
                   gen3_faults_spec=gen3_faults_spec, gen3_out=gen3_out, on_ready=ready)
    except NbiaError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                                   ) from None
