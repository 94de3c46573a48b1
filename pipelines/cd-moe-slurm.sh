#!/bin/sh
# cd-moe-slurm.sh - CD-MoE with the expert ranking spread over a cluster.
#
#   pipelines/cd-moe-slurm.sh MODEL_DIR CALIB.jsonl [--out DIR] [--shards N]
#                             [--runner slurm|parallel|local] [--sshlogin HOSTS]
#
# The per-layer expert ranking (stage 3) is the long step on large models; its
# layers are independent.  This runs pipelines/cd-moe.sh's stages 1-2
# (tokenize, calibrate), then the ranking as N shards of MoE layers (each
# `moe-expert-rank --layers LIST`, writing OUT/03-rank-I.msgpack.zst), joins
# them with moe-merge into OUT/03-ranked.msgpack.zst, and runs stages 4-6
# (layer search, condense, evaluate).  The rankings are the single-machine
# run's, record for record; only the work accounting and provenance differ.
#   --runner slurm     (default) each step is an sbatch job, the shards one
#                      array job (--array=0-N-1); sbatch --wait between steps.
#                      Extra sbatch options: SBATCH_ARGS (e.g. "-p gpu --gres=gpu:1").
#   --runner parallel  the shards through GNU parallel, over --sshlogin HOSTS
#                      (parallel's syntax, e.g. 2/node1,2/node2); the rest here.
#   --runner local     everything here, the shards one after another.
# OUT, MODEL_DIR and the tools (BIN) must be at the same paths on every node
# (a shared file system).  EXPERTS, LAYERS, MAX_LENGTH, TASKS as cd-moe.sh.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$here/bin}
export BIN PATH="$BIN:$PATH"
EXPERTS=${EXPERTS:-2}
MAX_LENGTH=${MAX_LENGTH:-256}
export EXPERTS MAX_LENGTH

model= calib= out=work/cd-moe shards=2 runner=slurm sshlogin=:
while [ $# -gt 0 ]; do
    case $1 in
    --out) out=$2; shift 2 ;;
    --shards) shards=$2; shift 2 ;;
    --runner) runner=$2; shift 2 ;;
    --sshlogin) sshlogin=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "cd-moe-slurm.sh: unknown option $1" >&2; exit 2 ;;
    *) if [ -z "$model" ]; then model=$1; elif [ -z "$calib" ]; then calib=$1;
       else echo "cd-moe-slurm.sh: too many arguments" >&2; exit 2; fi; shift ;;
    esac
done
usage() { echo "cd-moe-slurm.sh: $*" >&2; exit 2; }
[ -n "$calib" ] || usage "MODEL_DIR and CALIB.jsonl are required"
case $shards in ''|*[!0-9]*|0) usage "--shards $shards: a positive number" ;; esac
case $runner in
slurm) command -v sbatch >/dev/null || usage "--runner slurm: sbatch not found" ;;
parallel) command -v parallel >/dev/null || usage "--runner parallel: GNU parallel not found" ;;
local) ;;
*) usage "--runner $runner: slurm, parallel or local" ;;
esac
mkdir -p "$out"
out=$(cd "$out" && pwd) model=$(cd "$model" && pwd)
calib=$(cd "$(dirname "$calib")" && pwd)/$(basename "$calib")
log() { echo "cd-moe-slurm: $*" >&2; }

# run_job NAME COMMAND: one step, as a Slurm job or here
run_job() {
    if [ $runner = slurm ]; then
        # shellcheck disable=SC2086
        sbatch --wait --quiet -J "cdmoe-$1" -o "$out/slurm-$1.log" ${SBATCH_ARGS:-} --wrap "$2" \
            || { log "$1 failed: see $out/slurm-$1.log"; exit 1; }
    else
        sh -c "$2"
    fi
}

pipeline="sh '$here/pipelines/cd-moe.sh' '$model' '$calib' --out '$out'"
log "stages 1-2: tokenize, calibrate"
run_job calib "$pipeline --last 2"
s2=$out/02-calib.msgpack.zst
[ -s "$s2" ] || { log "no calibration stream $s2"; exit 1; }

# the MoE layers, from the calibration records, dealt into contiguous shards
moe-dump --type calib "$s2" | sed -n 's/.*"type":"calib","layer":\([0-9]*\).*/\1/p' >"$out/moe-layers.txt"
n_layers=$(wc -l <"$out/moe-layers.txt")
[ "$n_layers" -gt 0 ] || { log "$s2: no calib records"; exit 1; }
[ "$shards" -le "$n_layers" ] || shards=$n_layers
awk -v n="$n_layers" -v s="$shards" '
    { shard = int((NR - 1) * s / n); if (shard in list) list[shard] = list[shard] "," $1; else list[shard] = $1 }
    END { for (i = 0; i < s; i++) print list[i] }' "$out/moe-layers.txt" >"$out/shards.txt"
rm -f "$out"/03-rank-*.msgpack.zst

# one shard: line I+1 of shards.txt
cat >"$out/rank-shard.sh" <<EOS
#!/bin/sh
# rank-shard.sh I: moe-expert-rank on shard I (written by cd-moe-slurm.sh)
set -eu
PATH="$BIN:\$PATH"
i=\${1:-\${SLURM_ARRAY_TASK_ID:?}}
layers=\$(sed -n "\$((i + 1))p" "$out/shards.txt")
moe-expert-rank --model "$model" --max-experts $EXPERTS --max-length $MAX_LENGTH --layers "\$layers" \\
    --quiet -o "$out/03-rank-\$i.msgpack.zst.part" "$s2"
mv "$out/03-rank-\$i.msgpack.zst.part" "$out/03-rank-\$i.msgpack.zst"
EOS
log "stage 3: rank experts, $shards shards of $n_layers MoE layers ($runner)"
case $runner in
slurm)
    # shellcheck disable=SC2086
    sbatch --wait --quiet -J cdmoe-rank --array=0-$((shards - 1)) -o "$out/slurm-rank-%a.log" \
        ${SBATCH_ARGS:-} "$out/rank-shard.sh" || { log "ranking failed: see $out/slurm-rank-*.log"; exit 1; } ;;
parallel)
    seq 0 $((shards - 1)) | parallel --will-cite --halt now,fail=1 --sshlogin "$sshlogin" sh "$out/rank-shard.sh" {} ;;
local)
    i=0
    while [ $i -lt "$shards" ]; do sh "$out/rank-shard.sh" $i; i=$((i + 1)); done ;;
esac
set --
i=0
while [ $i -lt "$shards" ]; do
    [ -s "$out/03-rank-$i.msgpack.zst" ] || { log "shard $i wrote nothing"; exit 1; }
    set -- "$@" "$out/03-rank-$i.msgpack.zst"
    i=$((i + 1))
done
moe-merge -o "$out/03-ranked.msgpack.zst" "$@"
moe-dump --check "$out/03-ranked.msgpack.zst" >&2

log "stages 4-6: search layers, condense, evaluate"
run_job finish "$pipeline --stage 4"
log "done; intermediates in $out"
