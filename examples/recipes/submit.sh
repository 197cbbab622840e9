#!/usr/bin/env bash
# Submit one of the paper's recipes as a SLURM job (examples/slurm/drlora_finetune.sbatch with
# the recipe's flags file, job name and node count), from any directory:
#
#   bash examples/recipes/submit.sh olmoe BASE_CKPT CKPT [more sbatch options]
#   bash examples/recipes/submit.sh phi   BASE_CKPT CKPT --nodes=2
#
# BASE_CKPT is the converted base (tools/convert_hf_to_megatron.py --save), CKPT the run's
# --save/--load directory (a requeued job resumes from it). EXTRA_ARGS, VENV, DRY_RUN and the
# other settings of the sbatch script pass through the environment; SBATCH names the submit
# command (default sbatch).
set -euo pipefail

usage() { echo "usage: $0 {olmoe|phi|glm45-air|deepseek-v2-lite|moonlight} BASE_CKPT CKPT [sbatch options]" >&2; exit 2; }
[ "$#" -ge 3 ] || usage
recipe=$1 base=$2 ckpt=$3
shift 3
case "$recipe" in
  olmoe) args_file=examples/recipes/olmoe_1b_7b_drlora.args; name=drlora-olmoe-1b-7b ;;
  phi)   args_file=examples/recipes/phi_mini_moe_drlora.args; name=drlora-phi-mini-moe ;;
  glm45-air) args_file=examples/recipes/glm45_air_drlora.args; name=drlora-glm45-air ;;
  deepseek-v2-lite) args_file=examples/recipes/deepseek_v2_lite_drlora.args
    name=drlora-deepseek-v2-lite ;;
  moonlight) args_file=examples/recipes/moonlight_16b_drlora.args; name=drlora-moonlight-16b ;;
  *) echo "$0: unknown recipe '$recipe' (olmoe, phi, glm45-air, deepseek-v2-lite or moonlight)" >&2; usage ;;
esac
[ -d "$base" ] || { echo "$0: BASE_CKPT '$base' is not a directory (the converter's --save)" >&2; exit 2; }
base=$(cd "$base" && pwd)
case "$ckpt" in /*) ;; *) ckpt="$PWD/$ckpt" ;; esac
cd "$(dirname "$0")/../.."  # the sbatch script and the flags files use repository paths
mkdir -p logs  # the sbatch script's --output/--error
export ARGS_FILE="$args_file" BASE_CKPT="$base" CKPT="$ckpt"
exec "${SBATCH:-sbatch}" --job-name="$name" --nodes=1 "$@" examples/slurm/drlora_finetune.sbatch
