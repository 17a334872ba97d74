#!/usr/bin/env bash
# One node: every GPU (or NPROC CPU processes) runs one rank of the job (trainer + vLLM engine).
#
#   bash launch/torchrun.sh configs/recipes/qwen3_30b_a3b_8xh100.yaml [key=value ...]
#   NPROC=2 bash launch/torchrun.sh configs/recipes/tiny_moe_gspo.yaml \
#       rollout.tensor_parallel_size=2      # CPU, 2 processes (one engine spans them: MoE on CPU)
#   DRY_RUN=1 bash launch/torchrun.sh RECIPE ...                         # print, do not run
#
# Exit status 75 means "stopped on request, checkpoint written": run the same command again.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: [NPROC=N] [DRY_RUN=1] $0 RECIPE [key=value ...]" >&2
  exit 2
fi
recipe=$1
shift

# not inside the project's environment: use its .venv (what `make venv` creates)
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! "${PYTHON:-python}" -c "import megatron_rl" 2>/dev/null && [[ -x "$root/.venv/bin/python" ]]; then
  export PATH="$root/.venv/bin:$PATH"
fi

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [[ "$NPROC" -gt 0 ]] || NPROC=1
fi

cmd=(torchrun --standalone --nnodes=1 "--nproc-per-node=${NPROC}"
     -m megatron_rl train --config "$recipe" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
PYTHON=${PYTHON:-python}
output_dir=$("$PYTHON" -m megatron_rl print-config "$recipe" "$@" 2>/dev/null \
  | awk '/^train:/{t=1} t && /^  output_dir:/{print $2; exit}' || true)
output_dir=${output_dir:-runs/default}

status=0
"${cmd[@]}" || status=$?
# torchrun reports a worker's 75 as 1: the trainer's REQUEUE file says a stop was requested
if [[ $status -ne 0 && -f "$output_dir/REQUEUE" ]]; then
  echo "stopped on request with a checkpoint: run the same command again to resume" >&2
  exit 75
fi
exit "$status"
