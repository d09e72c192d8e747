#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for testing examples/slurm/ (needs root and Debian's packages):
#   tools/slurm_cluster.sh start DIR   install slurm-wlm and munge if missing, then start munged, slurmctld and two
#                                      slurmd daemons (nodes n1 and n2 at 127.0.0.1, one CPU each); everything they
#                                      write stays in DIR (config, keys, spool, logs, pid files)
#   tools/slurm_cluster.sh stop DIR    stop the daemons started from DIR, by the PIDs they recorded there
# Use it with SLURM_CONF=DIR/slurm.conf for sbatch, squeue and scontrol. Nothing in /etc is changed: the config and
# the munge socket live in DIR, so a Slurm or munge already running on this machine is left alone.
set -euo pipefail

command="${1:-}"
DIR="$(realpath -m "${2:-/tmp/gpt-trainer-slurm}")"

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" -eq 0 ] || { echo "Slurm is not installed and installing it needs root" >&2; return 1; }
  command -v apt-get >/dev/null || { echo "Slurm is not installed and this machine has no apt-get" >&2; return 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
  local host; host="$(hostname -s)"
  mkdir -p "$DIR/state" "$DIR/log"
  cat > "$DIR/slurm.conf" <<EOF
ClusterName=gpt-trainer-test
SlurmctldHost=$host
SlurmctldPort=16817
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it may start again (120 s by default)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdSpoolDir=$DIR/spool-%n
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SchedulerType=sched/builtin
# look for startable jobs every 2 s (a requeued job becomes startable by time, not by an event)
SchedulerParameters=sched_interval=2
KillWait=30
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=1 RealMemory=8000
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=1 RealMemory=8000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  # munged checks that its key and folders belong to it and that no one else may write them
  mkdir -p "$DIR/munge"
  [ -f "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chown -R munge:munge "$DIR/munge" && chmod 711 "$DIR/munge" && chmod 400 "$DIR/munge/munge.key"
  runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
}

wait_for_idle_nodes() {
  for _ in $(seq 60); do
    [ "$(SLURM_CONF="$DIR/slurm.conf" sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -eq 2 ] && return 0
    sleep 0.5
  done
  echo "the two Slurm nodes did not come up; logs in $DIR/log" >&2
  SLURM_CONF="$DIR/slurm.conf" sinfo -N >&2 || true
  return 1
}

start() {
  install
  write_config
  start_munge
  export SLURM_CONF="$DIR/slurm.conf"
  slurmctld -c  # -c: a clean start, no jobs from an earlier test
  for node in n1 n2; do
    mkdir -p "$DIR/spool-$node"
    slurmd -N "$node"
  done
  wait_for_idle_nodes
  echo "Slurm is up: nodes n1 and n2; export SLURM_CONF=$DIR/slurm.conf"
}

stop_pid_in() {
  local pid_file="$1"
  [ -f "$pid_file" ] || return 0
  local pid; pid="$(cat "$pid_file")"
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -f "$pid_file"
}

stop() {
  # by the PIDs recorded in DIR only: never a daemon this script did not start
  for pid_file in "$DIR"/slurmd-n1.pid "$DIR"/slurmd-n2.pid "$DIR"/slurmctld.pid "$DIR"/munge/munged.pid; do
    stop_pid_in "$pid_file"
  done
}

case "$command" in
  start) start ;;
  stop) stop ;;
  *) sed -n '2,8p' "$0" >&2; exit 2 ;;
esac
