# Shared by the recipes in this folder; `source` it, then call `launch MICRO_BATCH trainer-flags... "$@"`.
#
# Environment (published defaults):
#   NGPU        processes per node (default: the recipe's GPU count)
#   NNODES      nodes (default 1: `torchrun --standalone`); with more, every node runs the same recipe and
#               torchrun meets the others through a c10d rendezvous at RDZV_ENDPOINT (host:port), default
#               MASTER_ADDR:MASTER_PORT (port 29500); NODE_RANK is passed on (c10d numbers the nodes in the
#               order they arrive, so it only names the node); RDZV_ID names the job (default: the run name);
#               JOIN_TIMEOUT seconds to wait for the other nodes (default 600)
#   MAX_RESTARTS torchrun restarts every worker this many times after a failure (default 0); a restart runs
#               the same command into the same SAVE_DIR and resumes its newest complete checkpoint
#   SAVE_DIR    run folder (default checkpoints/<the recipe's --name>; fixed, so a restarted or requeued
#               job finds its checkpoints)
#   DATA_DIR    folder of C4 json.gz shards (default: unset = stream allenai/c4 from the hub)
#   TOKENIZER   tokenizer name or folder (default t5-base)
#   WANDB_MODE  online | offline | disabled (default online)
#   TOTAL_BATCH sequences per update (default 512); MAX_LENGTH tokens per sequence (default: the recipe's)
#   PRINT_COMMAND=1 prints the launch command instead of running it
# Gradient accumulation is derived so that micro-batch x accumulation x NNODES x NGPU = TOTAL_BATCH for any
# world size; the micro-batch shrinks when the world size x micro-batch alone would exceed the total.
# Before torchrun starts, one process checks the whole configuration (flags, files, the checkpoint a
# restart would resume) as a dry run with the real world size: a mistake is one line and exit 2, not one
# traceback per worker; a run that is already complete exits 0 here without launching anything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

launch() {
    local micro=$1; shift
    local ngpu=${NGPU:-$DEFAULT_NGPU} nnodes=${NNODES:-1} total=${TOTAL_BATCH:-512}
    local world=$(( ngpu * nnodes ))
    if (( total % world != 0 )); then
        local by="NGPU $ngpu"; (( nnodes > 1 )) && by="NNODES $nnodes x NGPU $ngpu"
        echo "error: TOTAL_BATCH $total is not divisible by $by" >&2; exit 2
    fi
    local per_gpu=$(( total / world ))
    (( micro > per_gpu )) && micro=$per_gpu
    if (( per_gpu % micro != 0 )); then
        echo "error: $per_gpu sequences per GPU are not a multiple of the micro-batch $micro; make NNODES x NGPU a power of two" >&2; exit 2
    fi
    local name="" arg previous=""
    for arg in "$@"; do [[ $previous == --name ]] && name=$arg; previous=$arg; done
    local flags=(--batch_size "$micro" --gradient_accumulation $(( per_gpu / micro )) --total_batch_size "$total"
                 --max_length "${MAX_LENGTH:-256}" --tokenizer "${TOKENIZER:-t5-base}" --wandb "${WANDB_MODE:-online}")
    [[ -n "${DATA_DIR:-}" ]] && flags+=(--data_dir "$DATA_DIR")
    [[ " $* " != *" --save_dir "* && -n "${SAVE_DIR:-$name}" ]] && flags+=(--save_dir "${SAVE_DIR:-checkpoints/$name}")
    local launcher=(torchrun --standalone --nproc_per_node "$ngpu")
    if (( nnodes > 1 )); then
        local endpoint=${RDZV_ENDPOINT:-${MASTER_ADDR:?set MASTER_ADDR (or RDZV_ENDPOINT) for NNODES > 1}:${MASTER_PORT:-29500}}
        launcher=(torchrun --nnodes "$nnodes" --nproc_per_node "$ngpu" --rdzv_backend c10d --rdzv_endpoint "$endpoint"
                  --rdzv_id "${RDZV_ID:-${name:-train}}" --rdzv_conf "join_timeout=${JOIN_TIMEOUT:-600}")
        [[ -n "${NODE_RANK:-}" ]] && launcher+=(--node_rank "$NODE_RANK")
    fi
    [[ -n "${MAX_RESTARTS:-}" ]] && launcher+=(--max_restarts "$MAX_RESTARTS")
    if [[ -n "${PRINT_COMMAND:-}" ]]; then
        printf '%q ' "${launcher[@]}" -m train "${flags[@]}" "$@"; echo; exit 0
    fi
    if [[ " $* " == *" --dry_run "* ]]; then
        # one process that sees the world size the real launch would have: nothing is allocated
        WORLD_SIZE=$world RANK=0 LOCAL_RANK=0 exec python -m train "${flags[@]}" "$@"
    fi
    # the configuration checked once, in one process (its plan on stdout is dropped); nothing printed on
    # stdout with exit 0 means --resume auto found the run complete: there is nothing to launch
    local plan
    plan=$(WORLD_SIZE=$world RANK=0 LOCAL_RANK=0 python -m train "${flags[@]}" "$@" --dry_run) || exit $?
    [[ -z "$plan" ]] && exit 0
    exec "${launcher[@]}" -m train "${flags[@]}" "$@"
}
