#!/usr/bin/env bash
# A real two-node SLURM cluster on this one host, for CI and for trying the sbatch scripts.
#
#   bash scripts/slurm_local.sh start    # install (apt) if missing, write the config, start munged,
#                                        # slurmctld and two slurmd (nodes n1, n2); idempotent
#   bash scripts/slurm_local.sh status   # daemons, nodes, queue
#   bash scripts/slurm_local.sh stop     # stop the daemons this script started
#
# Needs root (it writes /etc/slurm/slurm.conf and runs the daemons). Both nodes are this host:
# two `slurmd -N <node>` daemons with their own port, proctrack/linuxproc and task/none (no cgroups),
# so every job's working directory is naturally shared. JobRequeue=1 and a short cred_expire let
# `scontrol requeue` (what lit_cb does on SIGUSR1) restart a job within seconds.
# A slurm.conf not written by this script is never overwritten: start fails and says so.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by lit_cb scripts/slurm_local.sh"
NODES=(n1 n2)
NODE_PORTS=(6818 6819)
CTLD_PORT=6817
CPUS_PER_NODE=${SLURM_LOCAL_CPUS:-2}
STATE=/var/spool/slurmctld
LOGDIR=/var/log/slurm
RUNDIR=/run/lit_cb_slurm
CONF_CHANGED=0

log() { echo "[slurm_local] $*" >&2; }

print_logs() {
  log "---- daemon logs ----"
  for f in "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmd-*.log /var/log/munge/munged.log; do
    [[ -f $f ]] || continue
    echo "==== $f (last 40 lines) ====" >&2
    tail -n 40 "$f" >&2 || true
  done
}

fail() {
  log "ERROR: $*"
  print_logs
  exit 1
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  for bin in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${bin%%:*}" >/dev/null 2>&1 || missing+=("${bin##*:}")
  done
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || fail "missing ${missing[*]}; run as root so apt-get can install them"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
  if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    fail "$CONF exists and was not written by this script; refusing to overwrite a real cluster's config"
  fi
  local host
  host=$(hostname -s)
  mkdir -p /etc/slurm "$STATE" "$LOGDIR" "$RUNDIR"
  local tmp=$CONF.tmp
  {
    echo "$MARK"
    cat <<EOF
ClusterName=litcb
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire seconds before they may start again (default 120).
AuthInfo=cred_expire=5
StateSaveLocation=$STATE
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
EOF
    for i in "${!NODES[@]}"; do
      echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} CPUs=$CPUS_PER_NODE State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } >"$tmp"
  if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
  else
    mv "$tmp" "$CONF"
    CONF_CHANGED=1
  fi
  for n in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd/$n"; done
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "generating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile=/etc/munge/munge.key
    else
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
  for _ in $(seq 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  fail "munge credentials do not round-trip"
}

nodes_idle() {
  # every node answers and is idle/mixed/allocated (not down, drained or unknown)
  local states
  states=$(sinfo -h -N -o "%N %t" 2>/dev/null) || return 1
  [[ -n $states ]] || return 1
  ! grep -qvE " (idle|mix|alloc)$" <<<"$states"
}

start() {
  [[ $(id -u) == 0 ]] || fail "start needs root"
  install_packages
  write_config
  if ((CONF_CHANGED)) && alive "$RUNDIR/slurmctld.pid"; then
    log "slurm.conf changed: restarting the daemons"
    stop
  fi
  start_munge
  if ! alive "$RUNDIR/slurmctld.pid"; then
    log "starting slurmctld"
    slurmctld || fail "slurmctld did not start"
  fi
  for _ in $(seq 40); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
  scontrol ping 2>/dev/null | grep -q UP || fail "slurmctld does not answer scontrol ping"
  for n in "${NODES[@]}"; do
    if ! alive "$RUNDIR/slurmd-$n.pid"; then
      log "starting slurmd -N $n"
      slurmd -N "$n" || fail "slurmd -N $n did not start"
    fi
  done
  for _ in $(seq 60); do nodes_idle && break; sleep 1; done
  if ! nodes_idle; then
    # A node left DOWN by an earlier stop comes back once its slurmd answers.
    scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME 2>/dev/null || true
    for _ in $(seq 20); do nodes_idle && break; sleep 1; done
  fi
  nodes_idle || { sinfo -N >&2 || true; fail "nodes are not idle"; }
  log "cluster up: $(sinfo -h -N -o '%N:%t' | tr '\n' ' ')"
}

stop() {
  for n in "${NODES[@]}"; do
    if alive "$RUNDIR/slurmd-$n.pid"; then
      log "stopping slurmd $n"
      kill "$(cat "$RUNDIR/slurmd-$n.pid")"
    fi
  done
  if alive "$RUNDIR/slurmctld.pid"; then
    log "stopping slurmctld"
    kill "$(cat "$RUNDIR/slurmctld.pid")"
  fi
  for _ in $(seq 20); do
    local any=0
    for f in "$RUNDIR"/slurmctld.pid "$RUNDIR"/slurmd-*.pid; do alive "$f" && any=1; done
    ((any)) || break
    sleep 0.5
  done
  # munged is left running: it is harmless, and other munge users on the host may need it.
}

status() {
  local rc=0
  for f in "$RUNDIR"/slurmctld.pid "${NODES[@]/#/$RUNDIR/slurmd-}"; do
    f=${f%.pid}.pid
    if alive "$f"; then echo "running: $(basename "$f" .pid) (pid $(cat "$f"))"; else echo "stopped: $(basename "$f" .pid)"; rc=1; fi
  done
  if ((rc == 0)); then
    sinfo -N
    squeue
  fi
  return $rc
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  logs) print_logs ;;
  *)
    echo "usage: $0 start|stop|status|logs" >&2
    exit 2
    ;;
esac
