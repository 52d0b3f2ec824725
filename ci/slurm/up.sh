#!/usr/bin/env bash
# Start a real single-node SLURM "cluster" on localhost for CI (Debian 12/13, root, no systemd needed).
# Installs slurmctld/slurmd/slurm-client/munge if missing, writes /etc/slurm/slurm.conf, starts munged,
# slurmctld and slurmd in the foreground under `&` (PIDs recorded in $SLURM_CI_STATE, default
# /run/slurm-ci; stdin/stdout/stderr away from the caller) and waits until the node is idle.
# Stop with ci/slurm/down.sh. Recipe and the reason for each setting: shared/spec/slurm_local.md.
#
# Env knobs:
#   SLURM_PARTITIONS="debug gpu"   partitions (all on the one node); the first is the default
#   SLURM_FAKE_GPUS=N              advertise N fake GPUs (GRES backed by /dev/null symlinks); default 0
#   SLURM_FAKE_CPUS / SLURM_FAKE_MEM_MB   advertise more CPUs/memory than the hardware (config_overrides)
#   SLURM_FAKE_FEATURES=a100,...   node features (for --constraint)
#   SLURM_AUTH=munge|none          default munge (auth/none only exists up to SLURM 23.02)
#   SLURM_CI_FORCE=1               overwrite an /etc/slurm/slurm.conf this script did not write
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
STATE=${SLURM_CI_STATE:-/run/slurm-ci}
LOGDIR=/var/log/slurm
CONF=/etc/slurm/slurm.conf
MARK="# written by ci/slurm/up.sh"
t0=$SECONDS

if [ "$(id -u)" -ne 0 ]; then echo "ci/slurm/up.sh: must run as root (or via sudo)" >&2; exit 1; fi
mkdir -p "$STATE"
if [ -f "$STATE/slurmctld.pid" ] && [ -d "/proc/$(cat "$STATE/slurmctld.pid")" ] &&
   [ "$(awk '{print $3}' "/proc/$(cat "$STATE/slurmctld.pid")/stat")" != Z ]; then
    echo "ci/slurm/up.sh: already running (slurmctld pid $(cat "$STATE/slurmctld.pid")); run down.sh first" >&2
    sinfo
    exit 0
fi
if ps -eo stat=,comm= | awk '$1 !~ /^Z/ && ($2 == "slurmctld" || $2 == "slurmd") {f = 1} END {exit !f}'; then
    echo "ci/slurm/up.sh: a slurmctld/slurmd not started by this script is running; refusing" >&2; exit 1
fi
if [ -f "$CONF" ] && ! grep -qxF "$MARK" "$CONF" && [ "${SLURM_CI_FORCE:-0}" != 1 ]; then
    echo "ci/slurm/up.sh: $CONF exists and was not written by this script; refusing (SLURM_CI_FORCE=1)" >&2
    exit 1
fi

# -- packages (Debian's own; ~8 packages, 3.5 MB) ---------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
   ! command -v munged >/dev/null; then
    echo "installing slurmctld slurmd slurm-client munge ..."
    aptlog=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
               --no-install-recommends slurmctld slurmd slurm-client munge; } >"$aptlog" 2>&1; then
        cat "$aptlog" >&2; rm -f "$aptlog"
        echo "ci/slurm/up.sh: installing the SLURM packages failed" >&2; exit 1
    fi
    rm -f "$aptlog"
fi
echo "slurm $(dpkg-query -W -f '${Version}' slurmctld 2>/dev/null || echo '?') installed ($((SECONDS - t0))s)"

# -- slurm.conf ---------------------------------------------------------------------------------------------------
AUTH=${SLURM_AUTH:-munge}
NCPU=$(nproc)
MEM_MB=$(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo)
CPUS=${SLURM_FAKE_CPUS:-$NCPU}
REALMEM=${SLURM_FAKE_MEM_MB:-$((MEM_MB - 1024))}
GPUS=${SLURM_FAKE_GPUS:-0}
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR" /run/slurm
GRES_TYPES="" GRES_NODE=""
if [ "$GPUS" -gt 0 ]; then
    # 22.05 drops file-less GPUs and wants char/block devices: fake devices are symlinks to /dev/null
    # (never opened: task/none, no cgroups). CUDA_VISIBLE_DEVICES gets set in jobs; it is no GPU signal.
    GRES_TYPES="GresTypes=gpu" GRES_NODE="Gres=gpu:$GPUS"
    mkdir -p "$STATE/fakegpu"
    for i in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "$STATE/fakegpu/gpu$i"; done
    echo "NodeName=localhost Name=gpu File=$STATE/fakegpu/gpu[0-$((GPUS - 1))]" >/etc/slurm/gres.conf
else
    rm -f /etc/slurm/gres.conf
fi
OVERRIDES=""
if [ "$CPUS" != "$NCPU" ] || [ -n "${SLURM_FAKE_MEM_MB:-}" ]; then OVERRIDES="SlurmdParameters=config_overrides"; fi
cat >"$CONF" <<CONF
$MARK
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/$AUTH
CredType=cred/$AUTH
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# the default batch_sched_delay=3 costs ~3 s per scheduling step
SchedulerParameters=${SLURM_SCHED_PARAMS:-batch_sched_delay=0}
# cancel dependents of a failed job (in SchedulerParameters this is silently ignored by 22.05)
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
# not CR_Core_Memory: without DefMemPerCPU each job would take the whole node's memory
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
# finished jobs stay visible to scontrol for 5 min (afterok on a purged id is rejected)
MinJobAge=300
KillWait=5
$GRES_TYPES
$OVERRIDES
# reject impossible requests at submit instead of pending forever
EnforcePartLimits=ALL
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REALMEM $GRES_NODE ${SLURM_FAKE_FEATURES:+Features=$SLURM_FAKE_FEATURES} State=UNKNOWN
CONF
DEF=YES
for p in ${SLURM_PARTITIONS:-debug gpu}; do
    echo "PartitionName=$p Nodes=localhost Default=$DEF MaxTime=INFINITE State=UP" >>"$CONF"
    DEF=NO
done

# -- daemons: foreground (-D / -F) under &, so $! is the daemon's PID; nothing holds the caller's stdio ---------
if [ "$AUTH" = munge ] && munge -n >/dev/null 2>&1; then
    echo "munged already running (not ours); reusing it"
elif [ "$AUTH" = munge ]; then
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create 2>/dev/null ||
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
        </dev/null >"$LOGDIR/munged.stdout" 2>&1 &
    echo $! >"$STATE/munged.pid"
    for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
fi
/usr/sbin/slurmctld -D -c </dev/null >"$LOGDIR/slurmctld.stdout" 2>&1 &
echo $! >"$STATE/slurmctld.pid"
/usr/sbin/slurmd -D -N localhost </dev/null >"$LOGDIR/slurmd.stdout" 2>&1 &
echo $! >"$STATE/slurmd.pid"

st=""
for _ in $(seq 150); do   # up to 30 s
    st=$(sinfo -h -n localhost -o '%T' 2>/dev/null | head -n1 || true)
    case "$st" in idle | mixed | allocated) break ;; esac
    sleep 0.2
done
case "$st" in
    idle | mixed | allocated) ;;
    *)
        echo "ci/slurm/up.sh: slurm did not come up (node state '$st')" >&2
        tail -n 20 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 || true
        exit 1
        ;;
esac
sinfo
echo "slurm up in $((SECONDS - t0))s (pids in $STATE; stop with ci/slurm/down.sh)"
