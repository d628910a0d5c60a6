#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests and demos (Debian/Ubuntu, run as root).
#
#   scripts/slurm/local-cluster.sh start [STATE_DIR]    # install if missing, start, wait for idle
#   scripts/slurm/local-cluster.sh status [STATE_DIR]
#   scripts/slurm/local-cluster.sh stop [STATE_DIR]     # stop what start started, restore the link
#
# STATE_DIR (default /tmp/dpcnn-slurm) holds slurm.conf, the daemons' state, logs and PID files.
# What it changes outside STATE_DIR: it installs Debian's Slurm and MUNGE packages if missing,
# points /etc/slurm/slurm.conf (a symlink; a real file is never replaced) at STATE_DIR/slurm.conf,
# and starts munged if it is not running. `stop` puts the previous link back (or removes it) and
# stops munged if start started it.
# The node has this machine's CPUs and MpiDefault=pmi2, so plain `srun` starts MPICH ranks that
# see each other; `srun --mpi=none` gives independent singletons. Daemons are stopped by the PIDs
# saved at start, never by name. Starting twice only reports that the cluster is up.
set -euo pipefail

cmd=${1:-start}
DIR=$(realpath -m "${2:-${DPCNN_SLURM_DIR:-/tmp/dpcnn-slurm}}")
CONF=/etc/slurm/slurm.conf                 # where the Slurm clients look (no SLURM_CONF needed)
TIMEOUT=${DPCNN_SLURM_TIMEOUT:-60}         # seconds to wait for the node to become idle

say() { echo "local-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_state() { timeout 5 sinfo -h -o %t 2>/dev/null | head -1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    [[ $(id -u) == 0 ]] || die "Slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is not available"
    say "installing slurmctld slurmd slurm-client munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc --all)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)   # MiB, a little under
    mkdir -p "$DIR/state" "$DIR/spool" /etc/slurm
    cat > "$DIR/slurm.conf" <<EOF
# Written by scripts/slurm/local-cluster.sh: a one-node test cluster.
ClusterName=dpcnn-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=${DPCNN_SLURM_MPI:-pmi2}
ReturnToService=2
KillWait=10
# Job IDs continue from the clock, so a restarted cluster does not reuse IDs (and run dirs).
FirstJobId=$(( $(date +%s) % 10000000 + 1000 ))
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -e $CONF && ! -L $CONF ]] && ! grep -q "local-cluster.sh" "$CONF"; then
        die "$CONF exists and was not written by this script; not replacing it"
    fi
    if [[ -L $CONF && $(readlink "$CONF") != "$DIR/slurm.conf" && ! -e $DIR/conf.previous ]]; then
        readlink "$CONF" > "$DIR/conf.previous"          # put back by stop
    fi
    ln -sfn "$DIR/slurm.conf" "$CONF"
}

restore_conf() {
    [[ -L $CONF && $(readlink "$CONF") == "$DIR/slurm.conf" ]] || return 0
    if [[ -s $DIR/conf.previous ]]; then
        ln -sfn "$(cat "$DIR/conf.previous")" "$CONF"
        say "$CONF points at $(cat "$DIR/conf.previous") again"
    else
        rm -f "$CONF"
    fi
    rm -f "$DIR/conf.previous"
}

start_munge() {
    if [[ -S /run/munge/munge.socket.2 ]] && alive /run/munge/munged.pid; then return 0; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/munged.started"                      # stopped again by stop
    for _ in $(seq 50); do [[ -S /run/munge/munge.socket.2 ]] && return 0; sleep 0.1; done
    die "munged did not start (see /var/log/munge/munged.log)"
}

start() {
    if alive "$DIR/ctld.pid" && alive "$DIR/slurmd.pid.launch"; then
        say "already running in $DIR (node: $(node_state))"
        return 0
    fi
    stop_daemons quiet
    local t0=$SECONDS
    install_packages
    write_conf
    start_munge
    # -D: stay in the foreground (so $! is the daemon); -c: forget jobs and node states of an
    # earlier run (-i alone would recover them, and a dead job would hold the node "alloc").
    setsid slurmctld -D -c -i > "$DIR/ctld.out" 2>&1 < /dev/null &
    echo $! > "$DIR/ctld.pid"
    setsid slurmd -D > "$DIR/slurmd.out" 2>&1 < /dev/null &
    echo $! > "$DIR/slurmd.pid.launch"
    local state=""
    for _ in $(seq $((TIMEOUT * 5))); do
        state=$(node_state)
        [[ $state == idle ]] && { say "up in $((SECONDS - t0)) s: $DIR/slurm.conf, node idle"; return 0; }
        alive "$DIR/ctld.pid" && alive "$DIR/slurmd.pid.launch" || break
        sleep 0.2
    done
    stop_daemons quiet
    die "node not idle after $((SECONDS - t0)) s (state: ${state:-none}); see $DIR/*.out and $DIR/*.log"
}

stop_daemons() {
    local f pid
    for f in "$DIR/slurmd.pid.launch" "$DIR/ctld.pid"; do
        if alive "$f"; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
            [[ ${1:-} == quiet ]] || say "stopped $(basename "$f" | cut -d. -f1) (pid $pid)"
        fi
        rm -f "$f"
    done
}

case $cmd in
    start) start ;;
    stop)
        stop_daemons
        restore_conf
        if [[ -e $DIR/munged.started ]] && alive /run/munge/munged.pid; then
            kill "$(cat /run/munge/munged.pid)" && say "stopped munged"
        fi
        rm -f "$DIR/munged.started" ;;
    status)
        if alive "$DIR/ctld.pid" && alive "$DIR/slurmd.pid.launch"; then
            echo "running in $DIR (node: $(node_state))"
        else
            echo "not running"; exit 1
        fi ;;
    *) die "usage: $0 start|stop|status [STATE_DIR]" ;;
esac
