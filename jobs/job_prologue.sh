# jobs/job_prologue.sh -- sourced by the .sbatch wrappers at job start (bash, `set -euo pipefail` already on).
# Expects the cwd to be the repo root (the wrappers cd to $SLURM_SUBMIT_DIR first). Loads the site
# settings (jobs/cluster.env), modules and the venv; caps threads at the allocated CPUs; prints where and
# when the job runs. Defines INSTDIFF, the CLI as an array: $INSTDIFF_CMD if set (a testing hook, e.g.
# INSTDIFF_CMD=echo; it reaches the job through sbatch's default --export=ALL), else <venv>/bin/instdiff.

source jobs/cluster.env

if [ -n "$CLUSTER_MODULES" ]; then
    if ! command -v module >/dev/null 2>&1 && [ -n "$CLUSTER_MODULES_INIT" ]; then
        source "$CLUSTER_MODULES_INIT"
    fi
    # shellcheck disable=SC2086  # a list of module names
    module load $CLUSTER_MODULES
fi
if [ -f "$CLUSTER_VENV/bin/activate" ]; then
    source "$CLUSTER_VENV/bin/activate"
elif [ -z "${INSTDIFF_CMD:-}" ]; then
    echo "error: no venv at $PWD/$CLUSTER_VENV (run \`make setup\` first, or set CLUSTER_VENV)" >&2
    exit 2
fi
INSTDIFF_CMD=${INSTDIFF_CMD:-$CLUSTER_VENV/bin/instdiff}
read -ra INSTDIFF <<<"$INSTDIFF_CMD"

# one thread per allocated CPU (torch/numpy would otherwise use every core of a shared node); outside
# SLURM (submit_all.sh --local) the caller's OMP_NUM_THREADS, else all cores
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-$(nproc)}}
export MKL_NUM_THREADS=$OMP_NUM_THREADS

JOB_T0=$SECONDS
JOB_LABEL=${SLURM_JOB_ID:-none}
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then JOB_LABEL="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; fi
echo "== job $JOB_LABEL (${SLURM_JOB_NAME:-interactive}) on $(hostname)" \
     "partition=${SLURM_JOB_PARTITION:-none} cpus=${SLURM_CPUS_PER_TASK:-?} threads=$OMP_NUM_THREADS"
echo "== start $(date '+%F %T %Z')  cwd=$PWD  cmd=${INSTDIFF[*]}"
echo "== CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
else
    echo "== no nvidia-smi on this node"
fi
trap 'rc=$?; echo "== end $(date "+%F %T %Z")  rc=$rc  elapsed=$((SECONDS - JOB_T0))s"' EXIT
