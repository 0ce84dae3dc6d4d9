#!/usr/bin/env bash
# Launch train.py on every GPU of this machine (torchrun), or on the CPU when there is none. All arguments pass through.
#
#   ./train.sh --preset quickstart                 # no GPU needed
#   ./train.sh                                     # the reference GPT-2 124M run on all local GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 ./train.sh   # on node 0; NODE_RANK=1 on node 1
#   srun ./train.sh                                # SLURM, one task per node: nodes and addresses from SLURM
#   MAX_RESTARTS=3 ./train.sh                      # torchrun starts failed ranks again; they resume by themselves
#
# GPUs are counted with nvidia-smi, limited to those CUDA_VISIBLE_DEVICES shows; NGPU=N overrides the count.
# Several nodes meet through torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT, so a node started again rejoins;
# ranks go by host name, so node 0 of SLURM's list (its first host) is rank 0, which writes the checkpoints.
# TRAIN_SH_DRY_RUN=1 prints the command instead of running it. TORCH_ELASTIC_SHUTDOWN_TIMEOUT (300 s) is the grace
# torchrun gives the ranks after a SIGTERM to stop at the next micro-step and write the checkpoint.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"  # the repo; paths in the arguments mean what they mean where train.sh was called

die() { echo "error: $*" >&2; exit 2; }
# under SLURM (srun ./train.sh, one task per node) the node count, this node's rank and node 0's address are SLURM's
if [[ -n "${SLURM_JOB_NODELIST:-}" && -n "${SLURM_NNODES:-}" && -z "${NNODES:-}" ]]; then
    NNODES="$SLURM_NNODES"
    NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) || true
        [[ -n "$MASTER_ADDR" ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host: set MASTER_ADDR"
    fi
fi
for var in NGPU NNODES NODE_RANK MASTER_PORT MAX_RESTARTS; do
    value="${!var:-}"
    [[ -z "$value" || "$value" =~ ^[0-9]+$ ]] || die "$var must be a whole number >= 0, got '$value'"
done

if [[ -z "${NGPU:-}" ]]; then
    NGPU=$( (nvidia-smi --list-gpus 2>/dev/null || true) | grep -c "^GPU" || true)
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        # CUDA shows this process only the GPUs listed there, up to the first invalid entry (-1 or empty: none)
        visible=0
        IFS=',' read -ra ids <<< "$CUDA_VISIBLE_DEVICES"
        for id in "${ids[@]}"; do
            id="${id// /}"
            [[ -z "$id" || "$id" == -* ]] && break
            visible=$((visible + 1))
        done
        (( visible < NGPU )) && NGPU=$visible
    fi
fi

if [[ "${NNODES:-1}" -gt 1 && "$NGPU" -lt 1 ]]; then
    die "NNODES=$NNODES, but this machine has no GPU (or none visible): train.sh runs several nodes only on GPUs"
fi
if [[ "$NGPU" -ge 1 ]]; then
    if [[ "${NNODES:-1}" -gt 1 ]]; then
        [[ -n "${MASTER_ADDR:-}" ]] || die "set MASTER_ADDR to the address of node 0 for a multi-node run"
        (( ${NODE_RANK:-0} < NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
        cmd=(torchrun --nnodes "$NNODES" --nproc_per_node "$NGPU" --rdzv-backend c10d
             --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${SLURM_JOB_ID:-gpt2}")
    else
        cmd=(torchrun --standalone --nproc_per_node "$NGPU")
    fi
    # elastic restarts: a rank that fails (or a node that is lost) restarts every rank, which resume from the newest
    # checkpoint by themselves (train.py sees TORCHELASTIC_RESTART_COUNT). The workers keep a store of their own:
    # sharing torchrun's, a restarted rank can read a peer's address from the attempt before (pytorch#135712)
    if [[ "${MAX_RESTARTS:-0}" -gt 0 ]]; then
        cmd+=(--max-restarts "$MAX_RESTARTS")
        export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
    fi
    cmd+=("$here/train.py" "$@")
else
    # CPU: glibc would hand every large freed tensor (logits, their gradients) back to the OS and page-fault it in
    # again next step; keeping them in the heap makes a quick-start step about 1.6x faster (1,050 -> 660 ms, median,
    # 2-core CPU, 2026-11-28). The price is memory: at micro-batch 16 x 128 the logits over 50,304 tokens, their
    # log-softmax and their gradient take 400 MB each and stay in the heap (the quick start held 4.0 GB, 2026-12-04);
    # with both thresholds at 256 MB it held 1.9 GB and took 1,071 ms a step instead of 629 (2026-11-28). Set them
    # yourself to choose.
    export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-4294967296}"
    export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-4294967296}"
    cmd=(python "$here/train.py" "$@")
fi

# torchrun passes SIGTERM (a preemption) on to the ranks and kills them when its grace period is over, 30 s unless
# told otherwise. The ranks stop at the next micro-step and write a checkpoint, which for a large model takes a while.
# Ask the scheduler to signal earlier than this (SLURM: sbatch --signal=TERM@600; Kubernetes:
# terminationGracePeriodSeconds: 600).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"

if [[ -n "${TRAIN_SH_DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
[[ "${cmd[0]}" == torchrun ]] || exec "${cmd[@]}"

# torchrun runs under this script, not in its place, so that a signal to train.sh alone (Kubernetes sends SIGTERM to
# the container's first process) reaches torchrun, and so that train.sh exits as train.py does after a signal,
# 128 + its number (143 for SIGTERM); torchrun itself exits 1. Where a signal reaches every process (SLURM, Ctrl-C),
# torchrun and the ranks get it twice and take it as one. If train.sh is killed (kill -9), torchrun gets SIGTERM
# (setpriv's parent-death signal) and stops the ranks the same way.
if command -v setpriv > /dev/null; then
    cmd=(setpriv --pdeathsig TERM -- "${cmd[@]}")
else
    echo "note: no setpriv (util-linux) here: if train.sh is killed with kill -9, torchrun and its ranks go on" >&2
fi
"${cmd[@]}" &
launcher=$!
caught=""
for sig in TERM INT HUP; do
    trap "caught=$sig; kill -s $sig $launcher 2> /dev/null || true" "$sig"
done
while true; do
    wait "$launcher" && status=0 || status=$?
    kill -0 "$launcher" 2> /dev/null || break  # gone: wait returned its status, not a signal's interruption
done
[[ -z "$caught" ]] || exit $((128 + $(kill -l "$caught")))
exit "$status"
