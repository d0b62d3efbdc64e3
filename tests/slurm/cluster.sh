#!/usr/bin/env bash
# A SLURM cluster on this machine, for the real-controller tests (tests/slurm/): the node named
# after the machine (partition debug) and three one-CPU nodes mc1-mc3 (partition multi), each with
# a slurmd of its own, so that a job can span two nodes and be requeued without one of them.
#
#   tests/slurm/cluster.sh start    install the packages if missing, write the config, start
#                                   munged, slurmctld and slurmd, wait until the node is idle
#   tests/slurm/cluster.sh stop     stop the three daemons by their pid files
#   tests/slurm/cluster.sh status   what runs, and sinfo
#
# Debian's packages (slurmctld, slurmd, slurm-client, munge; Slurm 22.05 on bookworm), as root,
# without systemd: every daemon is started in its own daemon mode and stopped through its pid
# file. The node is this machine (NodeName = `hostname -s`), with its real CPU count and a bit
# less memory than it has, and two fake GPUs (gres on /dev/null and /dev/zero) so that the job
# script tools/submit.py writes, which always asks --gpus-per-node, runs unchanged; the tasks
# train on CPU (train.device=cpu, gloo).
#
# No accounting database (slurmdbd + MariaDB): maescale never asks sacct (the job requeues
# itself with `scontrol requeue`, tools/submit.py does not wait), and the tests read job states
# from `scontrol show job`, which keeps a finished job for MinJobAge (10 minutes here). submitit's
# job.state would say UNKNOWN without sacct; nothing here uses it.
#
# Exit status: 0 done; 77 this machine cannot have the cluster (not root, no apt-get, packages
# not installable, a slurm.conf that is not ours): the tests skip, naming the reason; 1 the set-up
# failed (a daemon did not start, the node did not come up): the tests fail, with the logs.
# `start` prints "cluster: started" or "cluster: already running" as its last line.
# Idempotent: `start` on a running cluster only checks it; `stop` on a stopped one does nothing.
set -euo pipefail

SKIP=77
MARK="# Written by maescale tests/slurm/cluster.sh"
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
GRES=$CONF_DIR/gres.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
# Four slurmd on this machine: the node named after it (2 fake GPUs) and three one-CPU nodes
# mc1-mc3 of a "multi" partition: a 2-node job, and a spare to requeue it on without a bad node.
MULTI_NODES=(mc1 mc2 mc3)
MUNGE_PID=/run/munge/munged.pid
CONFIG_CHANGED=0  # set by write_config when it rewrote the config: the daemons must restart
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "cluster: $*" >&2; }
skip() { echo "SKIP: $*" >&2; exit "$SKIP"; }
fail() {
    echo "ERROR: $*" >&2
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR"/slurmd-*.log; do
        [ -f "$f" ] && { echo "--- last lines of $f" >&2; tail -n 25 "$f" >&2; }
    done
    exit 1
}

# The pid in a pid file if that process runs, else nothing.
running_pid() {
    local pid
    pid=$(cat "$1" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

have_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && command -v scontrol >/dev/null
}

install_packages() {
    have_packages && return 0
    [ "$(id -u)" -eq 0 ] || skip "SLURM is not installed and installing it needs root (this is uid $(id -u))"
    command -v apt-get >/dev/null || skip "SLURM is not installed and there is no apt-get here (Debian/Ubuntu only)"
    say "installing ${PACKAGES[*]} (apt-get)"
    local apt=(apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends "${PACKAGES[@]}")
    # The package lists of a fresh image may be missing or old: update once if the install fails.
    # policy-rc.d (or the missing init system) keeps the packages from starting their services.
    if ! DEBIAN_FRONTEND=noninteractive timeout 600 "${apt[@]}" >/tmp/maescale-slurm-apt.log 2>&1; then
        if ! DEBIAN_FRONTEND=noninteractive timeout 300 apt-get -q -o DPkg::Lock::Timeout=300 update \
                >>/tmp/maescale-slurm-apt.log 2>&1 \
            || ! DEBIAN_FRONTEND=noninteractive timeout 600 "${apt[@]}" >>/tmp/maescale-slurm-apt.log 2>&1; then
            tail -n 5 /tmp/maescale-slurm-apt.log >&2
            skip "could not install ${PACKAGES[*]} with apt-get (no network to the Debian mirrors?); see /tmp/maescale-slurm-apt.log"
        fi
    fi
    have_packages || skip "apt-get installed ${PACKAGES[*]} but slurmctld/slurmd/munged/sbatch are still not on PATH"
}

write_config() {
    local host cpus mem_total mem
    host=$(hostname -s)
    cpus=$(nproc --all)
    mem_total=$(free -m | awk '/^Mem:/ {print $2}')
    # slurmd marks the node invalid if it has less memory than configured: stay a bit under.
    mem=$(( mem_total * 9 / 10 ))
    if [ -f "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
        skip "$CONF exists and was not written by this script (a real SLURM installation?): not touching it"
    fi
    mkdir -p "$CONF_DIR"
    local new
    new=$(cat <<EOF
$MARK: a one-node test cluster (see the script).
ClusterName=maescale-ci
SlurmctldHost=$host
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule every 2 s (the default 60 s would leave a requeued job pending for a minute).
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
# Keep finished jobs in scontrol's answers for 10 minutes (there is no accounting database).
MinJobAge=600
# SLURM's default: the time between SIGTERM (scancel, requeue) and SIGKILL, to checkpoint in.
KillWait=30
SlurmUser=slurm
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
# verbose: slurmctld logs the signals it sends (the time-limit signal) and the requeues.
SlurmctldDebug=verbose
SlurmdDebug=verbose
GresTypes=gpu
NodeName=$host CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
NodeName=mc1 NodeHostname=$host NodeAddr=127.0.0.1 Port=6821 CPUs=1 RealMemory=$(( mem / 4 )) State=UNKNOWN
NodeName=mc2 NodeHostname=$host NodeAddr=127.0.0.1 Port=6822 CPUs=1 RealMemory=$(( mem / 4 )) State=UNKNOWN
NodeName=mc3 NodeHostname=$host NodeAddr=127.0.0.1 Port=6823 CPUs=1 RealMemory=$(( mem / 4 )) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=multi Nodes=mc1,mc2,mc3 MaxTime=INFINITE State=UP
EOF
)
    # Two fake GPUs: one device file each (a Count=2 line without files leaves the node invalid).
    local gres
    gres=$(printf '%s\nNodeName=%s Name=gpu File=/dev/null\nNodeName=%s Name=gpu File=/dev/zero\n' \
        "$MARK" "$host" "$host")
    if [ "$(cat "$CONF" 2>/dev/null)" != "$new" ] || [ "$(cat "$GRES" 2>/dev/null)" != "$gres" ]; then
        printf '%s\n' "$new" >"$CONF"
        printf '%s\n' "$gres" >"$GRES"
        CONFIG_CHANGED=1
    fi
}

start_munge() {
    if [ -n "$(running_pid "$MUNGE_PID")" ]; then return 0; fi
    [ -s /etc/munge/munge.key ] || { mungekey --create --force >/dev/null; chown munge:munge /etc/munge/munge.key; }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" || fail "munged did not start (see /var/log/munge/munged.log)"
    munge -n | unmunge >/dev/null || fail "munge does not work: munge -n | unmunge failed"
}

node_names() { echo "$(hostname -s)" "${MULTI_NODES[@]}"; }

# The extra node names resolve to this machine (a job's first node is its rendezvous address).
write_hosts() {
    local n
    for n in "${MULTI_NODES[@]}"; do
        grep -qE "^127\.0\.0\.1[[:space:]].*\b$n\b" /etc/hosts || echo "127.0.0.1 $n  $MARK" >>/etc/hosts
    done
}

start_slurm() {
    local n
    mkdir -p /var/spool/slurmctld "$LOG_DIR"
    chown slurm:slurm /var/spool/slurmctld "$LOG_DIR"
    if [ "$CONFIG_CHANGED" -eq 1 ]; then
        for n in $(node_names); do stop_daemon "slurmd $n" "/run/slurmd-$n.pid"; done
        stop_daemon slurmd /run/slurmd.pid  # a cluster started by an older version of this script
        stop_daemon slurmctld "$CTLD_PID"
    fi
    if [ -z "$(running_pid "$CTLD_PID")" ]; then
        say "starting slurmctld"
        # -c: start without the jobs of an earlier session (their run directories are gone).
        slurmctld -c || fail "slurmctld did not start"
    fi
    for n in $(node_names); do
        mkdir -p "/var/spool/slurmd/$n"
        if [ -z "$(running_pid "/run/slurmd-$n.pid")" ]; then
            say "starting slurmd $n"
            slurmd -N "$n" || fail "slurmd $n did not start"
        fi
    done
}

wait_idle() {
    local host state _
    for host in $(node_names); do
        for _ in $(seq 1 120); do
            state=$(sinfo -h -N -n "$host" -o '%t' 2>/dev/null | head -n 1 || true)
            case "$state" in
                idle|mix|alloc) continue 2 ;;
                down|down\*|drain|drain\*|drng|inval)
                    scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
            esac
            sleep 0.5
        done
        sinfo -N -l >&2 || true
        fail "node $host did not become idle within 60 s (state: '${state:-no answer}')"
    done
}

stop_daemon() {
    local name=$1 pidfile=$2 pid _
    pid=$(running_pid "$pidfile")
    [ -n "$pid" ] || return 0
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.2
    done
    say "$name (pid $pid) did not stop within 20 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

cmd_start() {
    [ "$(id -u)" -eq 0 ] || skip "a SLURM test cluster needs root (to install the packages, write $CONF and start the daemons; this is uid $(id -u))"
    if [ -n "$(running_pid "$CTLD_PID")" ] && [ -n "$(running_pid "/run/slurmd-$(hostname -s).pid")" ] \
            && [ -n "$(running_pid "$MUNGE_PID")" ] && have_packages; then
        write_config
        if [ "$CONFIG_CHANGED" -eq 0 ]; then
            wait_idle
            echo "cluster: already running"
            return 0
        fi
    fi
    install_packages
    write_config
    write_hosts
    start_munge
    start_slurm
    wait_idle
    echo "cluster: started"
}

cmd_stop() {
    local n
    for n in $(node_names); do stop_daemon "slurmd $n" "/run/slurmd-$n.pid"; done
    stop_daemon slurmctld "$CTLD_PID"
    stop_daemon munged "$MUNGE_PID"
    echo "cluster: stopped"
}

cmd_status() {
    local rc=0 name pidfile pid
    for name in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:/run/slurmd-$(hostname -s).pid; do
        pidfile=${name#*:}
        pid=$(running_pid "$pidfile")
        if [ -n "$pid" ]; then echo "${name%%:*}: running (pid $pid)"; else echo "${name%%:*}: not running"; rc=3; fi
    done
    if [ "$rc" -eq 0 ]; then sinfo -N -o '%N %t %c %m %G' || rc=3; fi
    return "$rc"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
