#!/usr/bin/env bash
# A two-node Slurm cluster on this one Linux machine, to try multi-node runs (root; Debian/Ubuntu).
#
#   scripts/cluster/cluster.sh start              # controller + 2 idle compute nodes, in ~1-2 s
#   export SLURM_CONF=/tmp/dpcnn-cluster/slurm.conf   # what every Slurm client command needs
#   scripts/cluster/cluster.sh status             # namespaces, daemons, sinfo, squeue (exit 1: not running)
#   scripts/cluster/cluster.sh restart-node nodeB # start nodeB's slurmd again (after killing the node)
#   scripts/cluster/cluster.sh stop               # removes everything start created
#
# Each machine is a network + UTS (hostname) + mount namespace; the root-side ends of their veth
# pairs are ports of a bridge, and MPI between the nodes goes over TCP through it, as between hosts:
#
#   name   runs       network namespace  address (eth0)   root-side veth
#   head   slurmctld  dpcnn-head         $NET.253         dpcnn-head
#   nodeA  slurmd     dpcnn-nodeA        $NET.1           dpcnn-nodeA
#   nodeB  slurmd     dpcnn-nodeB        $NET.2           dpcnn-nodeB
#   (this machine: munged and the client commands; bridge dpcnn-br, $NET.254/24)
#
# Everything else lives in $DPCNN_CLUSTER_DIR (default /tmp/dpcnn-cluster): slurm.conf, the node's
# /etc/hosts (bind-mounted inside the nodes only), state, spool, logs, PIDs, munged's socket. `stop`
# ends the daemons (by the PIDs start saved, checked against their executables) and whatever else
# runs inside the namespaces, deletes the namespaces, veths and bridge, and removes the directory.
# Nothing outside it is changed: /etc/slurm, /etc/hosts and the system munged are left alone, so the
# one-node cluster of scripts/slurm/local-cluster.sh can run at the same time.
#
# Knobs (environment, at start): DPCNN_CLUSTER_DIR; DPCNN_CLUSTER_NET (first three octets of the
# /24, default 10.213.0); DPCNN_CLUSTER_SLURMD_TIMEOUT (s, default 30: how soon a dead node is
# noticed); DPCNN_CLUSTER_REQUEUE_DELAY (s, default 30: how long a requeued job waits; Slurm's 120);
# DPCNN_CLUSTER_UCX_TLS (default tcp,self; exported into every task that has no UCX_TLS; empty: off).
# Needs root, iproute2, util-linux (nsenter, unshare, setpriv) and Debian's slurmctld slurmd
# slurm-client munge. Run `netns-ssh NODE CMD` (next to this script) to run a command on a node.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=$(realpath -m "${DPCNN_CLUSTER_DIR:-/tmp/dpcnn-cluster}")
NET=${DPCNN_CLUSTER_NET:-10.213.0}
SLURMD_TIMEOUT=${DPCNN_CLUSTER_SLURMD_TIMEOUT:-30}
REQUEUE_DELAY=${DPCNN_CLUSTER_REQUEUE_DELAY:-30}
UCX=${DPCNN_CLUSTER_UCX_TLS-tcp,self}
BR=dpcnn-br
MARK=$DIR/.dpcnn-cluster                       # says "this directory is ours": stop may delete it
NODES=(head nodeA nodeB)
declare -A ADDR=([head]=$NET.253 [nodeA]=$NET.1 [nodeB]=$NET.2)
export SLURM_CONF=$DIR/slurm.conf

say() { echo "cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.2f", a - b }'; }

# A PID is live unless gone or a zombie (kill -0 succeeds on zombies, and PID 1 may reap late).
live() { local s; s=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) && [[ -n $s && $s != Z ]]; }
# alive NAME: the daemon start recorded in pids/NAME.pid is live and still runs its executable
# (pids/NAME.exe; resolved, as /usr/sbin/slurmd is a symlink to slurmd-wlm): no PID-reuse accidents.
alive() {
    local p; p=$(cat "$DIR/pids/$1.pid" 2>/dev/null) || return 1
    [[ -n $p ]] && live "$p" && [[ $(readlink "/proc/$p/exe" 2>/dev/null) == "$(cat "$DIR/pids/$1.exe" 2>/dev/null)" ]]
}
daemons() { echo munged slurmctld slurmd.nodeA slurmd.nodeB; }
running() { local d; for d in $(daemons); do alive "$d" || return 1; done; }

check_requirements() {
    [[ $(id -u) == 0 ]] || die "needs root (network namespaces, a bridge, Slurm daemons)"
    local missing=() pkgs=() c pkg
    for c in ip:iproute2 nsenter:util-linux unshare:util-linux setpriv:util-linux taskset:util-linux \
             mountpoint:util-linux slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client \
             sinfo:slurm-client scontrol:slurm-client munged:munge munge:munge; do
        pkg=${c#*:}; c=${c%%:*}
        command -v "$c" >/dev/null 2>&1 && continue
        missing+=("$c"); [[ " ${pkgs[*]} " == *" $pkg "* ]] || pkgs+=("$pkg")
    done
    ((${#missing[@]} == 0)) || die "missing ${missing[*]}: apt-get install -y --no-install-recommends ${pkgs[*]}"
    [[ -s /etc/munge/munge.key ]] || die "missing /etc/munge/munge.key (reinstall munge)"
}

write_files() {
    if [[ -e $DIR && ! -e $MARK && -n $(ls -A "$DIR" 2>/dev/null) ]]; then
        die "$DIR exists and was not made by this script; choose another DPCNN_CLUSTER_DIR"
    fi
    mkdir -p "$DIR"/{pids,log,state,spool/nodeA,spool/nodeB,munge,.cg} && touch "$MARK" || die "cannot write $DIR"
    chown munge:munge "$DIR/munge" && chmod 755 "$DIR/munge"     # munged's socket dir: open to all
    {   echo "127.0.0.1 localhost"
        for n in "${NODES[@]}"; do echo "${ADDR[$n]} $n"; done; } > "$DIR/hosts"
    cat > "$DIR/taskprolog.sh" <<EOF
#!/bin/sh
# The nodes share one kernel, so UCX (pip's MPICH is ch4:ucx) would take them for one host and
# use shared memory between them; TCP makes MPI cross the bridge as between real hosts.
[ -n "\${UCX_TLS:-}" ] || [ -z "$UCX" ] || echo "export UCX_TLS=$UCX"
EOF
    chmod 755 "$DIR/taskprolog.sh"
    local cpus mem
    cpus=$(nproc --all)
    mem=$(awk '/MemTotal/ { print int($2 / 1024 * 0.9 / 2) }' /proc/meminfo)  # MiB, half each, a little under
    cat > "$DIR/slurm.conf" <<EOF
# Written by scripts/cluster/cluster.sh: a two-node test cluster in network namespaces.
ClusterName=dpcnn-two
SlurmctldHost=head(${ADDR[head]})
SlurmUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job must wait before it may start again (Slurm's 120 s)
AuthInfo=socket=$DIR/munge/munge.sock,cred_expire=$REQUEUE_DELAY
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/pids/slurmctld.pidfile
SlurmdPidFile=$DIR/pids/slurmd.%n.pidfile
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
TaskProlog=$DIR/taskprolog.sh
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
ReturnToService=2
# Slurm's 300 s would keep a job on a dead node RUNNING for over 5 minutes
SlurmdTimeout=$SLURMD_TIMEOUT
KillWait=10
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
# Job IDs continue from the clock (and differ from local-cluster.sh's), so run dirs are not reused.
FirstJobId=$(( $(date +%s) % 10000000 + 20000000 ))
# Both nodes claim all of this machine's CPUs: they share them.
NodeName=nodeA NodeAddr=${ADDR[nodeA]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=nodeB NodeAddr=${ADDR[nodeB]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=nodeA,nodeB Default=YES MaxTime=INFINITE State=UP
EOF
}

# The namespaces and the bridge have fixed names: one cluster per machine. The bridge's alias
# names the directory of the cluster that made them.
owner() { cat "/sys/class/net/$BR/ifalias" 2>/dev/null; }
ours() { [[ ! -e /sys/class/net/$BR || $(owner) == "$DIR" ]]; }
check_ours() {
    ours || die "$BR and the dpcnn-* namespaces belong to the cluster in $(owner); stop that first:" \
                "DPCNN_CLUSTER_DIR=$(owner) $0 stop"
}

net_up() {
    local n
    check_ours
    # `ip netns add` makes /run/netns (and a bind mount of it on itself): note it for net_down
    [[ -d /run/netns ]] || touch "$DIR/made-run-netns-dir"
    mountpoint -q /run/netns 2>/dev/null || touch "$DIR/made-run-netns-mount"
    if [[ ! -e /sys/class/net/$BR ]] && ip -4 route show | grep -q "^$NET\.0/24 "; then
        die "$NET.0/24 is already routed here ($(ip -4 route show | grep "^$NET\.0/24 ")); set DPCNN_CLUSTER_NET"
    fi
    ip link add "$BR" type bridge 2>/dev/null
    ip link set "$BR" alias "$DIR"                   # who owns it, for a second start with another DIR
    ip addr replace "$NET.254/24" dev "$BR" && ip link set "$BR" up || die "cannot set up bridge $BR"
    for n in "${NODES[@]}"; do
        ip netns add "dpcnn-$n" 2>/dev/null || [[ -e /run/netns/dpcnn-$n ]] || die "cannot create namespace dpcnn-$n"
        if ! ip -n "dpcnn-$n" link show eth0 >/dev/null 2>&1; then
            ip link del "dpcnn-$n" 2>/dev/null
            ip link add "dpcnn-$n" type veth peer name eth0 netns "dpcnn-$n" &&
            ip link set "dpcnn-$n" master "$BR" && ip link set "dpcnn-$n" up &&
            ip -n "dpcnn-$n" addr add "${ADDR[$n]}/24" dev eth0 && ip -n "dpcnn-$n" link set eth0 up &&
            ip -n "dpcnn-$n" link set lo up || die "cannot wire node $n to $BR"
        fi
    done
}

# record NAME PID EXE: what alive() checks
record() { echo "$2" > "$DIR/pids/$1.pid"; readlink -f "$3" > "$DIR/pids/$1.exe"; }

start_munged() {
    alive munged && return 0
    # setpriv execs (runuser would fork), so $! is munged itself. One munged serves every node: a
    # pathname Unix socket is reachable from every network namespace.
    setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
        --socket="$DIR/munge/munge.sock" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
        >> "$DIR/log/munged.out" 2>&1 < /dev/null 9<&- &
    record munged $! /usr/sbin/munged
    for _ in $(seq 100); do
        munge -S "$DIR/munge/munge.sock" -n > /dev/null 2>&1 && return 0
        alive munged || break
        sleep 0.05
    done
    die "munged did not start: $(tail -n 1 "$DIR/log/munged.out" "$DIR/munge/munged.log" 2>/dev/null | grep -v '^==' | tail -n 1)"
}

start_slurm_daemon() {   # start_slurm_daemon NODE: slurmctld on head, slurmd on nodeA/nodeB
    local node=$1 name exe args
    if [[ $node == head ]]; then
        # -c: forget the jobs and node states of an earlier cluster (-i would recover them)
        name=slurmctld exe=/usr/sbin/slurmctld args="-D -c -f $DIR/slurm.conf"
    else
        name=slurmd.$node exe=/usr/sbin/slurmd args="-D -N $node -f $DIR/slurm.conf"
    fi
    alive "$name" && return 0
    DPCNN_CLUSTER_DIR=$DIR DPCNN_CLUSTER_CPUS="" setsid "$HERE/netns-ssh" "$node" exec "$exe" $args \
        >> "$DIR/log/$name.out" 2>&1 < /dev/null 9<&- &
    record "$name" $! "$exe"
}

node_states() { timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null; }

wait_idle() {   # wait_idle NODE...: until every NODE is idle (at most 30 s); fail fast if a daemon died
    local states d missing
    for _ in $(seq 300); do
        states=$(node_states)
        missing=0
        for n in "$@"; do grep -q "^$n idle$" <<< "$states" || missing=1; done
        ((missing == 0)) && return 0
        for d in slurmctld "${@/#/slurmd.}"; do
            alive "$d" || { say "$d died: $(tail -n 2 "$DIR/log/$d.out" | tr '\n' ' ')"; return 1; }
        done
        sleep 0.1
    done
    say "nodes not idle after 30 s: $(echo $states); see $DIR/log"
    [[ $(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null) == 1 ]] &&
        say "bridged traffic passes iptables (net.bridge.bridge-nf-call-iptables=1): a FORWARD policy DROP blocks it"
    return 1
}

start() {
    check_requirements
    if running; then say "already running in $DIR"; node_states >&2; return 0; fi
    check_ours
    local t0; t0=$(now)
    [[ -e $MARK || -e /sys/class/net/$BR ]] && stop quiet           # leftovers of a failed start
    write_files
    net_up
    start_munged
    for n in "${NODES[@]}"; do start_slurm_daemon "$n"; done
    if ! wait_idle nodeA nodeB; then stop quiet; exit 1; fi
    say "up in $(since "$t0") s: nodes nodeA (${ADDR[nodeA]}) and nodeB (${ADDR[nodeB]}) idle;" \
        "export SLURM_CONF=$DIR/slurm.conf"
}

net_down() {   # end whatever still runs on the nodes, delete namespaces, veths, bridge
    local n left
    for n in "${NODES[@]}"; do
        if [[ -e /run/netns/dpcnn-$n ]]; then
            # job steps, ranks, hydra proxies, shells: they would keep the namespace alive
            left=$(for p in $(ip netns pids "dpcnn-$n" 2>/dev/null); do live "$p" && echo "$p"; done)
            if [[ -n $left ]]; then
                [[ ${1:-} == quiet ]] || say "killing what still ran on $n: $(echo $left)"
                kill -KILL $left 2>/dev/null
            fi
            ip netns del "dpcnn-$n"
        fi
        ip link del "dpcnn-$n" 2>/dev/null
    done
    [[ ! -e /sys/class/net/$BR ]] || ip link del "$BR"
    if [[ -d /run/netns && -z $(ls -A /run/netns) ]]; then     # unless other namespaces use it now
        [[ -e $DIR/made-run-netns-mount ]] && umount /run/netns
        [[ -e $DIR/made-run-netns-dir ]] && rmdir /run/netns
    fi
    return 0
}

stop() {
    local t0 pids=() names=() d i left
    t0=$(now)
    # the daemons start recorded (exe-checked)
    for d in slurmd.nodeA slurmd.nodeB slurmctld munged; do
        alive "$d" && { pids+=("$(cat "$DIR/pids/$d.pid")"); names+=("$d"); }
    done
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null
        # idle daemons exit at once; one still ending a job or talking to a lost node may take
        # longer: 3 s, then SIGKILL
        for _ in $(seq 60); do left=""; for p in "${pids[@]}"; do live "$p" && left=1; done; [[ -z $left ]] && break; sleep 0.05; done
        for i in "${!pids[@]}"; do
            live "${pids[$i]}" || continue
            [[ ${1:-} == quiet ]] || say "${names[$i]} (pid ${pids[$i]}) still running 3 s after SIGTERM: SIGKILL"
            kill -KILL "${pids[$i]}" 2>/dev/null
        done
    fi
    if ours; then
        net_down "${1:-}"
    else
        say "not touching $BR and the dpcnn-* namespaces: they belong to the cluster in $(owner)"
    fi
    [[ -e $MARK ]] && rm -rf "$DIR"
    [[ ${1:-} == quiet ]] || say "stopped in $(since "$t0") s"
}

restart_node() {   # start NODE's slurmd again and wait until the node is idle
    local node=${1:-} t0; t0=$(now)
    [[ $node == nodeA || $node == nodeB ]] || die "usage: $0 restart-node nodeA|nodeB"
    check_requirements
    alive slurmctld || die "the cluster is not running ($0 start)"
    [[ -e /run/netns/dpcnn-$node ]] || die "node $node has no network namespace ($0 stop; $0 start)"
    start_slurm_daemon "$node"
    wait_idle "$node" || exit 1
    say "$node idle after $(since "$t0") s"
}

status() {
    local d n
    for n in "${NODES[@]}"; do
        [[ -e /run/netns/dpcnn-$n ]] && echo "$n: namespace dpcnn-$n, $(ip -n "dpcnn-$n" -br addr show eth0 2>/dev/null | awk '{ print $2, $3 }')"
    done
    for d in $(daemons); do
        alive "$d" && echo "$d: pid $(cat "$DIR/pids/$d.pid")" || echo "$d: not running"
    done
    if running; then
        echo "SLURM_CONF=$DIR/slurm.conf"; timeout 10 sinfo -N; timeout 10 squeue
    else
        echo "not running"; return 1
    fi
}

# one start/stop at a time (a lock on this script itself: no lock file to leave behind; the
# daemons must not inherit fd 9, or they would hold the lock for as long as they run)
exec 9< "${BASH_SOURCE[0]}"
case ${1:-} in
    start) flock 9; start ;;
    stop) flock 9; stop ;;
    status) status ;;
    restart-node) flock 9; restart_node "${2:-}" ;;
    *) echo "usage: $0 start|stop|status|restart-node nodeA|nodeB" >&2; exit 2 ;;
esac
