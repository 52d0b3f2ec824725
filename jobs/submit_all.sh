#!/usr/bin/env bash
# Submit the whole report as one SLURM dependency chain (resources from jobs/cluster.env):
#
#   (full profile) instdiff report preflight                   every asset checked first: nothing is submitted
#                                                              while one is missing (all are listed, with fetch commands)
#   00_setup_check, 01_demos, 30_extension                     independent notebook jobs
#   generate                                                   array, one task per shard (N_SHARDS): the images of
#                                                              10, 11 and the ablations of 20
#   10_location_formats, 11_attribute_binding, 20_ablations    afterok: generate (every task); they only score
#   99_blogpost                                                afterok: all of the above
#
# Every job has --kill-on-invalid-dep=yes: if a job fails, its dependents are cancelled, not left pending.
#
# Usage: jobs/submit_all.sh [smoke|full] [--dry-run | --local] [--wait]
#   smoke|full  the profile (default smoke): params jobs/params/<profile>/<NB>.yaml + cluster.env's settings
#   --dry-run   print the sbatch commands (a runnable script) instead of submitting
#   --local     no scheduler: run the same jobs here, one after the other, in submission order (dependents
#               of a failed job are skipped); exit 1 if any job failed or was skipped. For machines without
#               SLURM (`make report`); logs in outputs/slurm/local-<profile>-<job>.out as well as stdout.
#   --wait      wait for the chain, print each job's final state, exit 0 only if every job and array task
#               ended COMPLETED (else 1, and the tail of each failed job's log). Env: SUBMIT_TIMEOUT_S
#               (default 0 = no limit; on expiry exit 124, jobs keep running), SUBMIT_LOG_TAIL (lines, 40).
# Prints "<name> <job id>" per job and writes the same to outputs/slurm/chain-<profile>.tsv.
# INSTDIFF_CMD, if exported, replaces the CLI inside the jobs (testing hook, see jobs/job_prologue.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

NOTEBOOKS=(00_setup_check 01_demos 10_location_formats 11_attribute_binding 20_ablations 30_extension 99_blogpost)
AFTER_GENERATE=" 10_location_formats 11_attribute_binding 20_ablations "   # read the generation array's images
FINAL=99_blogpost                                              # renders the blog from everything

usage() { sed -n '14,24p' "$0" | sed 's/^# \{0,1\}//'; }
profile=smoke dry=0 wait=0 local=0
for arg in "$@"; do
    case $arg in
        smoke | full) profile=$arg ;;
        --dry-run) dry=1 ;;
        --local) local=1 ;;
        --wait) wait=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

source jobs/cluster.env
P=${profile^^}

# setting KEY [NAME]: cluster.env's <P>_KEY__NAME if set, else <P>_KEY
setting() {
    local v="${P}_${1}__${2:-}"
    if [ -n "${2:-}" ] && [ -n "${!v+set}" ]; then printf '%s' "${!v}"; return; fi
    v="${P}_$1"
    printf '%s' "${!v-}"
}

# resources NAME TIME_KEY: fill RES with the sbatch resource flags for one job
resources() {
    local part gres cpus mem time extra
    part=$(setting PARTITION "$1") gres=$(setting GRES "$1") cpus=$(setting CPUS "$1")
    mem=$(setting MEM "$1") time=$(setting "$2" "$1") extra=$(setting EXTRA "$1")
    RES=()
    if [ -n "$part" ]; then RES+=("--partition=$part"); fi
    if [ -n "$CLUSTER_ACCOUNT" ]; then RES+=("--account=$CLUSTER_ACCOUNT"); fi
    if [ -n "$CLUSTER_QOS" ]; then RES+=("--qos=$CLUSTER_QOS"); fi
    if [ -n "$gres" ]; then RES+=("--gres=$gres"); fi
    if [ -n "$cpus" ]; then RES+=("--cpus-per-task=$cpus"); fi
    if [ -n "$mem" ]; then RES+=("--mem=$mem"); fi
    if [ -n "$time" ]; then RES+=("--time=$time"); fi
    local more; read -ra more <<<"$extra"
    RES+=("${more[@]}")
}

# quote a command for printing; leaves $JOB_x references (dry-run ids) unquoted so the output runs as is
shellwords() {
    local a out=()
    for a in "$@"; do
        if [[ $a =~ ^[-A-Za-z0-9_./:=,%@+\$]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
    done
    printf '%s' "${out[*]}"
}

declare -A JOB=()   # name -> job id (dry run: a $JOB_name reference)
ORDER=()
cancel_submitted() {
    if [ "${#ORDER[@]}" -gt 0 ]; then
        echo "cancelling the jobs already submitted: ${ORDER[*]}" >&2
        local n; for n in "${ORDER[@]}"; do scancel "${JOB[$n]}" || true; done
    fi
}

# submit NAME DEPENDENCY SCRIPT ARGS... (uses RES; DEPENDENCY "" or a colon-joined list of job ids)
submit() {
    local name=$1 dep=$2; shift 2
    local cmd=(sbatch --parsable --kill-on-invalid-dep=yes "--job-name=instdiff-$profile-$name" "${RES[@]}")
    if [ -n "$dep" ]; then cmd+=("--dependency=afterok:$dep"); fi
    cmd+=("$@")
    if [ "$dry" = 1 ]; then
        printf 'JOB_%s=$(%s)\n' "$name" "$(shellwords "${cmd[@]}")"
        JOB[$name]="\$JOB_$name"
    elif [ "$local" = 1 ]; then
        run_local "$name" "$dep" "$@"
        JOB[$name]=$name
    else
        local out
        if ! out=$("${cmd[@]}"); then
            echo "error: sbatch failed for $name: $(shellwords "${cmd[@]}")" >&2
            cancel_submitted
            exit 1
        fi
        JOB[$name]=${out%%;*}   # --parsable prints "id" or "id;cluster"
        printf '%s\t%s\n' "$name" "${JOB[$name]}"
    fi
    ORDER+=("$name")
}

# run_local NAME DEPENDENCY [--array=A-B] SCRIPT ARGS...: run a job's script here with bash (array: each
# task in turn, as SLURM_ARRAY_TASK_ID), unless a dependency failed; records LOCAL_RC[NAME]
declare -A LOCAL_RC=()
run_local() {
    local name=$1 dep=$2 d lo=0 hi=0 task rc=0 log="outputs/slurm/local-$profile-$1.out"; shift 2
    for d in ${dep//:/ }; do
        if [ "${LOCAL_RC[$d]}" != 0 ]; then
            echo "== $name: SKIPPED (dependency $d failed)"; LOCAL_RC[$name]=skipped; return 0
        fi
    done
    if [[ $1 == --array=* ]]; then
        lo=${1#--array=}; lo=${lo%%%*}; hi=${lo#*-}; lo=${lo%-*}; shift
    fi
    : >"$log"
    for ((task = lo; task <= hi; task++)); do
        if [ "$hi" -gt 0 ] || [ "$lo" -gt 0 ]; then
            SLURM_ARRAY_TASK_ID=$task SLURM_ARRAY_TASK_COUNT=$((hi - lo + 1)) bash "$@" 2>&1 | tee -a "$log" || rc=$?
        else
            bash "$@" 2>&1 | tee -a "$log" || rc=$?
        fi
        if [ "$rc" != 0 ]; then break; fi
    done
    LOCAL_RC[$name]=$rc
    echo "== $name: $([ "$rc" = 0 ] && echo COMPLETED || echo "FAILED (rc=$rc)")"
}

nb_job() { # nb_job NB DEPENDENCY
    resources "$1" TIME
    submit "$1" "$2" jobs/run_notebook.sbatch "$1" "$profile" "jobs/params/$profile/$1.yaml"
}

n_shards=$(setting N_SHARDS)
if ! [[ $n_shards =~ ^[1-9][0-9]*$ ]]; then echo "error: ${P}_N_SHARDS='$n_shards' is not a positive integer" >&2; exit 2; fi
array="0-$((n_shards - 1))"
array_max=$(setting ARRAY_MAX)
if [ -n "$array_max" ]; then array+="%$array_max"; fi

# the full profile's assets, all checked before anything is submitted (instdiff_lib/report/assets.py)
read -ra CLI <<<"${INSTDIFF_CMD:-$CLUSTER_VENV/bin/instdiff}"
PREFLIGHT=("${CLI[@]}" report preflight --profile "$profile")

if [ "$dry" = 1 ]; then
    echo "# jobs/submit_all.sh $profile --dry-run: run from the repo root; outputs/slurm/ must exist"
    if [ "$profile" = full ]; then shellwords "${PREFLIGHT[@]}"; echo; fi
else
    if [ "$local" = 0 ]; then
        command -v sbatch >/dev/null || { echo "error: sbatch not found (no SLURM here; see ci/slurm/up.sh)" >&2; exit 1; }
    fi
    if [ "$profile" = full ] && ! "${PREFLIGHT[@]}"; then
        echo "error: the preflight found missing or broken assets (listed above): nothing submitted" >&2; exit 1
    fi
    mkdir -p outputs/slurm
fi

# -- the chain ---------------------------------------------------------------------------------------------
# in NOTEBOOKS order; the array goes in just before its first dependent (so, early in the queue)
for nb in "${NOTEBOOKS[@]}"; do
    if [ "$nb" = "$FINAL" ]; then
        ids=(); for n in "${ORDER[@]}"; do ids+=("${JOB[$n]}"); done
        nb_job "$nb" "$(IFS=:; echo "${ids[*]}")"
    elif [[ $AFTER_GENERATE == *" $nb "* ]]; then
        if [ -z "${JOB[generate]:-}" ]; then
            resources generate GEN_TIME
            submit generate "" "--array=$array" jobs/generate.sbatch "$profile" "$n_shards"
        fi
        nb_job "$nb" "${JOB[generate]}"
    else
        nb_job "$nb" ""
    fi
done

if [ "$dry" = 1 ]; then exit 0; fi
if [ "$local" = 1 ]; then
    bad=""; for n in "${ORDER[@]}"; do if [ "${LOCAL_RC[$n]}" != 0 ]; then bad+=" $n"; fi; done
    if [ -n "$bad" ]; then echo "FAILED or skipped:$bad" >&2; exit 1; fi
    echo "all ${#ORDER[@]} jobs COMPLETED (local run, no scheduler)"; exit 0
fi
for n in "${ORDER[@]}"; do printf '%s\t%s\n' "$n" "${JOB[$n]}"; done >"outputs/slurm/chain-$profile.tsv"
if [ "$wait" = 0 ]; then exit 0; fi

# -- --wait: poll `scontrol show job` and record each job's / array task's final state ---------------------
# Records are kept as they are seen, so a job that finished long ago and was purged from slurmctld
# (MinJobAge, 300 s by default) keeps its recorded state. Polling must be well below MinJobAge.
FINAL_STATES=" COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL OUT_OF_MEMORY BOOT_FAIL DEADLINE PREEMPTED "
declare -A STATE=() EXITC=() REASON=() LOG=() KEYS=() MISSES=()
re_id='^JobId=([0-9]+)'; re_aj=' ArrayJobId=([0-9]+)'; re_at=' ArrayTaskId=([^ ]+)'
re_st=' JobState=([A-Z_]+)'; re_ex=' ExitCode=([0-9:]+)'; re_rs=' Reason=([^ ]+)'; re_out=' StdOut=([^ ]+)'

is_final() { [[ $FINAL_STATES == *" $1 "* ]]; }

poll() { # poll NAME: refresh the records of one job (all its array tasks); sets active=1 if not finished
    local name=$1 out line key keys="" k
    out=$(scontrol -o show job "${JOB[$name]}" 2>/dev/null) || out=""
    if [ -z "$out" ]; then
        # purged or a transient error: keep what we saw; give up on a job never seen after 10 polls
        MISSES[$name]=$((${MISSES[$name]:-0} + 1))
        if [ -z "${KEYS[$name]:-}" ] && [ "${MISSES[$name]}" -lt 10 ]; then active=1; fi
        return 0
    fi
    while IFS= read -r line; do
        [[ $line =~ $re_id ]] || continue
        key=${BASH_REMATCH[1]}
        if [[ $line =~ $re_aj ]]; then
            key=${BASH_REMATCH[1]}; [[ $line =~ $re_at ]] && key+="_${BASH_REMATCH[1]}"
        fi
        k="$name|$key"
        STATE[$k]=UNKNOWN; [[ $line =~ $re_st ]] && STATE[$k]=${BASH_REMATCH[1]}
        EXITC[$k]=""; [[ $line =~ $re_ex ]] && EXITC[$k]=${BASH_REMATCH[1]}
        REASON[$k]=""; [[ $line =~ $re_rs ]] && REASON[$k]=${BASH_REMATCH[1]}
        LOG[$k]=""; [[ $line =~ $re_out ]] && LOG[$k]=${BASH_REMATCH[1]}
        is_final "${STATE[$k]}" || active=1
        keys+=" $key"
    done <<<"$out"
    # keep finished records that slurmctld no longer shows; drop stale pending ones (e.g. "123_2-3")
    for key in ${KEYS[$name]:-}; do
        if [[ " $keys " != *" $key "* ]] && is_final "${STATE[$name|$key]}"; then keys+=" $key"; fi
    done
    KEYS[$name]=$keys
}

summary() { # one line: name=STATE (arrays: name=STATE*count,...)
    local name key line="" s
    for name in "${ORDER[@]}"; do
        s=$(for key in ${KEYS[$name]:-}; do echo "${STATE[$name|$key]}"; done | sort | uniq -c |
            awk '{printf "%s%s%s", (NR > 1 ? "," : ""), $2, ($1 > 1 ? "*" $1 : "")}')
        line+=" $name=${s:-?}"
    done
    printf '%s' "$line"
}

timeout_s=${SUBMIT_TIMEOUT_S:-0}
poll_s=$(setting POLL_S); poll_s=${poll_s:-5}
min_job_age=$(scontrol show config 2>/dev/null | awk '$1 == "MinJobAge" {print $3 + 0}' || true)
if [ -n "$min_job_age" ] && awk -v p="$poll_s" -v m="$min_job_age" 'BEGIN {exit !(p * 2 >= m)}'; then
    echo "warning: ${P}_POLL_S=$poll_s is not well below MinJobAge=${min_job_age}s: finished jobs may be" \
         "purged before they are seen (they would then count as failed)" >&2
fi
t0=$SECONDS last=""
echo "waiting for ${#ORDER[@]} jobs (poll ${poll_s}s, timeout ${timeout_s}s; 0 = none)"
while :; do
    active=0
    for n in "${ORDER[@]}"; do poll "$n"; done
    now=$(summary)
    if [ "$now" != "$last" ]; then printf '[%5ds]%s\n' $((SECONDS - t0)) "$now"; last=$now; fi
    if [ "$active" = 0 ]; then break; fi
    if [ "$timeout_s" -gt 0 ] && [ $((SECONDS - t0)) -ge "$timeout_s" ]; then
        echo "TIMEOUT after ${timeout_s}s (SUBMIT_TIMEOUT_S); the jobs keep running. To stop them:" >&2
        echo "  scancel $(for n in "${ORDER[@]}"; do echo "${JOB[$n]}"; done | paste -sd" ")" >&2
        exit 124
    fi
    sleep "$poll_s"
done

rc=0
printf '%-24s %-12s %-14s %-6s %s\n' job id state exit reason
for name in "${ORDER[@]}"; do
    if [ -z "${KEYS[$name]:-}" ]; then
        printf '%-24s %-12s %-14s\n' "$name" "${JOB[$name]}" "UNKNOWN (no record: purged after MinJobAge?)"
        rc=1; continue
    fi
    for key in ${KEYS[$name]}; do
        k="$name|$key"
        printf '%-24s %-12s %-14s %-6s %s\n' "$name" "$key" "${STATE[$k]}" "${EXITC[$k]}" "${REASON[$k]}"
        if [ "${STATE[$k]}" != COMPLETED ]; then rc=1; fi
    done
done
if [ "$rc" = 0 ]; then echo "all ${#ORDER[@]} jobs COMPLETED"; exit 0; fi

for name in "${ORDER[@]}"; do
    for key in ${KEYS[$name]:-}; do
        k="$name|$key"
        if [ "${STATE[$k]}" = COMPLETED ]; then continue; fi
        if [ -n "${LOG[$k]}" ] && [ -f "${LOG[$k]}" ]; then
            echo "----- $name ($key) ${STATE[$k]}: last ${SUBMIT_LOG_TAIL:-40} lines of ${LOG[$k]#"$PWD"/}"
            tail -n "${SUBMIT_LOG_TAIL:-40}" "${LOG[$k]}"
        else
            echo "----- $name ($key) ${STATE[$k]} ${REASON[$k]}: never ran (no log)"
        fi
    done
done
echo "FAILED: not every job ended COMPLETED (see above)" >&2
exit 1
