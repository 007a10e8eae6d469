"""Trust, round 2 (issue 21): examples/slurm-array.sh with hostile names.

A manifest or destination whose name holds quotes, tabs, ``$()`` or spaces must reach the
array tasks and the ``merge-reports`` check as data, never as shell code: the check job
runs under ``/bin/sh`` (dash on Debian), which has no ``$'...'`` quoting. An exported
``CDPATH`` (which makes bash's ``cd`` go elsewhere and print where) must not move the
destination.

Two ways to run the script: on a real one-node SLURM (``scripts/slurm-local.sh``), and
with a stand-in ``sbatch`` that runs what it is given at once, the way slurmd would (a
batch script by its ``#!`` line, ``--wrap`` text as a ``#!/bin/sh`` script, array tasks
with their ``SLURM_ARRAY_*`` variables), so the shell-code check runs wherever dash is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from enginehelpers import write_manifest
from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "slurm-array.sh"
TASKS = 2
ARCHIVE = dict(seed=7, collections=1, patients=2, studies=1, series=2, images=1, rows=8,
               columns=8, restricted=False)
#: Names that break out of bash's ``printf %q`` quoting when dash reads it (the tab makes
#: bash write ``$'...'``; dash reads that as ``$`` and a single-quoted string that ends at
#: the quote, and ``#`` comments out the rest), and plain quote/space/``$()`` soup.
HOSTILE_DEST = "dest\t'$(touch PWNED) #"
HOSTILE_MANIFEST = "cart $(touch PWNED) 'q' \"dq\"\ttab.tcia"
DASH = shutil.which("dash")

#: A stand-in for sbatch: runs the job at once, as slurmd would, in the submit directory,
#: its output in the ``--output`` file; array tasks one after the other.
FAKE_SBATCH = r'''#!{python}
import os, re, subprocess, sys
args = sys.argv[1:]
opts, rest = {{}}, []
while args:
    a = args.pop(0)
    if rest or not a.startswith("-"):
        rest.append(a)
    elif "=" in a:
        k, v = a.split("=", 1)
        opts[k] = v
    else:
        opts[a] = True
n = len(os.listdir({jobs!r})) + 100
open(os.path.join({jobs!r}, str(n)), "w").close()
if "--wrap" in opts:
    script = os.path.abspath(f"wrap-{{n}}.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\n# This script was created by sbatch --wrap.\n\n"
                + opts["--wrap"] + "\n")
    rest = [script]
script, script_args = rest[0], rest[1:]
with open(script) as f:
    interpreter = f.readline()[2:].split()
if interpreter == ["/bin/sh"]:
    interpreter = [os.environ.get("FAKE_SBATCH_SH", "/bin/sh")]
tasks = [None]
if "--array" in opts:
    low, high = map(int, opts["--array"].split("-"))
    tasks = list(range(low, high + 1))
for task in tasks:
    env = dict(os.environ, SLURM_JOB_ID=str(n))
    out = opts.get("--output", "slurm-%j.out").replace("%j", str(n))
    if task is not None:
        env.update(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT=str(len(tasks)),
                   SLURM_ARRAY_TASK_MIN=str(tasks[0]))
        out = out.replace("%A", str(n)).replace("%a", str(task))
    with open(out, "w") as log:
        subprocess.run([*interpreter, script, *script_args], env=env, stdout=log,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
if rest[0].startswith(os.path.abspath("wrap-")):
    os.unlink(rest[0])
print(n)
'''


def fake_sbatch(tmp_path: Path) -> Path:
    """A folder with the stand-in ``sbatch``, to put first on PATH."""
    folder = tmp_path / "fakebin"
    jobs = tmp_path / "fakejobs"
    folder.mkdir()
    jobs.mkdir()
    tool = folder / "sbatch"
    tool.write_text(FAKE_SBATCH.format(python=sys.executable, jobs=str(jobs)),
                    encoding="utf-8")
    tool.chmod(0o755)
    return folder


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NBIA_", "SBATCH_"))}
    env.update(NBIA_RETRIEVER=str(Path(sys.executable).with_name("nbia-retriever")),
               NBIA_RETRIEVER_CONFIG=str(tmp_path / "no-config.toml"),
               PYTHONUNBUFFERED="1", **extra)
    return env


def submit(env: dict[str, str], cwd: Path, manifest: str, dest: str) -> tuple[str, str]:
    """Run the script's login-node mode; (array id, check id)."""
    done = subprocess.run(["bash", str(SCRIPT), manifest, dest, str(TASKS)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"submitted download array (\d+) \((\d+) tasks\) and check (\d+)",
                      done.stdout)
    assert found, done.stdout
    return found.group(1), found.group(3)


def hostile_layout(tmp_path: Path, server: ReferenceServer, uids: list[str]
                   ) -> tuple[Path, Path, Path]:
    """(submit folder, manifest, destination), the last two with hostile names, both
    given to the script relative to the submit folder; a decoy folder of the same name
    as the destination where CDPATH points."""
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    manifest = write_manifest(submit_dir / HOSTILE_MANIFEST, uids, server.download_url)
    decoy = tmp_path / "decoy"
    (decoy / HOSTILE_DEST / "slurm-logs").mkdir(parents=True)
    return submit_dir, manifest, submit_dir / HOSTILE_DEST


def assert_no_code_ran(tmp_path: Path) -> None:
    ran = [p for p in tmp_path.rglob("PWNED*")]
    assert not ran, f"a name ran as shell code: {ran}"


def assert_checked(dest: Path, check: str, uids: list[str]) -> None:
    log = dest / "slurm-logs" / f"nbia-merge-reports-{check}.log"
    assert log.is_file(), sorted(os.listdir(dest / "slurm-logs"))
    text = log.read_text(encoding="utf-8", errors="replace")
    assert f"{len(uids)} of {len(uids)} series complete" in text, text
    assert "missing" not in text, text


@pytest.fixture
def uids_and_server(archive_factory: Callable[..., ArchiveSummary],
                    serve: Callable[..., ReferenceServer]) -> tuple[list[str], ReferenceServer]:
    archive = archive_factory(**ARCHIVE)
    return [s.series_uid for s in archive.series], serve(archive.root)


@pytest.mark.skipif(DASH is None, reason="no dash (apt-get install dash)")
@pytest.mark.parametrize("cdpath", [False, True], ids=["names", "names+CDPATH"])
def test_hostile_names_are_data_for_the_check_job_under_dash(tmp_path, uids_and_server,
                                                             cdpath):
    uids, server = uids_and_server
    submit_dir, manifest, dest = hostile_layout(tmp_path, server, uids)
    fake = fake_sbatch(tmp_path)
    # A #!/bin/sh job (what --wrap makes) runs under dash, whatever /bin/sh is here.
    env = script_env(tmp_path, FAKE_SBATCH_SH=str(DASH),
                     PATH=f"{fake}{os.pathsep}{os.environ['PATH']}",
                     **({"CDPATH": str(tmp_path / "decoy")} if cdpath else {}))
    _, check = submit(env, submit_dir, manifest.name, dest.name)
    assert_no_code_ran(tmp_path)
    assert_checked(dest, check, uids)
    assert not any((tmp_path / "decoy" / HOSTILE_DEST / "slurm-logs").iterdir())


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_hostile_names_are_data_on_a_real_cluster(tmp_path, uids_and_server):
    """The same on SLURM itself: its --wrap and batch scripts run by slurmd's /bin/sh."""
    import test_slurm as real

    reason = real.slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    uids, server = uids_and_server
    submit_dir, manifest, dest = hostile_layout(tmp_path, server, uids)
    env = script_env(tmp_path, CDPATH=str(tmp_path / "decoy"),
                     NBIA_SBATCH_ARGS="--cpus-per-task=1 --time=30")
    array, check = submit(env, submit_dir, manifest.name, dest.name)
    try:
        real.wait_ended([array, check])
    finally:
        if left := real.squeue([array, check]):
            subprocess.run(["scancel", *{job.split()[0].split("_")[0] for job in left}],
                           timeout=60, check=False)
    for k in range(1, TASKS + 1):
        assert real.job_state(f"{array}_{k}") == ("COMPLETED", "0:0")
    assert real.job_state(check) == ("COMPLETED", "0:0")
    assert_no_code_ran(tmp_path)
    assert_checked(dest, check, uids)
    assert not any((tmp_path / "decoy" / HOSTILE_DEST / "slurm-logs").iterdir())


def test_extra_sbatch_options_are_not_globbed(tmp_path):
    """NBIA_SBATCH_ARGS is split into words, never expanded against the submit folder."""
    from test_shards import calls, submit_cart

    (tmp_path / "--comment=planted").write_text("", encoding="utf-8")
    done, _manifest, log = submit_cart(tmp_path, "--comment=*", "2")
    assert done.returncode == 0, done.stderr
    array, check = calls(log)
    assert "--comment=*" in array and "--comment=*" in check
