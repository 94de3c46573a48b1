# pipelines/cd-moe-slurm.sh for real: a one-node Slurm cluster (Debian's
# slurm-wlm and munge) started in a temporary directory, the expert ranking as
# a 3-task array job; the rankings, the plan and the condensed checkpoint must
# be byte-identical to the single-machine run of pipelines/cd-moe.sh.  The
# runners local and parallel (GNU parallel, when installed) and the usage
# errors need no Slurm.  Skips, loudly, when the
# daemons are missing or cannot start (e.g. not root).
. tests/shell/lib.sh
ROOT=$PWD
export EXPERTS=2 LAYERS=2 MAX_LENGTH=64 BIN="${BIN%/}"
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac

# single machine, the built-in default model
sh pipelines/cd-moe.sh --out "$TMP/one" >"$TMP/one.log" 2>&1 || fail "cd-moe.sh: $(tail -5 "$TMP/one.log")"
M=$TMP/one/model C=$TMP/one/calib.jsonl

same_result() { # DIR: its rankings, plan and checkpoint are the single run's
    for kind in ranking plan; do
        # records only: the header's provenance names other paths
        moe-dump --full --type $kind "$1/04-plan.msgpack.zst" | tail -n +2 >"$TMP/b.txt" || fail "$1: moe-dump"
        moe-dump --full --type $kind "$TMP/one/04-plan.msgpack.zst" | tail -n +2 >"$TMP/a.txt"
        [ -s "$TMP/a.txt" ] || fail "no $kind records"
        cmp -s "$TMP/a.txt" "$TMP/b.txt" || fail "$1: $kind records differ from the single run's"
    done
    cmp -s "$1/condensed/model.safetensors" "$TMP/one/condensed/model.safetensors" \
        || fail "$1: condensed checkpoint differs from the single run's"
}

sh pipelines/cd-moe-slurm.sh --runner local --shards 2 "$M" "$C" --out "$TMP/local" >"$TMP/local.log" 2>&1 \
    || fail "runner local: $(tail -5 "$TMP/local.log")"
[ "$(cat "$TMP/local/shards.txt")" = "1,2,3
4,5" ] || fail "shards: $(cat "$TMP/local/shards.txt")"
same_result "$TMP/local"
if command -v parallel >/dev/null 2>&1; then   # GNU parallel, this machine as the one "host"
    sh pipelines/cd-moe-slurm.sh --runner parallel --sshlogin : --shards 3 "$M" "$C" --out "$TMP/par" \
        >"$TMP/par.log" 2>&1 || fail "runner parallel: $(tail -5 "$TMP/par.log")"
    same_result "$TMP/par"
else
    echo "NOTE: GNU parallel not installed: --runner parallel NOT tested" >&2
fi
expect_fail 2 "--shards x: a positive number" sh pipelines/cd-moe-slurm.sh --runner local --shards x "$M" "$C"
expect_fail 2 "--runner pbs: slurm, parallel or local" sh pipelines/cd-moe-slurm.sh --runner pbs "$M" "$C"
expect_fail 2 "MODEL_DIR and CALIB.jsonl are required" sh pipelines/cd-moe-slurm.sh "$M"

# ---- a one-node Slurm cluster ----------------------------------------------------
for d in munged slurmctld slurmd sbatch sinfo; do
    command -v $d >/dev/null 2>&1 || [ -x /usr/sbin/$d ] || skip "$d not installed (apt-get install slurm-wlm munge): the Slurm run is NOT tested"
done
PATH=$PATH:/usr/sbin
[ "$(id -u)" = 0 ] || skip "not root: cannot start slurmd here; the Slurm run is NOT tested"
S=$TMP/slurm
mkdir -p "$S/state" "$S/spool" "$S/munge"
chmod 700 "$S/munge"
head -c 128 /dev/urandom >"$S/munge/key" && chmod 600 "$S/munge/key"
stop_cluster() { # the daemons this test started, by their pid files
    for p in "$S/d.pid" "$S/ctld.pid" "$S/munge/pid"; do
        [ -s "$p" ] || continue
        pid=$(cat "$p")
        kill "$pid" 2>/dev/null
        n=0
        while kill -0 "$pid" 2>/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    done
    rm -rf "$TMP"
}
trap stop_cluster EXIT
munged --force --socket="$S/munge/sock" --key-file="$S/munge/key" --pid-file="$S/munge/pid" \
    --log-file="$S/munge/log" --seed-file="$S/munge/seed" 2>"$S/munged.err" \
    || skip "munged does not start: $(cat "$S/munged.err"); the Slurm run is NOT tested"
port=$((20000 + $$ % 20000))
host=$(hostname -s)
cat >"$S/slurm.conf" <<EOC
ClusterName=cdmoetest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$S/munge/sock
SlurmctldPort=$port
SlurmdPort=$((port + 1))
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/ctld.pid
SlurmdPidFile=$S/d.pid
SlurmctldLogFile=$S/ctld.log
SlurmdLogFile=$S/d.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=cdmoe Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOC
export SLURM_CONF=$S/slurm.conf
slurmctld -f "$S/slurm.conf" 2>"$S/ctld.err" || skip "slurmctld does not start: $(cat "$S/ctld.err"); NOT tested"
slurmd -f "$S/slurm.conf" 2>"$S/d.err" || skip "slurmd does not start: $(cat "$S/d.err"); NOT tested"
i=0
until sinfo -h -o %T 2>/dev/null | grep -q idle; do
    i=$((i + 1))
    [ $i -lt 30 ] || skip "the Slurm node never became idle: $(tail -3 "$S/d.log"); NOT tested"
    sleep 1
done

TASKS= timeout 600 sh pipelines/cd-moe-slurm.sh --shards 3 "$M" "$C" --out "$TMP/slurm-run" \
    >"$TMP/slurm.log" 2>&1 || fail "cd-moe-slurm.sh: $(tail -5 "$TMP/slurm.log")"
grep -q "3 shards of 5 MoE layers (slurm)" "$TMP/slurm.log" || fail "not run as 3 shards: $(cat "$TMP/slurm.log")"
for i in 0 1 2; do
    [ -s "$TMP/slurm-run/03-rank-$i.msgpack.zst" ] || fail "array task $i wrote nothing"
done
same_result "$TMP/slurm-run"
exit 0
