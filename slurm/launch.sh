#!/bin/bash
# The body of every flowrl sbatch file (sourced by slurm/*.sbatch after they set their defaults): one job, two roles.
#
#   rollout: the first ROLLOUT_NODES nodes run ENGINES_PER_NODE vLLM servers each (`flowrl serve`, ENGINE_TP
#            GPUs per server, ports ENGINE_PORT, ENGINE_PORT+1, ...); with ROLLOUT_NODES=0 the servers share the
#            first trainer node instead (small and CPU jobs).
#   trainer: the remaining nodes run torchrun with PROCS_PER_NODE ranks each (data parallel size = ranks / (TP*PP));
#            rank 0 waits until every engine is healthy, then trains and syncs weights to the engines directly.
#
# Every role logs to LOG_DIR/<role>-<node>[-<task>].log. The first role to fail ends the job: the message names it,
# the other role is stopped, the exit code is non-zero. On SIGUSR1 (sbatch --signal=B:USR1@...: preemption or the
# time limit ahead) the job requeues itself; the trainer resumes from RUN_DIR/checkpoints/latest.
set -euo pipefail

: "${RECIPE:?set RECIPE to a YAML recipe}"
: "${RUN_DIR:?set RUN_DIR}"
: "${MODEL:?set MODEL to the Hugging Face directory the engines serve first}"
ROLLOUT_NODES=${ROLLOUT_NODES:-0}
ENGINES_PER_NODE=${ENGINES_PER_NODE:-1}
ENGINE_TP=${ENGINE_TP:-1}
ENGINE_PORT=${ENGINE_PORT:-18000}
MASTER_PORT=${MASTER_PORT:-29500}
PROCS_PER_NODE=${PROCS_PER_NODE:-1}
FLOWRL_PYTHON=${FLOWRL_PYTHON:-python}
OVERRIDES=${OVERRIDES:-}
LOG_DIR=${LOG_DIR:-$RUN_DIR/logs/job-${SLURM_JOB_ID}}
CONTAINER_ARGS=()
if [[ -n ${CONTAINER_IMAGE:-} ]]; then  # pyxis/enroot
    CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-mounts="${CONTAINER_MOUNTS:-}")
fi
mkdir -p "$LOG_DIR"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if ((ROLLOUT_NODES >= ${#NODES[@]})); then
    echo "flowrl: ROLLOUT_NODES=$ROLLOUT_NODES leaves no trainer node in a ${#NODES[@]}-node job." >&2
    exit 2
fi
if ((ROLLOUT_NODES > 0)); then
    ROLLOUT=("${NODES[@]:0:ROLLOUT_NODES}")
    TRAINER=("${NODES[@]:ROLLOUT_NODES}")
else
    ROLLOUT=("${NODES[0]}")
    TRAINER=("${NODES[@]}")
fi
URLS=()
for node in "${ROLLOUT[@]}"; do
    for ((i = 0; i < ENGINES_PER_NODE; i++)); do URLS+=("http://$node:$((ENGINE_PORT + i))"); done
done
# One key for this job's engines, in the environment srun passes on; never on a command line.
FLOWRL_API_KEY=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
export FLOWRL_API_KEY

join() { local IFS=,; echo "$*"; }
# This script runs on the batch host, which may lack the Python environment: Python runs in job steps (in the
# container when CONTAINER_IMAGE is set). --overlap everywhere: roles are placed by --nodelist, and a launcher step
# around this script (nemo-run's) shares the first node.
OVERLAP=(--overlap)
# Validate the whole configuration and write RUN_DIR/config.yaml before any node starts anything.
# shellcheck disable=SC2086  # OVERRIDES is a list of key=value words
CONFIG=$(srun "${CONTAINER_ARGS[@]}" "${OVERLAP[@]}" --nodes=1 --ntasks=1 --nodelist="${TRAINER[0]}" \
    "$FLOWRL_PYTHON" -m flowrl_megatron train "$RECIPE" "run_dir=$RUN_DIR" "model.path=$MODEL" \
    "rollout.engine_urls=[$(join "${URLS[@]}")]" "rollout.engines=${#URLS[@]}" "rollout.engine_tp=$ENGINE_TP" \
    "rollout.sync_address=${TRAINER[0]}" $OVERRIDES --prepare --world-size $((${#TRAINER[@]} * PROCS_PER_NODE)))
echo "flowrl: job $SLURM_JOB_ID: rollout on ${ROLLOUT[*]} (${#URLS[@]} engines), trainer on ${TRAINER[*]}," \
     "config $CONFIG, logs $LOG_DIR"

srun "${CONTAINER_ARGS[@]}" "${OVERLAP[@]}" --nodes=${#ROLLOUT[@]} --nodelist="$(join "${ROLLOUT[@]}")" \
    --ntasks-per-node="$ENGINES_PER_NODE" --kill-on-bad-exit=1 --output="$LOG_DIR/rollout-%N-%t.log" \
    bash -c "exec $FLOWRL_PYTHON -m flowrl_megatron serve '$CONFIG' --host \$(hostname) \
             --port \$(($ENGINE_PORT + SLURM_LOCALID)) --gpu-offset \$((SLURM_LOCALID * $ENGINE_TP))" &
ROLLOUT_PID=$!
srun "${CONTAINER_ARGS[@]}" "${OVERLAP[@]}" --nodes=${#TRAINER[@]} --nodelist="$(join "${TRAINER[@]}")" \
    --ntasks-per-node=1 --kill-on-bad-exit=1 --output="$LOG_DIR/trainer-%N.log" \
    "$FLOWRL_PYTHON" -m flowrl_megatron.runtime.torchrun --nnodes=${#TRAINER[@]} --nproc-per-node="$PROCS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="${TRAINER[0]}:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
    -m flowrl_megatron.trainer "$CONFIG" &
TRAINER_PID=$!

requeue() {
    echo "flowrl: job $SLURM_JOB_ID signalled; requeueing (the next run resumes from the latest checkpoint)." >&2
    kill "$TRAINER_PID" "$ROLLOUT_PID" 2>/dev/null || true
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap requeue USR1

set +e
wait -n "$ROLLOUT_PID" "$TRAINER_PID"
first=$?
set -e
if ! kill -0 "$TRAINER_PID" 2>/dev/null; then  # the trainer ended first
    kill "$ROLLOUT_PID" 2>/dev/null || true
    wait "$ROLLOUT_PID" 2>/dev/null || true
    if ((first != 0)); then
        echo "flowrl: the trainer failed (exit $first); see $LOG_DIR/trainer-*.log." >&2
        exit "$first"
    fi
    echo "flowrl: training finished; engines stopped."
    exit 0
fi
echo "flowrl: the rollout engines stopped (exit $first) while training; see $LOG_DIR/rollout-*.log." >&2
kill "$TRAINER_PID" 2>/dev/null || true
wait "$TRAINER_PID" 2>/dev/null || true
exit $((first == 0 ? 1 : first))
