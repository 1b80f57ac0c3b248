#!/bin/bash
#SBATCH --job-name=lopd-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=20:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=lopd-8b-%j.out
#
# Lightning OPD training of the 8B student (Qwen3-8B-Base after SFT, teacher store by Qwen3-32B):
# one node with 8 GPUs, TP 4 + sequence parallel, the paper's hyper-parameters (trainer preset
# `lightning_opd`). Multi-node: --nodes=N. Requeue-safe: on SIGTERM (preemption, `scontrol
# requeue`, `scancel --signal=TERM`) or SIGUSR1 (sent 600 s before the time limit by the
# --signal line above) the trainer finishes its step, checkpoints and exits; this script then
# requeues the job, which resumes from that checkpoint in LOPD_RUN_DIR.
#
#   bash  slurm/lightning_opd_8b.sh [SBATCH OPTIONS]   check the inputs here, then submit this script
#   bash  slurm/lightning_opd_8b.sh --check            only check the inputs
#   sbatch [SBATCH OPTIONS] slurm/lightning_opd_8b.sh  submit directly (the checks run at job start)
#
# Bad input (a missing variable, a store that is incomplete or scored by another teacher than
# the one that wrote the SFT data, a checkpoint path that does not exist, an unknown partition)
# fails with one clear line before anything waits in the queue when submitted with `bash`.
#
# Required environment:
#   LOPD_STORE          teacher store (`lopd score ... --finalize`)
#   LOPD_START_FROM     the SFT model R the student starts from (HF dir or Megatron checkpoint);
#                       it must be the policy that sampled the rollouts in the store
#   LOPD_RUN_DIR        run directory: checkpoints, metrics.jsonl, logs/
# Optional environment:
#   LOPD_SFT_DATA       SFT data artifact: its generator must be the store's teacher (teacher consistency)
#   LOPD_TRAIN_CONFIG   trainer preset or config file (default lightning_opd)
#   LOPD_TRAIN_ARGS     extra trainer overrides, space separated key=value (e.g. "optimizer.lr=1e-6 train_steps=200")
#   LOPD_TP / LOPD_SP   tensor parallel size (default 4) / sequence parallel (default true)
#   LOPD_RESUME         auto (default: latest checkpoint in LOPD_RUN_DIR) | none | a checkpoint directory
#   LOPD_VENV           virtual environment to activate (its lopd and torch are used)
#   LOPD_CONTAINER_IMAGE / LOPD_CONTAINER_MOUNTS   run the ranks in a container (pyxis/enroot)
#   NPROC_PER_NODE      ranks per node (default: the GPUs allocated on the node, else 8)
#   LOPD_LAUNCHER       torchrun (default: one srun task per node) | srun (one srun task per rank)
#   LOPD_DEVICE         cuda (default) | cpu (CPU-only test clusters: gloo, no NCCL settings)
#   MASTER_ADDR         rendezvous host (default: 127.0.0.1 on one node, else the first node of the job)
#   MASTER_PORT         rendezvous port (default 20000 + 10 x (job id % 1000) + restart % 10: a
#                       requeued job never meets its previous life's port in TIME_WAIT)
#   LOPD_LOG_DIR        per-job logs (default LOPD_RUN_DIR/logs): <job name>-<job id>-r<restart>.log
#   LOPD_STOP_GRACE     seconds torchrun lets the ranks checkpoint after a stop signal before it
#                       kills them (default 540; keep it below the --signal lead time)
set -euo pipefail

PROG=lightning_opd_8b.sh
die() { echo "$PROG: error: $*" >&2; exit 2; }

if [[ -n ${LOPD_VENV:-} ]]; then
  [[ -f $LOPD_VENV/bin/activate ]] || die "LOPD_VENV=$LOPD_VENV is not a virtual environment (no bin/activate) (fix: point it at the venv with megatron-lopd installed)"
  # shellcheck disable=SC1091
  source "$LOPD_VENV/bin/activate"
fi

TRAIN_CONFIG=${LOPD_TRAIN_CONFIG:-lightning_opd}
TP=${LOPD_TP:-4}
SP=${LOPD_SP:-true}
RESUME=${LOPD_RESUME:-auto}
DEVICE=${LOPD_DEVICE:-cuda}
LAUNCHER=${LOPD_LAUNCHER:-torchrun}

check_inputs() {
  local missing=()
  for v in LOPD_STORE LOPD_START_FROM LOPD_RUN_DIR; do [[ -n ${!v:-} ]] || missing+=("$v"); done
  ((${#missing[@]} == 0)) || die "${missing[*]} not set (fix: export LOPD_STORE=<teacher store> LOPD_START_FROM=<SFT model> LOPD_RUN_DIR=<output dir>; see the top of $PROG)"
  [[ -e $LOPD_STORE ]] || die "LOPD_STORE=$LOPD_STORE does not exist (fix: point it at the store written by \`lopd score --finalize\`)"
  [[ -e $LOPD_START_FROM ]] || die "LOPD_START_FROM=$LOPD_START_FROM does not exist (fix: point it at the SFT model the rollouts were sampled with)"
  [[ -z ${LOPD_SFT_DATA:-} || -e $LOPD_SFT_DATA ]] || die "LOPD_SFT_DATA=$LOPD_SFT_DATA does not exist (fix: point it at the SFT data artifact, or unset it)"
  case $RESUME in
    auto | none) ;;
    *) [[ -d $RESUME ]] || die "LOPD_RESUME=$RESUME: checkpoint directory does not exist (fix: use auto, none or an existing checkpoint)" ;;
  esac
  case $DEVICE in cuda | cpu) ;; *) die "LOPD_DEVICE=$DEVICE (fix: use cuda or cpu)" ;; esac
  case $LAUNCHER in torchrun | srun) ;; *) die "LOPD_LAUNCHER=$LAUNCHER (fix: use torchrun or srun)" ;; esac
  [[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$NPROC is not a positive integer"
  ((${#IN_ENV[@]})) || command -v lopd >/dev/null ||
    die "\`lopd\` not on PATH (fix: set LOPD_VENV=<venv with megatron-lopd> or activate it before submitting)"
  # The library validates the rest: trainer config and overrides, parallel layout against the
  # world size, store complete with valid checksums, teacher and policy consistency.
  "${IN_ENV[@]}" lopd pipeline check-train --config "$TRAIN_CONFIG" --world-size "$WORLD_SIZE" "${TRAIN_ARGS[@]}" ||
    die "input check failed (see above); nothing was submitted"
}
# Where `lopd` runs: here, or inside the job in the container (one task) when one is named.
IN_ENV=()
CONTAINER=()
if [[ -n ${LOPD_CONTAINER_IMAGE:-} ]]; then
  CONTAINER=(--container-image="$LOPD_CONTAINER_IMAGE" --no-container-mount-home)
  [[ -n ${LOPD_CONTAINER_MOUNTS:-} ]] && CONTAINER+=(--container-mounts="$LOPD_CONTAINER_MOUNTS")
  [[ -n ${SLURM_JOB_ID:-} ]] && IN_ENV=(srun --ntasks=1 --nodes=1 "${CONTAINER[@]}")
fi

# Trainer overrides: paths and layout from the environment, then LOPD_TRAIN_ARGS.
TRAIN_ARGS=(
  "model.start_from=${LOPD_START_FROM:-}" "data.store=${LOPD_STORE:-}" "run_dir=${LOPD_RUN_DIR:-}"
  "parallel.tensor_parallel=$TP" "parallel.sequence_parallel=$SP" "checkpoint.resume=$RESUME"
)
[[ -n ${LOPD_SFT_DATA:-} ]] && TRAIN_ARGS+=("data.sft_data=$LOPD_SFT_DATA")
read -r -a EXTRA <<<"${LOPD_TRAIN_ARGS:-}"
TRAIN_ARGS+=("${EXTRA[@]}")

# ----------------------------------------------------------------------------- outside a job
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  CHECK_ONLY=0
  SBATCH_ARGS=()
  for a in "$@"; do [[ $a == --check ]] && CHECK_ONLY=1 || SBATCH_ARGS+=("$a"); done
  NODES=1
  for a in "${SBATCH_ARGS[@]}"; do [[ $a =~ ^(--nodes=|-N)([0-9]+)$ ]] && NODES=${BASH_REMATCH[2]}; done
  NPROC=${NPROC_PER_NODE:-8}
  WORLD_SIZE=$((NODES * NPROC))
  check_inputs
  if ((CHECK_ONLY)); then echo "$PROG: inputs OK"; exit 0; fi
  command -v sbatch >/dev/null || die "sbatch not found (fix: submit from a SLURM login node)"
  # sbatch validates partition, account and resources at submission: an unknown partition fails here.
  exec sbatch "${SBATCH_ARGS[@]}" "$0"
fi

# ----------------------------------------------------------------------------- inside the job
NNODES=${SLURM_NNODES:-1}
NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
WORLD_SIZE=$((NNODES * NPROC))
RESTART=${SLURM_RESTART_COUNT:-0}
echo "[$PROG] job $SLURM_JOB_ID restart $RESTART on $SLURM_JOB_NODELIST: $NNODES node(s) x $NPROC ranks, $(date -Is)"
check_inputs  # seconds; also a requeued job re-checks its inputs before training again

LOG_DIR=${LOPD_LOG_DIR:-$LOPD_RUN_DIR/logs}
mkdir -p "$LOG_DIR"
LOG=$LOG_DIR/${SLURM_JOB_NAME:-lopd-8b}-$SLURM_JOB_ID-r$RESTART.log
exec > >(tee -a "$LOG") 2>&1
echo "[$PROG] job $SLURM_JOB_ID restart $RESTART: inputs checked, training; log $LOG"

# One node needs no name lookup; several rendezvous at the first node of the allocation.
if ((NNODES == 1)); then
  export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
else
  export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
fi
export MASTER_PORT=${MASTER_PORT:-$((20000 + 10 * (SLURM_JOB_ID % 1000) + RESTART % 10))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# torchrun forwards SIGUSR1 too, and gives the ranks this long to checkpoint before SIGKILL
# (PET_*: torchrun's own option variables; older versions ignore them).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-${LOPD_STOP_GRACE:-540}}
if [[ $DEVICE == cuda ]]; then
  export CUDA_DEVICE_MAX_CONNECTIONS=1        # Megatron: TP/SP communication overlap needs ordered kernels
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=1    # a failed rank aborts the job instead of hanging it
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
  export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
else
  export LOPD_DEVICE=cpu
fi

SRUN=(srun --kill-on-bad-exit=1 --nodes="$NNODES" "${CONTAINER[@]}")
LOPD_BIN=lopd  # the container's
((${#CONTAINER[@]})) || LOPD_BIN=$(command -v lopd)

STARTED=$(mktemp)  # manifest.json newer than this: written by this life of the job
set +e
if [[ $LAUNCHER == torchrun ]]; then
  # One task per node with all of the node's CPUs; torchrun starts the node's ranks.
  # The node rank comes from SLURM_NODEID inside each task, hence the inner bash.
  printf -v TRAIN_CMD '%q ' "$LOPD_BIN" train --config "$TRAIN_CONFIG" "${TRAIN_ARGS[@]}"
  SRUN+=(--ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}")
  "${SRUN[@]}" bash -c "exec python -m torch.distributed.run --nnodes=$NNODES --node-rank=\$SLURM_NODEID \
    --nproc-per-node=$NPROC --master-addr=$MASTER_ADDR --master-port=$MASTER_PORT $TRAIN_CMD"
else
  # srun-native ranks: megatron_lopd.runtime reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID.
  SRUN+=(--ntasks="$WORLD_SIZE" --ntasks-per-node="$NPROC" --cpus-per-task=$(( ${SLURM_CPUS_ON_NODE:-$NPROC} / NPROC )))
  "${SRUN[@]}" "$LOPD_BIN" train --config "$TRAIN_CONFIG" "${TRAIN_ARGS[@]}"
fi
rc=$?
set -e
MANIFEST=$LOPD_RUN_DIR/manifest.json
if [[ $MANIFEST -nt $STARTED ]] && grep -q '"status": "interrupted"' "$MANIFEST"; then
  # The trainer checkpointed on a stop signal: run again from that checkpoint (a preempted job
  # is requeued by SLURM already; then this call fails harmlessly).
  echo "[$PROG] checkpointed after a stop signal; requeueing job $SLURM_JOB_ID, $(date -Is)"
  rm -f "$STARTED"
  scontrol requeue "$SLURM_JOB_ID" || true
  exit 0
fi
rm -f "$STARTED"
((rc == 0)) || { echo "[$PROG] training failed (exit $rc), $(date -Is)"; exit "$rc"; }
echo "[$PROG] training finished, $(date -Is)"
