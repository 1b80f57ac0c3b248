#!/usr/bin/env bash
# Copy of the measured local-SLURM script from the project notes; driven by tests/launch/slurm_cluster.py.
# Bring up a local SLURM "cluster" on this host: munged [+ mariadbd + slurmdbd] + slurmctld + N x slurmd.
# No systemd, no cgroups; every daemon runs in the foreground (-D/-F) under setsid, PID recorded in
# $SLURM_LOCAL_ROOT/run/<daemon>.pid (stop_local_slurm.sh kills exactly those). Idempotent.
#
# Env knobs:
#   SLURM_LOCAL_ROOT   (default ${TMPDIR:-/tmp}/lopd-slurm)   all state/logs/pids/socket live here
#   SLURM_LOCAL_CPUS   (default: nproc)             CPUs advertised for the node (may exceed nproc,
#                                                   config_overrides is set so slurmd trusts slurm.conf)
#   SLURM_LOCAL_NODES  (default 1)                  >1: run N slurmd on this host (node names n1..nN, distinct
#                                                   ports) -> multi-node (--nodes=2) and heterogeneous jobs work
#   SLURM_LOCAL_GPUS   (default 0)                  fake gres/gpu per node (mknod'ed /dev/null clones as
#                                                   File=; lets --gpus-per-node/--gres=gpu:N scripts schedule,
#                                                   CUDA_VISIBLE_DEVICES gets set)
#   SLURM_LOCAL_PARTITIONS (default "debug")        space separated partition names; first is Default
#   SLURM_LOCAL_ACCT   (default 1 if slurmdbd+mariadbd installed) run MariaDB (127.0.0.1:3307) + slurmdbd
#                                                   so that `sacct` works (nemo-run's SlurmExecutor polls
#                                                   `sacct --parsable2 -j ID` for status and CANCELS the job
#                                                   after 30 consecutive sacct failures)
#   SLURM_LOCAL_ETC    (default 1)                  also symlink /etc/slurm/slurm.conf -> generated conf
#                                                   (otherwise export SLURM_CONF=$SLURM_LOCAL_ROOT/etc/slurm.conf)
# Requires (Debian 12): apt-get install -y --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge
#                      [slurmdbd mariadb-server]     -> slurm 22.05.8, munge 0.5.15, mariadb 10.11
# After a node-definition change (CPUS/GPUS/NODES) run stop_local_slurm.sh first (PURGE=1 if node names change).
set -euo pipefail

ROOT=${SLURM_LOCAL_ROOT:-${TMPDIR:-/tmp}/lopd-slurm}
if [[ -z ${SLURM_LOCAL_ACCT:-} ]]; then
  if [[ -x /usr/sbin/slurmdbd && -x /usr/sbin/mariadbd ]]; then SLURM_LOCAL_ACCT=1; else SLURM_LOCAL_ACCT=0; fi
fi
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
GPUS=${SLURM_LOCAL_GPUS:-0}
PARTS=${SLURM_LOCAL_PARTITIONS:-debug}
NNODES=${SLURM_LOCAL_NODES:-1}
if ((NNODES > 1)); then NODES=(); for ((k = 1; k <= NNODES; k++)); do NODES+=("n$k"); done; else NODES=(localhost); fi
NODE=${NODES[0]}
ETC=$ROOT/etc RUN=$ROOT/run LOG=$ROOT/log STATE=$ROOT/state MUNGE=$ROOT/munge
CONF=$ETC/slurm.conf
export SLURM_CONF=$CONF
t0=$(date +%s.%N)

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() { # wait_for <seconds> <cmd...>
  local n=$(( $1 * 10 )); shift
  for ((i = 0; i < n; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/d" "$MUNGE"

# ---------------------------------------------------------------- munge
# munged refuses insecure paths: key must be owned by the daemon user, mode 0400/0600; the
# socket dir must not be group/world-writable. We run munged as the 'munge' user (created by
# the Debian package) with every path redirected under $ROOT/munge.
id munge >/dev/null 2>&1 || useradd -r -s /usr/sbin/nologin munge
install -d -o munge -g munge -m 0700 "$MUNGE/etc" "$MUNGE/lib" "$MUNGE/log"
install -d -o munge -g munge -m 0755 "$MUNGE/run"
if [[ ! -s $MUNGE/etc/munge.key ]]; then
  mungekey --create --keyfile="$MUNGE/etc/munge.key" --force
  chown munge:munge "$MUNGE/etc/munge.key"; chmod 0600 "$MUNGE/etc/munge.key"
fi
SOCK=$MUNGE/run/munge.socket.2
if ! alive "$RUN/munged.pid"; then
  rm -f "$SOCK" "$SOCK.lock"
  setsid runuser -u munge -- /usr/sbin/munged -F \
      --socket="$SOCK" --key-file="$MUNGE/etc/munge.key" --pid-file="$MUNGE/run/munged.pid" \
      --log-file="$MUNGE/log/munged.log" --seed-file="$MUNGE/lib/munged.seed" \
      >"$LOG/munged.out" 2>&1 </dev/null &
  echo $! >"$RUN/munged.pid"   # pid of runuser; it forwards SIGTERM to munged
  wait_for 10 bash -c "munge -n -S '$SOCK' | unmunge -S '$SOCK'" || { cat "$LOG/munged.out"; echo "munged failed" >&2; exit 1; }
fi

# ---------------------------------------------------------------- accounting (optional)
DB=$ROOT/mysql DBD_PORT=6819 DB_PORT=3307 DB_PASS=slurmci
if [[ $SLURM_LOCAL_ACCT == 1 ]]; then
  install -d -o mysql -g mysql -m 0750 "$DB"
  if [[ ! -d $DB/data/mysql ]]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB/data" \
      --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1
  fi
  if ! alive "$RUN/mariadbd.pid"; then
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB/data" --socket="$DB/mysqld.sock" \
      --pid-file="$DB/mysqld.pid" --bind-address=127.0.0.1 --port=$DB_PORT --skip-name-resolve \
      --innodb-buffer-pool-size=64M --log-error="$LOG/mariadbd.err" >"$LOG/mariadbd.out" 2>&1 </dev/null &
    echo $! >"$RUN/mariadbd.pid"
  fi
  MYSQL=(mariadb --no-defaults -S "$DB/mysqld.sock" -uroot)
  wait_for 30 "${MYSQL[@]}" -e 'select 1' || { tail "$LOG/mariadbd.err"; echo "mariadbd failed" >&2; exit 1; }
  "${MYSQL[@]}" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
                    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.daemon.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 0600 "$ETC/slurmdbd.conf"   # slurmdbd refuses a conf readable by others
  if ! alive "$RUN/slurmdbd.pid"; then
    # slurmdbd has no -f; it reads $SLURM_CONF's directory/slurmdbd.conf
    setsid /usr/sbin/slurmdbd -D >"$LOG/slurmdbd.out" 2>&1 </dev/null &
    echo $! >"$RUN/slurmdbd.pid"
  fi
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# for connections to slurmdbd, slurm uses AccountingStoragePass as the munge socket path
# (AuthInfo=socket= is NOT used there) -> without this sacct/sacctmgr look for /run/munge/...
AccountingStoragePass=$SOCK
JobAcctGatherType=jobacct_gather/linux"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# ---------------------------------------------------------------- slurm.conf
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2/1024*0.9}' /proc/meminfo)
GRES_NODE="" GRES_TYPES=""
if (( GPUS > 0 )); then
  GRES_NODE="Gres=gpu:$GPUS"; GRES_TYPES="GresTypes=gpu"
  # slurmd only counts gres/gpu that have File= entries; fake them with /dev/null-like char devices
  mkdir -p "$ROOT/dev"
  for ((g = 0; g < GPUS; g++)); do [[ -e $ROOT/dev/nvidia$g ]] || mknod -m 666 "$ROOT/dev/nvidia$g" c 1 3; done
  echo "Name=gpu File=$ROOT/dev/nvidia[0-$((GPUS - 1))]" >"$ETC/gres.conf"
fi
NODE_LINES="" port=6818
for n in "${NODES[@]}"; do
  NODE_LINES+="NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=$MEM_MB $GRES_NODE State=UNKNOWN"$'\n'
  port=$((port + 2))
done
first=1 PART_LINES=""
for p in $PARTS; do
  d=NO; ((first)) && d=YES; first=0
  PART_LINES+="PartitionName=$p Nodes=ALL Default=$d MaxTime=INFINITE State=UP OverSubscribe=NO"$'\n'
done
cat >"$CONF.tmp" <<EOF
# generated by start_local_slurm.sh
ClusterName=localci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd-%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups anywhere
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$ACCT_LINES
JobAcctGatherFrequency=30
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# job completion records also go to a text file (readable with "sacct -c" even without slurmdbd)
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
# keep finished jobs visible to 'scontrol show job' for 10 min
MinJobAge=600
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
MaxArraySize=1001
$GRES_TYPES
$NODE_LINES$PART_LINES
EOF
if ! cmp -s "$CONF.tmp" "$CONF"; then mv "$CONF.tmp" "$CONF"; CONF_CHANGED=1; else rm -f "$CONF.tmp"; CONF_CHANGED=0; fi
if [[ ${SLURM_LOCAL_ETC:-1} == 1 ]]; then
  mkdir -p /etc/slurm
  ln -sfn "$CONF" /etc/slurm/slurm.conf
  if (( GPUS > 0 )); then ln -sfn "$ETC/gres.conf" /etc/slurm/gres.conf; else rm -f /etc/slurm/gres.conf; fi
fi

# ---------------------------------------------------------------- slurmdbd readiness + cluster registration
if [[ $SLURM_LOCAL_ACCT == 1 ]]; then
  wait_for 30 sacctmgr -n list cluster || { tail "$LOG/slurmdbd.out" "$LOG/slurmdbd.log"; echo "slurmdbd failed" >&2; exit 1; }
  sacctmgr -n -P list cluster format=cluster | grep -qx localci || sacctmgr -i add cluster localci >/dev/null
fi

# ---------------------------------------------------------------- slurmctld
if ! alive "$RUN/slurmctld.pid"; then
  # -i: ignore/recover from stale state files; -c would clear all saved jobs
  setsid /usr/sbin/slurmctld -D -i -f "$CONF" >"$LOG/slurmctld.out" 2>&1 </dev/null &
  echo $! >"$RUN/slurmctld.pid"
elif ((CONF_CHANGED)); then
  scontrol reconfigure || true
fi
wait_for 30 bash -c "scontrol ping | grep -q UP" || { tail -n 20 "$LOG/slurmctld.out" "$LOG/slurmctld.log"; echo "slurmctld failed" >&2; exit 1; }

# ---------------------------------------------------------------- slurmd (one per node name)
for n in "${NODES[@]}"; do
  mkdir -p "$STATE/d/$n"
  if ! alive "$RUN/slurmd-$n.pid"; then
    setsid /usr/sbin/slurmd -D -N "$n" -f "$CONF" >"$LOG/slurmd-$n.out" 2>&1 </dev/null &
    echo $! >"$RUN/slurmd-$n.pid"
  fi
done
# every node must register; a node left DRAIN/DOWN by a previous config (e.g. gres mismatch) is resumed
for n in "${NODES[@]}"; do
  ready=0
  for ((i = 0; i < 300; i++)); do
    st=$(sinfo -h -N -n "$n" -o %t 2>/dev/null | head -n1 || true)
    case $st in
      idle|mix|alloc|comp) ready=1; break ;;
      drain*|drng|down|inval) ((i % 20 == 0)) && scontrol update nodename="$n" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.1
  done
  if ((!ready)); then
    tail -n 20 "$LOG/slurmd-$n.out" "$LOG/slurmctld.log"; sinfo -N -l; echo "slurmd $n not ready" >&2; exit 1
  fi
done

t1=$(date +%s.%N)
awk -v a="$t0" -v b="$t1" -v c="$CONF" 'BEGIN{printf "local slurm up in %.1fs (SLURM_CONF=%s)\n", b-a, c}'
sinfo
