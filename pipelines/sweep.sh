#!/bin/sh
# sweep.sh - CD-MoE against the paper's baselines over a range of layer counts:
# a table (Markdown + JSON) and plots like the paper's figures.
#
#   pipelines/sweep.sh MODEL_DIR CALIB.jsonl [EVAL...] [--out DIR] [--layers "1 2 3"]
#                      [--experts K] [--prune "N..."] [--methods "..."] [--tune]
#                      [--tune-data FILE]
#
# Methods (--methods, default all): cdmoe-s0 (CD-MoE E(s+0): shared experts
# only), cdmoe-sk (E(s+K), K = --experts, default the model's top-k), layerdrop,
# blockdrop (greedy on the same divergence as CD-MoE), layerdrop-cos,
# blockdrop-cos (He et al.'s one-shot cosine criterion), prune-freq,
# prune-reap (expert pruning, the router kept: N routed experts per MoE layer
# for each N of --prune, default half and three quarters of them).
# Each method is run for every N of --layers (default 1 .. MoE layers - 1),
# evaluated with moe-eval (perplexity on the EVAL files that hold {"text"},
# multiple-choice accuracy on the others; CALIB when no EVAL is given),
# benchmarked (prefill speedup) and measured (memory ratio = parameters /
# the dense model's).  --tune also tunes each checkpoint with moe-tune (when
# built; on --tune-data, any data moe-tune reads, else on the calibration
# tokens; TUNE_ARGS adds options, e.g. "--steps 200 --sft sft.jsonl") and
# evaluates it as METHOD+tune.  Every method trains every weight it still has
# (--train all), so that all are tuned alike; TUNE_TRAIN=paper trains only
# CD-MoE's condensed layers' experts, as the paper does.  The dense model
# tuned the same way is the row dense+tune, the control: what tuning alone
# gives (if it gains, part of every method's gain is not recovery).
# Everything goes under --out (default work/sweep): the streams (tokens,
# calib with REAP, every plan), the checkpoints, one eval JSON per run; a
# rerun reuses what exists (delete a file to redo it).  Results:
#   OUT/sweep.md  OUT/sweep.json  OUT/sweep-memory.svg  OUT/sweep-speedup.svg
#   (and .png of both when gnuplot is installed: apt-get install gnuplot-nox);
#   when there are both accuracies and perplexities, the plots of the other
#   one too: OUT/sweep-memory-ppl.svg and sweep-speedup-ppl.svg (or -acc).
# Progress: one line per run on stderr.  BENCH_TOKENS (default 128) and
# BENCH_RUNS (3) size the benchmark; MAX_LENGTH (256) the search's sequences;
# PLOT_Y=perplexity plots perplexity even when a task gives accuracies.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$here/bin}
PATH="$BIN:$PATH"
MAX_LENGTH=${MAX_LENGTH:-256}
BENCH_TOKENS=${BENCH_TOKENS:-128}
BENCH_RUNS=${BENCH_RUNS:-3}
ALL_METHODS="cdmoe-s0 cdmoe-sk layerdrop blockdrop layerdrop-cos blockdrop-cos prune-freq prune-reap"

usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "sweep: $1" >&2; exit "${2:-1}"; }
model= calib= evals= out=work/sweep layers= experts= prune= methods=$ALL_METHODS tune=0 tune_data=
while [ $# -gt 0 ]; do
    case $1 in
    --out) out=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --experts) experts=$2; shift 2 ;;
    --prune) prune=$2; shift 2 ;;
    --methods) methods=$2; shift 2 ;;
    --tune) tune=1; shift ;;
    --tune-data) tune_data=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" 2 ;;
    *) if [ -z "$model" ]; then model=$1; elif [ -z "$calib" ]; then calib=$1;
       else evals="$evals $1"; fi; shift ;;
    esac
done
[ -n "$model" ] && [ -n "$calib" ] || { usage >&2; die "MODEL_DIR and CALIB.jsonl are required" 2; }
[ -f "$model/config.json" ] || die "$model: no config.json"
[ -f "$calib" ] || die "$calib: no such file"
[ -z "$tune_data" ] || [ -f "$tune_data" ] || die "--tune-data $tune_data: no such file"
TUNE_TRAIN=${TUNE_TRAIN:-all}
case $TUNE_TRAIN in all|paper) ;; *) die "TUNE_TRAIN=$TUNE_TRAIN: not all or paper" 2 ;; esac
for m in $methods; do
    case " $ALL_METHODS " in *" $m "*) ;; *) die "--methods: unknown method '$m' (known: $ALL_METHODS)" 2 ;; esac
done
[ -n "$evals" ] || evals=$calib
mkdir -p "$out/runs"

log() { echo "sweep: $*" >&2; }
# the value of a numeric key in a one-line JSON object ("" when absent)
jnum() { sed -n "s/.*\"$1\": \(-\{0,1\}[0-9][0-9.eE+-]*\).*/\1/p" "$2" | head -n 1; }
# run CMD... writing FILE unless FILE exists (then: reused); temporary name, renamed when done
make_file() { # FILE CMD...
    f=$1; shift
    if [ -e "$f" ]; then log "  reused $f"; return 0; fi
    "$@" >"$f.tmp" 2>"$f.log" || { cat "$f.log" >&2; rm -f "$f.tmp"; die "failed: $*"; }
    mv "$f.tmp" "$f"
}
make_dir() { # DIR CMD... (the command writes DIR itself)
    d=$1; shift
    if [ -d "$d" ]; then log "  reused $d"; return 0; fi
    "$@" >"$d.log" 2>&1 || { cat "$d.log" >&2; die "failed: $*"; }
}

# ---- the model's shape, the ranges --------------------------------------------------------
cfgv() { sed -n "s/^ *\"$1\": \([0-9][0-9]*\).*/\1/p" "$model/config.json" | head -n 1; }
topk=$(cfgv num_experts_per_tok)
nexp=$(cfgv n_routed_experts); [ -n "$nexp" ] || nexp=$(cfgv num_experts); [ -n "$nexp" ] || nexp=$(cfgv num_local_experts)
[ -n "$experts" ] || experts=$topk
[ -n "$prune" ] || prune="$((nexp * 3 / 4)) $((nexp / 2))"

# ---- shared streams ----------------------------------------------------------------------
log "streams in $out"
make_file "$out/tokens.msgpack.zst" moe-tokenize --model "$model" --max-length "$MAX_LENGTH" "$calib"
make_file "$out/calib.msgpack.zst" moe-calib --quiet --reap --model "$model" "$out/tokens.msgpack.zst"
nmoe=$(moe-dump --type calib "$out/calib.msgpack.zst" | grep -c '"type":"calib"')
[ -n "$layers" ] || layers=$(seq 1 $((nmoe > 1 ? nmoe - 1 : 1)) | tr '\n' ' ')
for n in $layers; do
    [ "$n" -ge 1 ] && [ "$n" -le "$nmoe" ] || die "--layers: $n is not in 1..$nmoe (MoE layers)" 2
done
maxn=$(for n in $layers; do echo "$n"; done | sort -n | tail -n 1)
search() { # OUT OPTIONS... : a plan of maxn layers
    f=$1; shift
    make_file "$f" moe-layer-search --quiet --model "$model" --max-length "$MAX_LENGTH" --layers "$maxn" "$@"
}
plan_of() { # METHOD: the plan stream it condenses from (one for every layer count)
    case $1 in cdmoe-sk) echo "$out/plan-cdmoe-s$experts.msgpack.zst" ;; *) echo "$out/plan-$1.msgpack.zst" ;; esac
}
make_plan() { # METHOD
    p=$(plan_of "$1")
    case $1 in
    cdmoe-s0) search "$p" --experts 0 "$out/calib.msgpack.zst" ;;
    cdmoe-sk)
        make_file "$out/ranked.msgpack.zst" moe-expert-rank --quiet --model "$model" --max-experts "$experts" \
            --max-length "$MAX_LENGTH" "$out/calib.msgpack.zst"
        search "$p" --experts "$experts" "$out/ranked.msgpack.zst" ;;
    layerdrop|blockdrop) search "$p" --method "$1" "$out/calib.msgpack.zst" ;;
    *-cos) search "$p" --method "${1%-cos}" --criterion cosine "$out/calib.msgpack.zst" ;;
    esac
}
for m in $methods; do
    case $m in prune-*) ;; *) log "plan: $m"; make_plan "$m" ;; esac
done

# ---- the runs ------------------------------------------------------------------------------
eval_args=
for e in $evals; do
    if head -n 1 "$e" | grep -q '"text"'; then eval_args="$eval_args --ppl $e"; else eval_args="$eval_args --task $e"; fi
done
evaluate() { # CKPT OUT.json
    make_file "$2" moe-eval --quiet -m "$1" $eval_args --bench --bench-tokens "$BENCH_TOKENS" \
        --bench-runs "$BENCH_RUNS" --json
}
tune() { # METHOD CKPT [OUT]: OUT (default CKPT-tuned), when moe-tune is built.  Every method
         # trains every weight it has (TUNE_TRAIN=all), the dense model too (the control: what
         # tuning alone gives); TUNE_TRAIN=paper: CD-MoE only its condensed layers' experts
    [ "$tune" = 1 ] || return 1
    if [ ! -x "$BIN/moe-tune" ]; then log "  --tune: moe-tune is not built; tuning skipped"; return 1; fi
    case $TUNE_TRAIN:$1 in paper:cdmoe-*) set -- "$2" condensed "${3:-$2-tuned}" ;; *) set -- "$2" all "${3:-$2-tuned}" ;; esac
    if [ -d "$3" ]; then log "  reused $3"; return 0; fi
    # a method moe-tune cannot train is reported and left untuned; the sweep goes on
    moe-tune --quiet --model "$1" -o "$3" --data "${tune_data:-$out/tokens.msgpack.zst}" --train "$2" ${TUNE_ARGS:-} \
        >"$3.log" 2>&1 || { log "  tuning failed, row skipped: $(tail -n 1 "$3.log")"; return 1; }
}

runs=
total=0
for m in $methods; do
    case $m in prune-*) for n in $prune; do total=$((total + 1)); done ;;
               *) for n in $layers; do total=$((total + 1)); done ;; esac
done
i=0
log "[dense] evaluating $model"
evaluate "$model" "$out/runs/dense.json"
if tune dense "$model" "$out/runs/dense-tuned"; then
    evaluate "$out/runs/dense-tuned" "$out/runs/dense-tuned.json"
    runs="dense+tune:0:$out/runs/dense-tuned.json"
fi
for m in $methods; do
    case $m in prune-*) counts=$prune ;; *) counts=$layers ;; esac
    for n in $counts; do
        i=$((i + 1))
        name=$m-$n ck=$out/runs/$m-$n
        log "[$i/$total] $name"
        case $m in
        cdmoe-s0) make_dir "$ck" moe-condense --model "$model" --layers "$n" --experts 0 -o "$ck" "$(plan_of $m)" ;;
        cdmoe-sk) make_dir "$ck" moe-condense --model "$model" --layers "$n" --experts "$experts" -o "$ck" "$(plan_of $m)" ;;
        layerdrop|blockdrop) make_dir "$ck" moe-condense --model "$model" --method $m --layers "$n" -o "$ck" "$(plan_of $m)" ;;
        *-cos) make_dir "$ck" moe-condense --model "$model" --method "${m%-cos}" --layers "$n" -o "$ck" "$(plan_of $m)" ;;
        prune-*) make_dir "$ck" moe-condense --model "$model" --method $m --experts "$n" -o "$ck" "$out/calib.msgpack.zst" ;;
        esac
        evaluate "$ck" "$ck.json"
        runs="$runs $m:$n:$ck.json"
        if tune "$m" "$ck"; then
            evaluate "$ck-tuned" "$ck-tuned.json"
            runs="$runs $m+tune:$n:$ck-tuned.json"
        fi
    done
done

# ---- the table --------------------------------------------------------------------------
d=$out/runs/dense.json
dparams=$(jnum params "$d") dsec=$(jnum seconds "$d")
row() { # METHOD N FILE: method n params memory_ratio active speedup ppl acc
    p=$(jnum params "$3") s=$(jnum seconds "$3")
    awk -v m="$1" -v n="$2" -v p="$p" -v dp="$dparams" -v a="$(jnum active_params "$3")" -v s="$s" -v ds="$dsec" \
        -v ppl="$(sed -n 's/.*"ppl": {"ppl": \([0-9.eE+-]*\).*/\1/p' "$3")" \
        -v acc="$(sed -n 's/.*"average": {"acc": \([0-9.eE+-]*\).*/\1/p' "$3")" \
        'BEGIN { printf "%s %s %s %.4f %s %.3f %s %s\n", m, n, p, p / dp, a, ds / s, ppl == "" ? "-" : ppl, acc == "" ? "-" : acc }'
}
{ row dense 0 "$d"; for r in $runs; do row "$(echo "$r" | cut -d: -f1)" "$(echo "$r" | cut -d: -f2)" "$(echo "$r" | cut -d: -f3-)"; done; } \
    >"$out/sweep.rows"
awk 'BEGIN { print "| method | layers / experts | parameters | memory ratio | active params / token | prefill speedup | perplexity | accuracy |";
             print "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" }
     { printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, ($1 ~ /^dense/ ? "-" : $2), $3, $4, $5, $6,
              ($7 == "-" ? "-" : sprintf("%.3f", $7)), ($8 == "-" ? "-" : sprintf("%.4f", $8)) }' \
    "$out/sweep.rows" >"$out/sweep.md.tmp" && mv "$out/sweep.md.tmp" "$out/sweep.md"
awk 'BEGIN { printf "{\"runs\": [" }
     { printf "%s{\"method\": \"%s\", \"n\": %s, \"params\": %s, \"memory_ratio\": %s, \"active_params\": %s, \"speedup\": %s, \"ppl\": %s, \"acc\": %s}",
              (NR > 1 ? ", " : ""), $1, $2, $3, $4, $5, $6, ($7 == "-" ? "null" : $7), ($8 == "-" ? "null" : $8) }
     END { print "]}" }' "$out/sweep.rows" >"$out/sweep.json.tmp" && mv "$out/sweep.json.tmp" "$out/sweep.json"

# ---- the plots --------------------------------------------------------------------------
# y: accuracy when a task was given, else perplexity; x: memory ratio, then speedup.
# SUFFIX: "" for the first y, -ppl or -acc for the other one when the runs have both.
plots() { # YCOL YLABEL SUFFIX
    ycol=$1 ylabel=$2 sfx=$3
    sh "$here/pipelines/sweep-plot.sh" "$out/sweep.rows" 4 "$ycol" "memory ratio (parameters)" "$ylabel" \
        >"$out/sweep-memory$sfx.svg"
    sh "$here/pipelines/sweep-plot.sh" "$out/sweep.rows" 6 "$ycol" "prefill speedup" "$ylabel" \
        >"$out/sweep-speedup$sfx.svg"
    command -v gnuplot >/dev/null 2>&1 || return 0
    for x in 4:memory 6:speedup; do
        col=${x%:*} tag=${x#*:}
        awk -v c="$col" -v y="$ycol" '$1 != "dense" { print $1, $c, $y }' "$out/sweep.rows" | sort -k1,1 -k2,2g >"$out/plot.dat"
        dy=$(awk -v y="$ycol" '$1 == "dense" { print $y }' "$out/sweep.rows")
        gnuplot -e "set terminal pngcairo size 800,500; set output '$out/sweep-$tag$sfx.png'; set key outside;
            set xlabel '$tag'; set ylabel '$ylabel'; methods = system(\"cut -d' ' -f1 $out/plot.dat | uniq\");
            plot for [m in methods] '< grep \"^'.m.' \" $out/plot.dat' using 2:3 with linespoints title m,
            $dy with lines dashtype 2 title 'dense'" 2>/dev/null || log "gnuplot failed; the SVGs are there"
    done
    rm -f "$out/plot.dat"
}
has_acc=1 has_ppl=1
awk 'NR == 1 && $8 == "-" { exit 1 }' "$out/sweep.rows" || has_acc=0
awk 'NR == 1 && $7 == "-" { exit 1 }' "$out/sweep.rows" || has_ppl=0
if [ "$has_acc" = 1 ] && [ "${PLOT_Y:-}" != perplexity ]; then
    plots 8 accuracy ""
    [ "$has_ppl" = 0 ] || plots 7 perplexity -ppl
else
    plots 7 perplexity ""
    [ "$has_acc" = 0 ] || plots 8 accuracy -acc
fi
command -v gnuplot >/dev/null 2>&1 || log "PNG plots need gnuplot (apt-get install gnuplot-nox); the SVGs are written"
rm -f "$out/sweep.rows"
log "table: $out/sweep.md, $out/sweep.json; plots: $out/sweep-memory.svg, $out/sweep-speedup.svg"
cat "$out/sweep.md"
