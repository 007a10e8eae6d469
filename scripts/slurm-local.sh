#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests of examples/slurm-array.sh.
#
#     scripts/slurm-local.sh
#
# Idempotent: every step first checks whether it is needed, so a second run (everything
# installed and running) only confirms that the node is idle. The steps:
#   1. install slurm-wlm and munge with apt-get when a binary is missing (Debian/Ubuntu;
#      needs root or passwordless sudo, else a one-line message and exit 1);
#   2. write /etc/slurm/slurm.conf for this host: one node (its name, CPUs and memory as
#      `slurmd -C` reads them, at 127.0.0.1), partition "debug" (default), select/cons_tres,
#      proctrack/linuxproc and task/none (no cgroups: works in containers), no accounting.
#      A slurm.conf this script did not write is left alone;
#   3. create the munge key when missing, start munged, slurmctld and slurmd directly as
#      daemons (no systemd needed) unless they already run (a daemon started before
#      slurm.conf was last written is restarted);
#   4. wait, at most SLURM_LOCAL_TIMEOUT seconds (default 60), until sinfo shows the
#      node idle.
# Exit 0 when the node is idle, 1 otherwise (with the daemons' log files named).
#
# Environment: SLURM_CONF (default /etc/slurm/slurm.conf; /etc/slurm-llnl/slurm.conf on
# the older releases that use that folder), SLURM_LOCAL_TIMEOUT.
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
MARK="# Written by nbia-retriever scripts/slurm-local.sh (one-node test cluster)."
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid

say() { echo "slurm-local: $*"; }
die() { echo "slurm-local: $*" >&2; exit 1; }

# as_root CMD...: run CMD as root (directly, or through passwordless sudo).
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        die "needs root or passwordless sudo to $1 (run: sudo $0)"
    fi
}

# alive PID: PID is a live process (a zombie, which kill -0 and pgrep still find, is not).
alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) && [[ -n $stat && $stat != Z* ]]
}

# running NAME PIDFILE: NAME runs (by its pid file, else by its exact process name).
running() {
    local pid stat
    if [[ -r $2 ]] && pid=$(<"$2") && [[ $pid =~ ^[0-9]+$ ]] && alive "$pid"; then
        return 0
    fi
    while read -r stat; do
        [[ $stat == Z* ]] || return 0
    done < <(ps -C "$1" -o stat= 2>/dev/null)
    return 1
}

# ---- 1. packages -----------------------------------------------------------------------
missing=()
for bin in sbatch sinfo squeue scancel slurmctld slurmd munged; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    command -v apt-get >/dev/null 2>&1 \
        || die "missing ${missing[*]} and no apt-get here: install slurm-wlm and munge"
    say "installing slurm-wlm and munge (missing: ${missing[*]})"
    as_root apt-get -o DPkg::Lock::Timeout=300 update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends slurm-wlm munge >/dev/null
    for bin in "${missing[@]}"; do
        command -v "$bin" >/dev/null 2>&1 || die "apt-get installed no $bin"
    done
else
    say "slurm-wlm and munge already installed ($(slurmd -V))"
fi

# ---- 2. slurm.conf ---------------------------------------------------------------------
if [[ -z ${SLURM_CONF:-} && ! -d /etc/slurm && -d /etc/slurm-llnl ]]; then
    CONF=/etc/slurm-llnl/slurm.conf  # Debian 10, Ubuntu 20.04 (slurm < 20.11)
fi
host=$(hostname -s)
# CPUs, sockets, cores, threads and RealMemory exactly as slurmd will detect them: a node
# configured with more than it has is drained ("Low RealMemory"), one with less is fine.
node=$(slurmd -C | sed -n 's/^NodeName=[^ ]* //p' | head -n1)
[[ -n $node ]] || die "slurmd -C did not describe this machine"
user=root
id slurm >/dev/null 2>&1 && user=slurm
conf_text="$MARK
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$user
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 $node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"

if [[ -f $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
    say "$CONF exists and was not written by this script: using it as it is"
elif [[ -f $CONF ]] && [[ $(<"$CONF") == "$conf_text" ]]; then
    say "$CONF up to date (node $host: $node)"
else
    say "writing $CONF (node $host: $node)"
    as_root mkdir -p "$(dirname "$CONF")"
    printf '%s\n' "$conf_text" | as_root tee "$CONF" >/dev/null
    as_root chmod 644 "$CONF"
fi
for dir in "$STATE" "$LOGS"; do  # slurmctld (as SlurmUser) writes these
    [[ -d $dir && $(stat -c %U "$dir") == "$user" ]] \
        || as_root install -d -o "$user" -g "$user" -m 0755 "$dir"
done
[[ -d $SPOOL ]] || as_root install -d -m 0755 "$SPOOL"

# ---- 3. daemons ------------------------------------------------------------------------
if running munged /run/munge/munged.pid; then
    say "munged already running"
else
    if ! as_root test -s /etc/munge/munge.key; then
        say "creating the munge key"
        as_root install -d -o munge -g munge -m 0700 /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            as_root mungekey --create --keyfile=/etc/munge/munge.key
        else  # munge < 0.5.14
            as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        as_root chown munge:munge /etc/munge/munge.key
        as_root chmod 0400 /etc/munge/munge.key
    fi
    say "starting munged"
    as_root install -d -o munge -g munge -m 0755 /run/munge
    as_root install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    as_root runuser -u munge -- munged
fi
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

# Daemons started before slurm.conf was last written read an older one: restart them.
for pair in "slurmd:$SLURMD_PID" "slurmctld:$CTLD_PID"; do
    name=${pair%%:*} pidfile=${pair#*:}
    if [[ -r $pidfile && $CONF -nt $pidfile ]] && running "$name" "$pidfile"; then
        pid=$(<"$pidfile")
        say "stopping $name (started before $CONF changed)"
        as_root kill "$pid"
        for _ in $(seq 1 100); do  # at most 10 s
            alive "$pid" || break
            sleep 0.1
        done
    fi
done
if running slurmctld "$CTLD_PID"; then
    say "slurmctld already running"
else
    say "starting slurmctld"
    as_root slurmctld
fi
if running slurmd "$SLURMD_PID"; then
    say "slurmd already running"
else
    say "starting slurmd"
    as_root slurmd
fi

# ---- 4. wait for the node --------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
resumed=no
while :; do
    state=$(sinfo -h -N -n "$host" -o '%T' 2>/dev/null | head -n1 || true)
    case $state in
        idle|mixed|allocated|completing)
            say "node $host is $state: sbatch works (partition debug)"
            exit 0 ;;
        drained|draining|down|drain*)
            if [[ $resumed == no ]]; then  # e.g. left down by an earlier configuration
                say "node $host is $state: resuming it"
                as_root scontrol update NodeName="$host" State=RESUME || true
                resumed=yes
            fi ;;
    esac
    if (( SECONDS >= deadline )); then
        die "node $host not idle after ${TIMEOUT}s (state: ${state:-no answer});" \
            "see $LOGS/slurmctld.log and $LOGS/slurmd.log"
    fi
    sleep 1
done
