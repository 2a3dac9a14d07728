#!/usr/bin/env bash
# A real single-node SLURM on this machine for the batch-system tests: munge, slurmctld and
# slurmd from Debian's packages, started by hand (no systemd), plus slurm-wlm-torque (qsub,
# qstat, qdel over the same SLURM) for the PBS path. Needs root. Idempotent: a daemon that
# runs with an unchanged config is left alone.
#
#   bash scripts/local-slurm.sh start    # install if needed, configure, start, wait until idle
#   bash scripts/local-slurm.sh stop     # stop the daemons this script started (PID files)
#   bash scripts/local-slurm.sh status
#
# Learnt from /work/shared/notes/local-slurm-recipe.sh (see local-slurm.md beside it).
set -euo pipefail

ACTION=${1:-start}
CONF=/etc/slurm/slurm.conf
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
TIMEOUT=60
PACKAGES=(slurmctld slurmd slurm-client slurm-wlm-torque munge openmpi-bin libpmix-dev)

log() { echo "[local-slurm] $*" >&2; }
die() { echo "[local-slurm] error: $*" >&2; exit 1; }

alive() { # $1 = pid file; a zombie (exited, not yet reaped) counts as dead
  local pid
  pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] || return 1  # a daemon removes it on exit
  kill -0 "$pid" 2>/dev/null && ! grep -qs '^State:[[:space:]]*Z' "/proc/$pid/status"
}

stop_daemon() { # $1 = name, $2 = pid file
  alive "$2" || { rm -f "$2"; return 0; }
  local pid
  pid=$(cat "$2")
  log "stopping $1 (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 75); do alive "$2" || break; sleep 0.2; done
  alive "$2" && { log "$1 ignored SIGTERM; killing it"; kill -9 "$pid" 2>/dev/null || true; }
  rm -f "$2"
}

stop() {
  stop_daemon slurmd "$SLURMD_PID"
  stop_daemon slurmctld "$CTLD_PID"
  stop_daemon munged "$MUNGE_PID"
}

status() {
  local entry
  for entry in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
    if alive "${entry#*:}"; then echo "${entry%%:*} running (pid $(cat "${entry#*:}"))"
    else echo "${entry%%:*} not running"; fi
  done
  command -v sinfo >/dev/null && timeout 10 sinfo -N -o '%N %T %c %m' || true
}

install_packages() {
  local missing=() package
  for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/tmp/local-slurm-apt.log 2>&1 \
    || { cat /tmp/local-slurm-apt.log >&2; die "apt-get update failed"; }
  apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null \
    >>/tmp/local-slurm-apt.log 2>&1 || { tail -30 /tmp/local-slurm-apt.log >&2; die "apt-get install failed"; }
}

start_munge() {
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
  if ! alive "$MUNGE_PID" && ! munge_ok; then
    log "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
  fi
  for _ in $(seq 1 50); do munge_ok && return 0; sleep 0.1; done
  die "munge round trip failed (see /var/log/munge/munged.log)"
}

# Writes slurm.conf; returns 0 when it changed (the daemons then need a full restart:
# `scontrol reconfigure` does not apply node CPU counts).
write_config() {
  local host memory new
  host=$(hostname -s)
  memory=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >>/etc/hosts
  mkdir -p /etc/slurm/plugstack.conf.d "$RUN_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
  # spank_pbs sets PBS_JOBID, PBS_O_WORKDIR, ... in jobs, also those qsub submits.
  echo 'required /usr/lib/x86_64-linux-gnu/slurm-wlm/spank_pbs.so' \
    >/etc/slurm/plugstack.conf.d/pbs.conf
  new=$(mktemp)
  # 8 CPUs whatever the real count (config_overrides): tests ask for several tasks on a
  # 2-core machine. No accounting daemon: sacct says so, and status falls back.
  cat >"$new" <<CONF
# written by rankmesh scripts/local-slurm.sh: a one-node test cluster
ClusterName=rankmesh-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
StateSaveLocation=/var/spool/slurmctld
SlurmdPidFile=$SLURMD_PID
SlurmdSpoolDir=/var/spool/slurmd
SlurmdLogFile=$LOG_DIR/slurmd.log
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=8 Boards=1 SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=${memory:-1000} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  if cmp -s "$new" "$CONF"; then rm -f "$new"; return 1; fi
  log "writing $CONF"
  install -m 0644 "$new" "$CONF"
  rm -f "$new"
  return 0
}

start() {
  [ "$(id -u)" = 0 ] || die "must run as root (apt-get, munge and the SLURM daemons)"
  local t0=$SECONDS
  install_packages
  start_munge
  if write_config; then
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
  fi
  if ! alive "$CTLD_PID"; then
    log "starting slurmctld"
    slurmctld || die "slurmctld did not start: $(tail -5 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
  fi
  local deadline=$((SECONDS + TIMEOUT))
  until timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; do
    [ $SECONDS -lt $deadline ] || die "slurmctld does not answer; see $LOG_DIR/slurmctld.log"
    sleep 0.2
  done
  if ! alive "$SLURMD_PID"; then
    log "starting slurmd"
    slurmd || die "slurmd did not start; see $LOG_DIR/slurmd.log"
  fi
  local host state
  host=$(hostname -s)
  deadline=$((SECONDS + TIMEOUT))
  while :; do
    state=$(timeout 5 sinfo -h -N -n "$host" -o %T 2>/dev/null || true)
    case "$state" in
      idle|mixed|allocated) break ;;
      down*|drain*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    [ $SECONDS -lt $deadline ] || die "node $host is '${state:-missing}' after ${TIMEOUT}s; see $LOG_DIR/slurmd.log"
    sleep 0.5
  done
  log "SLURM ready in $((SECONDS - t0))s (node $host $state)"
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "unknown action '$ACTION' (start|stop|status)" ;;
esac
