#!/usr/bin/env bash
# A one-node Slurm cluster of its own on this machine, for tests and demos (Debian/Ubuntu, run as root).
#
#   eval "$(scripts/slurm/local-cluster.sh start [STATE_DIR])"   # install if missing, start, wait for
#                                                                # idle; prints export SLURM_CONF=...
#   scripts/slurm/local-cluster.sh status [STATE_DIR]
#   scripts/slurm/local-cluster.sh stop [STATE_DIR]     # stop what start started, remove STATE_DIR
#
# STATE_DIR (default $DPCNN_SLURM_DIR, else /tmp/dpcnn-slurm) holds everything: slurm.conf, the
# daemons' state, spool, logs and PID files, and a munged of its own (its socket there too). The
# cluster is private: Slurm clients find it only through SLURM_CONF=STATE_DIR/slurm.conf (which
# `start` prints as an export line on stdout; jobs inherit it), its name is dpcnn-<id of STATE_DIR>,
# and its daemons listen on ports free at start, so it never takes the place of another Slurm on
# this machine (a site's, or another checkout's test cluster) and no other is touched:
# /etc/slurm, the system munged and every daemon not started here are left alone. Outside STATE_DIR
# it only installs Debian's Slurm and MUNGE packages when they are missing.
# The node has this machine's CPUs and MpiDefault=pmi2, so plain `srun` starts MPICH ranks that
# see each other; `srun --mpi=none` gives independent singletons. Daemons are stopped by the PIDs
# saved at start (checked against their executables), never by name. Starting twice only reports
# that the cluster is up (and prints the export line again).
set -euo pipefail

cmd=${1:-start}
DIR=$(realpath -m "${2:-${DPCNN_SLURM_DIR:-/tmp/dpcnn-slurm}}")
MARK=$DIR/.dpcnn-local-cluster             # "this directory is ours": stop may delete it
TIMEOUT=${DPCNN_SLURM_TIMEOUT:-60}         # seconds to wait for the node to become idle
export SLURM_CONF=$DIR/slurm.conf          # this script's own client commands (sinfo) ask this cluster

say() { echo "local-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }
# A PID is live unless gone or a zombie; a daemon is alive when its recorded PID still runs the
# executable recorded with it (no PID-reuse accidents).
live() { local s; s=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) && [[ -n $s && $s != Z ]]; }
alive() {
    local p; p=$(cat "$DIR/pids/$1.pid" 2>/dev/null) || return 1
    [[ -n $p ]] && live "$p" && [[ $(readlink "/proc/$p/exe" 2>/dev/null) == "$(cat "$DIR/pids/$1.exe" 2>/dev/null)" ]]
}
record() { echo "$2" > "$DIR/pids/$1.pid"; readlink -f "$3" > "$DIR/pids/$1.exe"; }
DAEMONS=(slurmd slurmctld munged)
running() { local d; for d in "${DAEMONS[@]}"; do alive "$d" || return 1; done; }
node_state() { timeout 5 sinfo -h -o %t 2>/dev/null | head -1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && command -v setpriv >/dev/null && return 0
    [[ $(id -u) == 0 ]] || die "Slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is not available"
    say "installing slurmctld slurmd slurm-client munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge util-linux >/dev/null
}

free_ports() {   # two TCP ports nothing listens on now (the kernel's choice)
    python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_files() {
    if [[ -e $DIR && ! -e $MARK && -n $(ls -A "$DIR" 2>/dev/null) ]]; then
        die "$DIR exists and was not made by this script; give another STATE_DIR"
    fi
    mkdir -p "$DIR"/{pids,state,spool,munge} && touch "$MARK" || die "cannot write $DIR"
    chmod 755 "$DIR" && chown munge:munge "$DIR/munge" && chmod 755 "$DIR/munge"   # munged's socket dir: open to all
    setpriv --reuid=munge --regid=munge --init-groups test -x "$DIR/munge" ||
        die "the munge user cannot reach $DIR (a directory above it is not open to other users); give a STATE_DIR such as /tmp/dpcnn-slurm"
    local host cpus mem ports id
    host=$(hostname -s)
    cpus=$(nproc --all)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)   # MiB, a little under
    read -r -a ports <<< "$(free_ports)"
    id=$(printf '%s' "$DIR" | md5sum | cut -c1-8)
    cat > "$DIR/slurm.conf" <<EOF
# Written by scripts/slurm/local-cluster.sh: a private one-node test cluster (clients: SLURM_CONF=$DIR/slurm.conf).
ClusterName=dpcnn-$id
SlurmctldHost=$host
SlurmctldPort=${ports[0]}
SlurmdPort=${ports[1]}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.sock
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/pids/slurmctld.pidfile
SlurmdPidFile=$DIR/pids/slurmd.pidfile
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
}

start_munged() {
    # setpriv execs (runuser would fork), so $! is munged itself; its socket and files in $DIR/munge
    setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
        --socket="$DIR/munge/munge.sock" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
        >> "$DIR/munged.out" 2>&1 < /dev/null 9<&- &
    record munged $! /usr/sbin/munged
    for _ in $(seq 100); do
        munge -S "$DIR/munge/munge.sock" -n > /dev/null 2>&1 && return 0
        alive munged || break
        sleep 0.05
    done
    die "munged did not start: $(tail -n 1 "$DIR/munged.out" "$DIR/munge/munged.log" 2>/dev/null | grep -v '^==' | tail -n 1)"
}

start() {
    if running; then
        say "already running in $DIR (node: $(node_state))"
        echo "export SLURM_CONF=$DIR/slurm.conf"
        return 0
    fi
    [[ -e $MARK ]] && stop_all quiet                  # leftovers of a failed start
    local t0=$SECONDS
    install_packages
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
    write_files
    start_munged
    # -D: stay in the foreground (so $! is the daemon); -c: forget jobs and node states of an
    # earlier run (-i alone would recover them, and a dead job would hold the node "alloc").
    setsid /usr/sbin/slurmctld -D -c -i -f "$DIR/slurm.conf" > "$DIR/ctld.out" 2>&1 < /dev/null 9<&- &
    record slurmctld $! /usr/sbin/slurmctld
    setsid /usr/sbin/slurmd -D -f "$DIR/slurm.conf" > "$DIR/slurmd.out" 2>&1 < /dev/null 9<&- &
    record slurmd $! /usr/sbin/slurmd
    local state=""
    for _ in $(seq $((TIMEOUT * 5))); do
        state=$(node_state)
        if [[ $state == idle ]]; then
            say "up in $((SECONDS - t0)) s: $DIR/slurm.conf, node idle; clients need SLURM_CONF"
            echo "export SLURM_CONF=$DIR/slurm.conf"
            return 0
        fi
        alive slurmctld && alive slurmd || break
        sleep 0.2
    done
    say "node not idle after $((SECONDS - t0)) s (state: ${state:-none}): $(tail -n 2 "$DIR"/*.out | tr '\n' ' ')"
    stop_all quiet
    exit 1
}

stop_daemons() {
    local d pid
    for d in "${DAEMONS[@]}"; do                       # slurmd first, munged last
        if alive "$d"; then
            pid=$(cat "$DIR/pids/$d.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do live "$pid" || break; sleep 0.1; done
            live "$pid" && kill -KILL "$pid" 2>/dev/null || true
            [[ ${1:-} == quiet ]] || say "stopped $d (pid $pid)"
        fi
    done
}

stop_all() {
    stop_daemons "${1:-}"
    if [[ -e $MARK ]]; then
        rm -rf "$DIR"
        [[ ${1:-} == quiet ]] || say "removed $DIR"
    elif [[ -e $DIR ]]; then
        say "not removing $DIR: it was not made by this script"
    fi
}

# one start/stop at a time for this script (a lock on the script itself: no lock file to leave
# behind; the daemons get fd 9 closed, or they would hold the lock for as long as they run)
exec 9< "${BASH_SOURCE[0]}"
case $cmd in
    start) flock 9; start ;;
    stop) flock 9; stop_all ;;
    status)
        if running; then
            echo "running in $DIR (node: $(node_state)); SLURM_CONF=$DIR/slurm.conf"
        else
            echo "not running in $DIR"; exit 1
        fi ;;
    *) die "usage: $0 start|stop|status [STATE_DIR]" ;;
esac
