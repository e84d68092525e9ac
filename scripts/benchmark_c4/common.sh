# Shared by the recipes in this folder; `source` it, then call `launch MICRO_BATCH trainer-flags... "$@"`.
#
# Environment (published defaults):
#   NGPU        processes per node (default: the recipe's GPU count)
#   DATA_DIR    folder of C4 json.gz shards (default: unset = stream allenai/c4 from the hub)
#   TOKENIZER   tokenizer name or folder (default t5-base)
#   WANDB_MODE  online | offline | disabled (default online)
#   TOTAL_BATCH sequences per update (default 512); MAX_LENGTH tokens per sequence (default: the recipe's)
#   PRINT_COMMAND=1 prints the launch command instead of running it
# Gradient accumulation is derived so that micro-batch x accumulation x NGPU = TOTAL_BATCH for any NGPU;
# the micro-batch shrinks when NGPU x micro-batch alone would exceed the total.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

launch() {
    local micro=$1; shift
    local ngpu=${NGPU:-$DEFAULT_NGPU} total=${TOTAL_BATCH:-512}
    if (( total % ngpu != 0 )); then
        echo "error: TOTAL_BATCH $total is not divisible by NGPU $ngpu" >&2; exit 2
    fi
    local per_gpu=$(( total / ngpu ))
    (( micro > per_gpu )) && micro=$per_gpu
    if (( per_gpu % micro != 0 )); then
        echo "error: $per_gpu sequences per GPU are not a multiple of the micro-batch $micro; set NGPU to a power of two" >&2; exit 2
    fi
    local flags=(--batch_size "$micro" --gradient_accumulation $(( per_gpu / micro )) --total_batch_size "$total"
                 --max_length "${MAX_LENGTH:-256}" --tokenizer "${TOKENIZER:-t5-base}" --wandb "${WANDB_MODE:-online}")
    [[ -n "${DATA_DIR:-}" ]] && flags+=(--data_dir "$DATA_DIR")
    if [[ -n "${PRINT_COMMAND:-}" ]]; then
        printf '%q ' torchrun --standalone --nproc_per_node "$ngpu" -m train "${flags[@]}" "$@"; echo; exit 0
    fi
    if [[ " $* " == *" --dry_run "* ]]; then
        # one process that sees the world size the real launch would have: nothing is allocated
        WORLD_SIZE=$ngpu RANK=0 LOCAL_RANK=0 exec python -m train "${flags[@]}" "$@"
    fi
    exec torchrun --standalone --nproc_per_node "$ngpu" -m train "${flags[@]}" "$@"
}
