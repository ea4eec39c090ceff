#!/usr/bin/env bash
# RetroMAE pre-training on a SLURM cluster: one task per GPU (= one rank), on any number of nodes.
#
#   sbatch launch/slurm.sh --deepspeed ds_configs/zero2.json --data data/wiki --model models/bert-base \
#       --output-dir runs/wiki --max-steps 100000                  # every flag goes to launch/pretrain.py
#   sbatch --nodes=4 --time=2-00:00:00 --partition=gpu launch/slurm.sh ...   # override the defaults below
#   SBATCH_TIMELIMIT=12:00:00 SBATCH_PARTITION=gpu sbatch launch/slurm.sh ... # ... or by environment
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=0 --cpus-per-task=4 launch/slurm.sh ... # CPU nodes
#
# Submit from the repository root, or from a folder made by `retromae-ds init` (the job runs there). The
# job uses the submitting shell's environment (activate the virtualenv first). Optional environment:
#   PYTHON            interpreter for the ranks (default: python)
#   RETROMAE_ENTRY    the training entry (default: launch/pretrain.py; without a checkout, the installed
#                     package's `python -m retromae_ds.engine.trainer`)
#   MASTER_PORT_BASE  rendezvous port = base + job id % 20000 (default 10000: below Linux ephemeral ports)
#
# Why one task per rank (srun starts WORLD_SIZE copies of pretrain.py, each maps SLURM_PROCID/
# SLURM_LOCALID/SLURM_NTASKS to RANK/LOCAL_RANK/WORLD_SIZE) rather than one launcher per node: Slurm then
# owns every rank, so it places, signals, accounts and cleans up each one; `--kill-on-bad-exit` ends the
# whole job when one rank dies instead of leaving the others hanging in a collective; and there is no
# launcher in between (torchrun's agent dies on SIGUSR1, the deepspeed launcher needs ssh or --no_ssh).
#
# Time limit and preemption, both end in "resume from the newest complete checkpoint":
# - 300 s before the time limit Slurm sends SIGUSR1 to this batch shell (--signal=B:USR1@300). It is
#   forwarded to every rank; the trainer finishes the current step, saves (reason "signal") and exits 0;
#   this script then requeues the job (same job id, same log). The requeued run starts the same command
#   and the trainer's default `--resume auto` continues on exactly the same data order.
#   Slurm may send the signal up to 60 s early; raise @300 when saving takes longer.
# - Preemption / `scontrol requeue` / `scancel` send SIGTERM to every rank directly, then SIGKILL after the
#   cluster's KillWait (or the partition's GraceTime): the trainer saves on SIGTERM too. Slurm itself
#   requeues a preempted job (PreemptMode=REQUEUE); a cancelled job stays cancelled.
#
#SBATCH --job-name=retromae
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

set -uo pipefail  # no -e: the exit status of srun is handled below

log() { printf '[slurm.sh] %s\n' "$*"; }
die() { printf '[slurm.sh] error: %s\n' "$*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with 'sbatch launch/slurm.sh [pretrain flags]'."
cd "${SLURM_SUBMIT_DIR:-.}" || die "cannot enter the submit directory ${SLURM_SUBMIT_DIR:-}."
PYTHON=${PYTHON:-python}
ENTRY=${RETROMAE_ENTRY:-launch/pretrain.py}
if [ -f "$ENTRY" ]; then
  ENTRY_ARGS=("$ENTRY")
elif [ -z "${RETROMAE_ENTRY:-}" ]; then  # an installed package (wheel), no checkout: the module entry
  ENTRY_ARGS=(-m retromae_ds.engine.trainer)
else
  die "$ENTRY not found in $(pwd): set RETROMAE_ENTRY to the training entry script."
fi

# --- the world: nodes, ranks, rendezvous ------------------------------------------------------------
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ "${#NODES[@]}" -gt 0 ] || die "'scontrol show hostnames $SLURM_JOB_NODELIST' listed no nodes."
WORLD_SIZE=${SLURM_NTASKS:-${#NODES[@]}}
export MASTER_ADDR=${NODES[0]}
export MASTER_PORT=$(( ${MASTER_PORT_BASE:-10000} + SLURM_JOB_ID % 20000 ))
# One compute thread per core the task owns (torch would otherwise start one per core of the node).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) | ${#NODES[@]} nodes | world size $WORLD_SIZE |" \
    "master $MASTER_ADDR:$MASTER_PORT | $(date -Is)"
# Ranks per node under block distribution (forced below): SLURM_TASKS_PER_NODE is like "8(x3),4".
counts=()
IFS=, read -ra groups <<<"${SLURM_TASKS_PER_NODE:-1(x${#NODES[@]})}"
for g in "${groups[@]}"; do
    if [[ $g =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
        for ((i = 0; i < BASH_REMATCH[2]; i++)); do counts+=("${BASH_REMATCH[1]}"); done
    else
        counts+=("$g")
    fi
done
# Same number of ranks on every node (the usual case): tell the ranks their node-local world size.
[ "$(printf '%s\n' "${counts[@]}" | sort -u | wc -l)" = 1 ] && export LOCAL_WORLD_SIZE=${counts[0]}
first=0
for i in "${!NODES[@]}"; do
    n=${counts[$i]:-0}
    if [ "$n" -gt 1 ]; then
        log "node ${NODES[$i]}: ranks $first-$((first + n - 1))"
    else
        log "node ${NODES[$i]}: rank $first"
    fi
    first=$((first + n))
done

# --- signals: USR1 (time limit) is forwarded and leads to a requeue; TERM only waits for the save ------
warned=""   # "yes" once the time-limit warning reached the ranks
signals=0   # signals trapped so far (to tell a trap-interrupted `wait` from srun's exit)
srun_pid=""
on_usr1() {
    signals=$((signals + 1))
    if [ -z "$srun_pid" ]; then
        log "SIGUSR1 before the ranks started: ignored (is --time shorter than the --signal lead time?)"
        return
    fi
    warned=yes
    log "SIGUSR1 (time limit near): asking every rank to save and stop"
    kill -USR1 "$srun_pid" 2>/dev/null
}
on_term() {
    signals=$((signals + 1)) warned=""
    log "SIGTERM (preemption, requeue or cancel): the ranks got it too and save before they stop"
}
trap on_usr1 USR1
trap on_term TERM

# --- one task per rank ---------------------------------------------------------------------------------
srun_args=(--kill-on-bad-exit=1 --distribution=block --ntasks="$WORLD_SIZE")
# srun does not inherit --cpus-per-task from sbatch on Slurm 22.05-23.02: pass it on.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# Each task: take its rank from Slurm, name itself in the log, then become the trainer (exec: the
# trainer is the process Slurm signals).
task='export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
echo "[slurm.sh] rank $RANK of $WORLD_SIZE (local rank $LOCAL_RANK) on ${SLURMD_NODENAME:-$(hostname)}"
exec "$@"'
srun "${srun_args[@]}" bash -c "$task" rank "$PYTHON" "${ENTRY_ARGS[@]}" "$@" &
srun_pid=$!
# `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until srun is done.
while :; do
    seen=$signals
    wait "$srun_pid"
    rc=$?
    [ "$rc" -gt 128 ] && [ "$signals" != "$seen" ] && continue
    break
done
log "ranks finished with exit code $rc | $(date -Is)"

# Requeue only when every rank saved cleanly after the warning (exit 0): a crash is not retried forever.
if [ "$warned" = yes ] && [ "$rc" = 0 ]; then
    if scontrol requeue "$SLURM_JOB_ID"; then
        log "requeued job $SLURM_JOB_ID: it resumes from the newest complete checkpoint"
        exit 0
    fi
    log "could not requeue (submitted with --no-requeue?): submit the same command again to resume"
fi
exit "$rc"
