#!/usr/bin/env bash
# A real single-node SLURM on this machine, with fake GPUs, for tests/test_slurm.py.
#
#   scripts/slurm_test_cluster.sh up           # install if missing, configure, start; idempotent
#   scripts/slurm_test_cluster.sh down [NAME]  # stop munged/slurmctld/slurmd (default: all three)
#   scripts/slurm_test_cluster.sh status       # sinfo, or exit 1 when the cluster is not up
#
# Debian's slurm-wlm and munge (22.05): munged runs as the munge user, then
# slurmctld and slurmd with no accounting (Snakemake checks job status with
# squeue). The node offers $GPUS "GPUs" through gres: character devices
# /dev/fakegpu0.. made with mknod, so `sbatch --gpus=2` gets
# CUDA_VISIBLE_DEVICES=0,1 while torch still sees no CUDA.
#
# `up` prints the daemons it started ("started: munged slurmctld slurmd"), or
# "running" when everything was already up with this configuration, so a caller
# can stop exactly what it started (`down munged slurmctld slurmd`). Needs root
# (apt-get, mknod, daemons); exits with 3 when it cannot set the cluster up here.
set -euo pipefail

PARTITION=${ITERALIGN_SLURM_PARTITION:-iteralign}
GPUS=${ITERALIGN_SLURM_GPUS:-4}
STATE=/var/lib/iteralign-slurm
CONF_DIR=/etc/slurm
HOST=$(hostname -s)

die() { echo "slurm_test_cluster: $*" >&2; exit "${2:-1}"; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and there is no apt-get here" 3
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; } \
        || die "apt-get install slurm-wlm munge failed" 3
}

write_config() {
    local cpus mem_mb gpu_last
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    gpu_last=$((GPUS - 1))
    mkdir -p "$STATE/ctld" "$STATE/d" "$CONF_DIR"
    cat >"$STATE/slurm.conf.new" <<EOF
# Written by scripts/slurm_test_cluster.sh: a one-node test cluster with fake GPUs.
ClusterName=iteralign
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=300
# Answers on one node take milliseconds; while the cluster is down, every client call
# (the SLURM executor plugin runs `scontrol show config` whenever Snakemake starts)
# then fails after about 1 s instead of the default 10 s timeout.
MessageTimeout=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$STATE/gres.conf.new" <<EOF
AutoDetect=off
Name=gpu File=/dev/fakegpu[0-$gpu_last]
EOF
    for ((i = 0; i < GPUS; i++)); do
        [[ -c /dev/fakegpu$i ]] || mknod "/dev/fakegpu$i" c 1 3  # same device numbers as /dev/null
    done
    changed=0
    for name in slurm.conf gres.conf; do
        if ! cmp -s "$STATE/$name.new" "$CONF_DIR/$name"; then
            mv "$STATE/$name.new" "$CONF_DIR/$name"
            changed=1
        else
            rm "$STATE/$name.new"
        fi
    done
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create >/dev/null
    runuser -u munge -- munged
    started+=" munged"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
    die "munged did not come up"
}

stop_daemon() {  # pid file
    pid_alive "$1" || return 0
    local pid
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

start_slurm() {
    if [[ $changed == 1 ]]; then
        stop_daemon "$STATE/slurmd.pid"
        stop_daemon "$STATE/slurmctld.pid"
    fi
    if ! pid_alive "$STATE/slurmctld.pid"; then
        slurmctld
        started+=" slurmctld"
    fi
    for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
    scontrol ping | grep -q UP || die "slurmctld did not answer; see $STATE/slurmctld.log"
    if ! pid_alive "$STATE/slurmd.pid"; then
        slurmd
        started+=" slurmd"
    fi
}

wait_for_node() {
    local state
    for _ in $(seq 150); do
        state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1)
        case $state in
            idle | mixed | allocated) return ;;
            drain* | down*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    die "node $HOST is '$state', not idle; see $STATE/slurmd.log"
}

up() {
    [[ $(id -u) == 0 ]] || die "needs root (apt-get, mknod, daemons)" 3
    install_packages
    started=""
    write_config
    start_munge
    start_slurm
    wait_for_node
    if [[ -n $started ]]; then echo "started:$started"; else echo running; fi
}

down() {  # [daemon ...]: slurmd, slurmctld, munged (default: all three)
    local name names=("$@")
    [[ ${#names[@]} -gt 0 ]] || names=(slurmd slurmctld munged)
    for name in "${names[@]}"; do
        case $name in
            slurmd | slurmctld) stop_daemon "$STATE/$name.pid" ;;
            munged) stop_daemon /run/munge/munged.pid ;;
            *) die "down: unknown daemon '$name'" 2 ;;
        esac
    done
}

case ${1:-} in
    up) up ;;
    down) shift; down "$@" ;;
    status) sinfo ;;
    *) die "usage: $0 up|down|status" 2 ;;
esac
