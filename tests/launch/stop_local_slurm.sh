#!/usr/bin/env bash
# Copy of the measured local-SLURM script from the project notes; driven by tests/launch/slurm_cluster.py.
# Tear down what start_local_slurm.sh started, strictly by recorded PID.
#   PURGE=1  also delete $SLURM_LOCAL_ROOT (state, logs, munge key) and the /etc/slurm symlinks.
set -uo pipefail
ROOT=${SLURM_LOCAL_ROOT:-${TMPDIR:-/tmp}/lopd-slurm}
RUN=$ROOT/run
export SLURM_CONF=$ROOT/etc/slurm.conf

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# 1. cancel jobs still queued/running so their slurmstepd/user processes exit cleanly
if alive "$RUN/slurmctld.pid"; then
  scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
  scancel --full --quiet 2>/dev/null || true   # root: everything on this private cluster
  for _ in $(seq 1 50); do
    [[ -z $(squeue -h -t R,CG,PD -o %i 2>/dev/null) ]] && break; sleep 0.2
  done
fi

# 2. stop daemons in reverse order, by PID (SIGTERM, then SIGKILL after 10 s)
daemons=()
for f in "$RUN"/slurmd-*.pid "$RUN"/slurmd.pid; do [[ -e $f && $f != *.daemon.pid ]] && daemons+=("$(basename "$f" .pid)"); done
daemons+=(slurmctld slurmdbd mariadbd munged)
for d in "${daemons[@]}"; do
  f=$RUN/$d.pid
  if alive "$f"; then
    pid=$(cat "$f"); kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then echo "$d ($pid) did not stop, SIGKILL"; kill -KILL "$pid"; fi
    echo "stopped $d ($pid)"
  fi
  rm -f "$f"
done

# 3. any slurmstepd left behind belongs to this cluster (they daemonize away from slurmd);
#    identify them by PID via their spool dir in /proc/<pid>/cmdline... they only show
#    'slurmstepd: [jobid.step]', so we match on the exe path and report them.
left=()
for p in /proc/[0-9]*; do
  [[ $(readlink "$p/exe" 2>/dev/null) == /usr/sbin/slurmstepd* ]] && left+=("${p#/proc/}")
done
if ((${#left[@]})); then echo "killing leftover slurmstepd PIDs: ${left[*]}"; kill -KILL "${left[@]}" 2>/dev/null; fi

if [[ ${PURGE:-0} == 1 ]]; then
  for l in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    [[ -L $l && $(readlink "$l") == "$ROOT"/* ]] && rm -f "$l"
  done
  rm -rf "$ROOT"
  echo "purged $ROOT"
fi
