#!/usr/bin/env bash
# Stop the cluster ci/slurm/up.sh started: cancel every job, wait (max 30 s) until the queue is empty --
# running jobs would outlive the daemons (slurmstepd is detached) -- then TERM only the recorded PIDs
# (slurmd, slurmctld, munged), KILL after 10 s. Safe to call when nothing is running (CI calls it from a trap).
set -u
export PATH="$PATH:/usr/sbin:/sbin"
STATE=${SLURM_CI_STATE:-/run/slurm-ci}
t0=$SECONDS
# a PID is alive if it exists and is not a zombie (PID 1 may not reap our orphaned daemons promptly)
alive() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

if [ -f "$STATE/slurmctld.pid" ] && alive "$(cat "$STATE/slurmctld.pid")"; then
    ids=$(squeue -h -o %F 2>/dev/null | sort -u)
    if [ -n "$ids" ]; then
        echo "cancelling jobs: ${ids//$'\n'/ }"
        # shellcheck disable=SC2086
        scancel $ids
        for _ in $(seq 300); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
        left=$(squeue -h -o %i 2>/dev/null)
        if [ -n "$left" ]; then echo "warning: jobs still in the queue after 30 s: ${left//$'\n'/ }" >&2; fi
    fi
fi
for d in slurmd slurmctld munged; do
    f="$STATE/$d.pid"
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then echo "$d ($pid) still alive after 10 s: SIGKILL"; kill -KILL "$pid"; fi
    rm -f "$f"
done
echo "slurm down in $((SECONDS - t0))s"
