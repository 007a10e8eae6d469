"""A sheet that names series, DRS objects and PathDB slides, end to end (issue 24): the CLI
against the reference NBIA server and our Gen3/PathDB servers (``tests/gen3_fixtures.py``)
over real HTTP on 127.0.0.1.

What must hold: one run, one tree; a DRS series zip lands in the very folder, with the very
files, an NBIA download of that series gives; files land in ``Collection/Patient/<name>``
with a ``files.csv`` row; controlled rows wait for the data use policy (headless: Not
Authorized, naming ``--accept-data-policy``); a sheet of files only never asks an NBIA
server anything; ``list`` says where each row comes from.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.gen3 import Gen3Server
from reliability_helpers import run_cli, tree

if TYPE_CHECKING:
    from gen3_fixtures import Gen3Archive


#: The CSVs hold the time of each download: compared by their rows, not their bytes.
TIMED = ("metadata.csv", "files.csv")


def mixed_sheet(path: Path, archive: Gen3Archive, gen3: Gen3Server,
                series: list[str]) -> Path:
    """A CSV with a Series UID column and a drs_uri column: plain series rows (NBIA), the
    DRS objects (series zips and reports) and the PathDB slides (imageUrl column)."""
    host = gen3.url.split("://", 1)[1]
    rows = [["Series UID", "drs_uri", "imageUrl", "name", "collection", "patient_id",
             "file_size_bytes"]]
    rows += [[uid, "", "", "", "", "", ""] for uid in series]
    for obj in archive.objects:
        rows.append(["", f"drs://{host}/{obj.object_id}", "", obj.name, obj.collection,
                     obj.patient_id, str(obj.size)])
    for slide in archive.slides:
        url = f"{gen3.pathdb_url}/system/files/{slide.url_path}"
        rows.append(["", "", url, slide.name, slide.collection, slide.patient_id, ""])
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


def test_one_run_one_tree_and_drs_series_equal_nbia_series(
        tmp_path: Path, gen3_archive: Gen3Archive, gen3_serve: Callable[..., Gen3Server],
        serve: object) -> None:
    nbia: ReferenceServer = serve(gen3_archive.summary.root)  # type: ignore[operator]
    public = {s.series_uid for s in gen3_archive.summary.series if not s.restricted}
    # One public series stays a plain row (NBIA); Gen3 holds the other objects.
    left_out = next(o for o in gen3_archive.zips if o.name.removesuffix(".zip") in public)
    plain = [left_out.name.removesuffix(".zip")]
    objects = tuple(o for o in gen3_archive.objects if o is not left_out)
    gen3_server = gen3_serve(objects=objects)
    gen3_creds = gen3_server.write_credentials(tmp_path / "credentials.json")
    archive = dataclasses.replace(gen3_archive, objects=objects)
    zipped = {o.name.removesuffix(".zip") for o in archive.zips}
    sheet = mixed_sheet(tmp_path / "mixed.csv", archive, gen3_server, plain)

    done = run_cli(["download", str(sheet), "-d", str(tmp_path / "out"), "--api-url",
                    nbia.api_url, "--auth", str(gen3_creds), "--gen3-endpoint",
                    gen3_server.url, "--accept-data-policy", "--source", "nbia"])
    assert done.returncode == 0, done.stdout + done.stderr
    root = tmp_path / "out" / "mixed"
    got = tree(root, skip=TIMED)

    # Files: Collection/Patient/<name>, byte-identical, one files.csv row each.
    for item in [*archive.files, *archive.slides]:
        rel = f"{item.collection}/{item.patient_id}/{item.name}"
        assert got.get(rel) == item.path.read_bytes(), rel
    with (root / "files.csv").open(newline="", encoding="utf-8") as handle:
        listed = {row["File Name"] for row in csv.DictReader(handle)}
    assert listed == {i.name for i in [*gen3_archive.files, *gen3_archive.slides]}

    # The DRS series zips: the same folders and bytes as NBIA's download of them.
    manifest = tmp_path / "zipped.txt"
    manifest.write_text("\n".join(sorted(zipped & public)) + "\n", encoding="utf-8")
    again = run_cli(["download", str(manifest), "-d", str(tmp_path / "nb"), "--api-url",
                     nbia.api_url, "--source", "nbia", "--agree-to-license"])
    assert again.returncode == 0, again.stdout + again.stderr
    expected = {rel: data for rel, data in tree(tmp_path / "nb" / "zipped", skip=TIMED).items()
                if rel.count("/") == 4}  # the series' images
    assert expected
    assert {rel: got.get(rel) for rel in expected} == expected

    # The plain series row came from NBIA, into the same root.
    assert any(plain[0][-5:] in rel for rel in got)
    # The log names a file as people know it (then its key); a series by its UID.
    report = next(o for o in archive.files)
    assert f"Complete       {report.collection} \u00b7 {report.patient_id} \u00b7 " \
        f"{report.name} (drs://" in done.stderr, done.stderr
    assert f"Complete       {plain[0]}" in done.stderr


def test_controlled_rows_wait_for_the_data_use_policy(
        tmp_path: Path, gen3_archive: Gen3Archive, gen3_server: Gen3Server,
        gen3_creds: Path) -> None:
    sheet = mixed_sheet(tmp_path / "drs.csv", gen3_archive, gen3_server, [])
    env = {"NBIA_RETRIEVER_CONFIG": str(tmp_path / "config.toml")}  # no earlier answers
    done = run_cli(["download", str(sheet), "-d", str(tmp_path / "out"), "--auth",
                    str(gen3_creds), "--gen3-endpoint", gen3_server.url], env=env)
    text = done.stdout + done.stderr
    assert "--accept-data-policy" in text, text
    assert gen3_server.token_requests == 0 or not any(
        "/user/data/download/" in r.path for r in gen3_server.requests), text
    # The public PathDB slides are not controlled: they came anyway.
    root = tmp_path / "out" / "drs"
    for slide in gen3_archive.slides:
        assert (root / slide.collection / slide.patient_id / slide.name).is_file()
    for obj in gen3_archive.files:
        assert not (root / obj.collection / obj.patient_id / obj.name).exists()


def test_a_sheet_of_files_never_asks_an_nbia_server(
        tmp_path: Path, gen3_archive: Gen3Archive, gen3_server: Gen3Server,
        gen3_creds: Path, serve: object) -> None:
    nbia: ReferenceServer = serve(gen3_archive.summary.root)  # type: ignore[operator]
    sheet = mixed_sheet(tmp_path / "files.csv", gen3_archive, gen3_server, [])
    done = run_cli(["download", str(sheet), "-d", str(tmp_path / "out"), "--api-url",
                    nbia.api_url, "--auth", str(gen3_creds), "--gen3-endpoint",
                    gen3_server.url, "--accept-data-policy"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert nbia.requests == []
    # 3 series zips and 5 files: the summary counts items, not series.
    assert "8 of 8 items complete" in done.stdout + done.stderr

    listed = run_cli(["list", str(sheet), "--gen3-endpoint", gen3_server.url])
    assert listed.returncode == 0, listed.stdout + listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split("\t")[-1] == "From"
    froms = {line.split("\t")[-1] for line in lines[1:]}
    host = gen3_server.url.split("://", 1)[1]
    assert f"gen3 {host}" in froms
    assert any(f.startswith("url 127.0.0.1") for f in froms)
