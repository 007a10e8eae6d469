#!/usr/bin/env bash
# Download one TCIA / NBIA manifest on a SLURM cluster with a job array, then check it.
#
# Submit from a login node (recommended):
#
#     examples/slurm-array.sh MANIFEST.tcia DEST [TASKS]
#
#   submits TASKS array tasks (default 8). Task K of N runs
#       nbia-retriever download MANIFEST -d DEST --shard K/N --quiet
#   so every series is downloaded by exactly one task (a stable hash of its UID picks the
#   task; no coordination needed), all into the same DEST/<manifest name>/ folder, each
#   task with its own journal (.nbia/journal-K-of-N.sqlite). A second job, started when
#   every task has ended (afterany: also when some failed), runs
#       nbia-retriever merge-reports DEST --manifest MANIFEST
#   which cleans up metadata.csv, lists every series still missing (with its shard) and
#   exits 1 if anything is, so its state in sacct says whether the download is complete.
#
# Or submit the array alone, with the array size from the #SBATCH line below:
#
#     sbatch examples/slurm-array.sh MANIFEST.tcia DEST
#
# Resume: submit the same command again (same MANIFEST, DEST and TASKS). Finished series
# are skipped in milliseconds; only what is missing is downloaded. Keep TASKS the same
# between runs: it decides which task owns which series.
#
# Any working directory: MANIFEST, DEST and the script are made absolute before
# submitting, and both jobs run in DEST/slurm-logs/ (created if needed), so their logs
# are there whatever the submit directory is:
#     DEST/slurm-logs/nbia-download-<array job>_<task>.log   one per task
#     DEST/slurm-logs/nbia-merge-reports-<job>.log           the check
# (Submitted with plain sbatch, the jobs run in, and log to, the submit directory.)
#
# Connections: the tasks share one budget, NBIA_MAX_CONNECTIONS concurrent series
# streams in all (default 16, nbia-retriever's own --max-connections default). Each task
# gets --max-connections BUDGET/TASKS (rounded down, at least 1, at most 64) and within
# that cap finds by itself how many series to download at once (download --help).
#
# Environment (exported to the jobs, as sbatch does by default):
#   NBIA_RETRIEVER  the command to run (default: nbia-retriever on PATH, e.g. from a venv);
#                   a relative path is made absolute when submitting
#   NBIA_MAX_CONNECTIONS  the connection budget of the whole array (default 16)
#   NBIA_WORKERS    pin the series downloaded at once per task (--workers); unset (the
#                   default) lets each task adapt up to its share of the budget. Pinned,
#                   the budget no longer applies: TASKS x NBIA_WORKERS streams at most
#   NBIA_USER       log in as this user (limited-access collections); the password comes
#                   from NBIA_PASSWORD or the keyring, never from the command line
#   NBIA_SOURCE     auto (default), nbia or idc: where series come from (download
#                   --source); NBIA_IDC_INDEX and NBIA_IDC_ENDPOINT as for download. With
#                   idc and no NBIA_MAX_CONNECTIONS, each task uses IDC's own default
#   NBIA_SBATCH_ARGS  extra sbatch options for both jobs, e.g. "--account=X --partition=Y"
#                   (they override the #SBATCH lines below, e.g. "--cpus-per-task=1")
#
# Notes: keep the array contiguous (1-N or 0-(N-1), no steps). Be polite: the budget is
# what the server sees at most at once; 16 is plenty.
# Shortly before the time limit SLURM sends SIGINT (--signal below); the download then
# stops cleanly (exit 130, at once, even when a stream is stalled) and the next
# submission resumes it.
# To try it on one machine: scripts/slurm-local.sh (as root) sets up a one-node SLURM;
# tests/test_slurm.py runs this script on it.
#
#SBATCH --job-name=nbia-download
#SBATCH --array=1-8
#SBATCH --cpus-per-task=2
#SBATCH --mem=2G
#SBATCH --time=24:00:00
#SBATCH --signal=B:INT@120
#SBATCH --output=nbia-download-%A_%a.log

set -euo pipefail
# An exported CDPATH makes cd go to a folder of the same name elsewhere (and print it).
unset CDPATH

NBIA=${NBIA_RETRIEVER:-nbia-retriever}

usage() {
    echo "usage: $0 MANIFEST.tcia DEST [TASKS]" >&2
    exit 2
}

# absolute VAR PATH: VAR = PATH made absolute (its folder resolved, its name kept as is).
# Names are data: no word splitting, no option parsing, no trailing newline lost to $().
absolute() {
    local dir=. name=$2 found
    if [[ $2 == */* ]]; then
        dir=${2%/*} name=${2##*/}
        dir=${dir:-/}
    fi
    if [[ -z $name || $name == . || $name == .. ]]; then  # a folder: resolve all of it
        dir=$2 name=
    fi
    found=$(cd -- "$dir" && pwd && echo .) || exit 2
    found=${found%$'\n.'}
    if [[ -n $name ]]; then
        found=${found%/}/$name
    fi
    printf -v "$1" '%s' "$found"
}

if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    # ---- inside an array task: download this task's shard ---------------------------
    [[ $# -ge 2 ]] || usage
    manifest=$1
    dest=$2
    count=${SLURM_ARRAY_TASK_COUNT:?SLURM_ARRAY_TASK_COUNT is not set (SLURM too old?)}
    shard=$(( SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-1} + 1 ))
    budget=${NBIA_MAX_CONNECTIONS:-16}  # 16: download's own --max-connections default
    [[ $budget =~ ^[1-9][0-9]*$ ]] \
        || { echo "NBIA_MAX_CONNECTIONS must be a positive number" >&2; exit 2; }
    share=$(( budget / count ))
    (( share >= 1 )) || share=1
    (( share <= 64 )) || share=64  # download's upper limit
    stream_args=(--max-connections "$share")
    if [[ "${NBIA_SOURCE:-}" == idc && -z "${NBIA_MAX_CONNECTIONS:-}" ]]; then
        stream_args=()  # IDC's buckets are not one polite server: each task its default
    fi
    if [[ -n "${NBIA_WORKERS:-}" ]]; then
        stream_args+=(--workers "$NBIA_WORKERS")
    fi
    user_args=()  # expanded as ${a[@]+"${a[@]}"}: bash < 4.4 calls an empty array unbound
    if [[ -n "${NBIA_USER:-}" ]]; then
        user_args=(--user "$NBIA_USER")
    fi
    # exec: the download itself receives SLURM's SIGINT and stops cleanly.
    exec "$NBIA" download "$manifest" -d "$dest" --shard "$shard/$count" --quiet \
        ${stream_args[@]+"${stream_args[@]}"} ${user_args[@]+"${user_args[@]}"}
fi

# ---- on the login node: submit the array and the check that follows it --------------
[[ $# -ge 2 && $# -le 3 ]] || usage
tasks=${3:-8}
[[ $tasks =~ ^[1-9][0-9]*$ ]] || { echo "TASKS must be a positive number" >&2; exit 2; }
[[ -f $1 ]] || { echo "$1: no such manifest" >&2; exit 2; }
mkdir -p -- "$2/slurm-logs"
absolute manifest "$1"
absolute dest "$2/."
logs=$dest/slurm-logs
absolute script "$0"
if [[ $NBIA == */* ]]; then  # a path: the jobs run elsewhere, so make it absolute
    [[ -f $NBIA && -x $NBIA ]] \
        || { echo "NBIA_RETRIEVER=$NBIA: not an executable file" >&2; exit 2; }
    absolute NBIA "$NBIA"
else
    command -v "$NBIA" >/dev/null \
        || { echo "$NBIA: not on PATH (install it, or set NBIA_RETRIEVER)" >&2; exit 2; }
fi
export NBIA_RETRIEVER=$NBIA  # what the tasks run (sbatch exports the environment)
# shellcheck disable=SC2206  # word splitting of the extra options is intended
set -f  # ...but not globbing: "--comment=*" stays as written
extra=(${NBIA_SBATCH_ARGS:-})
set +f

# Submitted from $logs: that is the jobs' working directory, where their --output files
# go (a folder on DEST's filesystem, which the compute nodes write anyway).
array_id=$(cd -- "$logs" && sbatch --parsable ${extra[@]+"${extra[@]}"} --array="1-$tasks" \
    "$script" "$manifest" "$dest")
array_id=${array_id%%;*}  # --parsable prints "id" or "id;cluster"
# The check: a batch script that runs its arguments, given to sbatch as arguments. Never
# a command line for --wrap: that is run by /bin/sh (often dash, which reads bash's
# $'...' quoting of a name with a tab as code), so names must not be shell text at all.
check=$(mktemp "${TMPDIR:-/tmp}/nbia-merge-reports.XXXXXX")
trap 'rm -f -- "$check"' EXIT  # sbatch keeps its own copy of a batch script
printf '%s\n' '#!/bin/sh' '# nbia-retriever merge-reports, from slurm-array.sh' \
    'exec "$@"' >"$check"
merge_id=$(cd -- "$logs" && sbatch --parsable ${extra[@]+"${extra[@]}"} \
    --dependency="afterany:$array_id" \
    --job-name=nbia-merge-reports --time=01:00:00 --mem=1G \
    --output="nbia-merge-reports-%j.log" \
    "$check" "$NBIA" merge-reports "$dest" --manifest "$manifest")
merge_id=${merge_id%%;*}
echo "submitted download array $array_id ($tasks tasks) and check $merge_id"
echo "progress: squeue -j $array_id; result: $logs/nbia-merge-reports-$merge_id.log"
