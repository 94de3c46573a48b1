#!/bin/sh
# tests/record-runs.sh - record what every tool does on the test fixtures, so
# that a refactoring can be shown to change nothing a user sees.
#
#   sh tests/record-runs.sh BIN_DIR OUT_DIR [FIXTURES_DIR]
#   (the same with another build)  then  diff -r OUT_A OUT_B
#
# About 250 invocations: help and version texts, usage and data errors, and
# the whole pipeline on every fixture architecture with every search option.
# For each run NAME it keeps NAME.rc (exit status), NAME.out (stdout),
# NAME.err (stderr) and NAME.files (every file the run wrote, with its bytes'
# SHA-256, and the records of written streams as moe-dump of the *base* build
# prints them is left to the reader: the hash is the contract).  Paths are
# relative to a work folder inside OUT_DIR, so two recordings compare
# equal when the tools behave the same; timings (tokens/s, seconds, RSS) are
# masked as #.  FIXTURES_DIR defaults to this checkout's tests/fixtures:
# record both builds with the same fixtures.
set -u
[ $# -ge 2 ] || { echo "usage: record-runs.sh BIN_DIR OUT_DIR [FIXTURES_DIR]" >&2; exit 2; }
BIN=$(cd "$1" && pwd) || exit 2
mkdir -p "$2" && OUT=$(cd "$2" && pwd) || exit 2
FIX=${3:-$(cd "$(dirname "$0")" && pwd)/fixtures}
FIX=$(cd "$FIX" && pwd) || exit 2
R=$OUT/runs W=$OUT/work
rm -rf "$R" "$W"; mkdir -p "$R" "$W"
cd "$W" || exit 3
PATH="$BIN:$PATH"; export PATH
MOE_DEVICE=cpu; export MOE_DEVICE
export LC_ALL=C

# ---- fixtures, copied so that every path is relative ----------------------
mkdir -p m s e i
for a in deepseek qwen2_moe qwen3_moe olmoe mixtral; do
    cp -r "$FIX/models/$a-bf16" "m/$a"
    cp -r "$FIX/search/$a" "s/$a"
done
cp -r "$FIX/models/deepseek-f32" m/deepseek-f32
cp -r "$FIX/search/models/deepseek-l5" m/deepseek-l5
cp -r "$FIX/search/models/qwen2_moe-l5" m/qwen2_moe-l5
cp -r "$FIX/search/deepseek-l5" s/deepseek-l5
cp -r "$FIX/search/qwen2_moe-l5" s/qwen2_moe-l5
cp -r "$FIX/eval/." e/
cp "$FIX/tokenizer/texts.jsonl" texts.jsonl
for t in gpt2 qwen3 deepseek-v3; do
    [ -f "$FIX/tokenizer/golden-$t.jsonl" ] && cp "$FIX/tokenizer/golden-$t.jsonl" "golden-$t.jsonl"
done

# ---- one run --------------------------------------------------------------
mask() { # timings and sizes that vary from run to run
    sed -E -e 's/[0-9]+(\.[0-9]+)? ?(tok\/s|tokens\/s|s\b|ms|MiB|GiB|GB|MB|seconds)/# \2/g' \
        -e 's/("(seconds|tokens_per_s|tok_s|rss_mib|peak_rss_mib|wall_s|rate)": ?)[0-9.e+-]+/\1#/g'
}
n=0
run() { # NAME command... ; stdin from /dev/null unless redirected by the caller
    name=$1; shift
    n=$((n + 1))
    touch "$W/.stamp"; sleep 0.01
    "$@" >"$R/$name.out.raw" 2>"$R/$name.err.raw"
    echo $? >"$R/$name.rc"
    binfile "$R/$name.out.raw" "$R/$name.out"
    mask <"$R/$name.err.raw" >"$R/$name.err"; rm -f "$R/$name.err.raw"
    # files written by this run (newer than the stamp), with their hashes
    find . -newer "$W/.stamp" -type f ! -name .stamp | sort | while read -r f; do
        echo "$(sha256sum <"$f" | cut -c1-16) $f"
    done >"$R/$name.files"
}
binfile() { # keep text as text (masked), binary as its hash
    if [ ! -s "$1" ] || LC_ALL=C grep -qaP '^[\x09\x0a\x0d\x20-\x7e\x80-\xff]*$' "$1" 2>/dev/null \
        && ! LC_ALL=C grep -qP '\x00' "$1"; then
        mask <"$1" >"$2"
    else
        echo "binary $(wc -c <"$1") bytes sha256 $(sha256sum <"$1" | cut -c1-16)" >"$2"
    fi
    rm -f "$1"
}
runin() { # NAME INPUT command... : standard input from INPUT
    name=$1 in=$2; shift 2
    run "$name" sh -c '"$@" <"$0"' "$in" "$@"
}

TOOLS="moe-tokenize moe-calib moe-expert-rank moe-layer-search moe-condense moe-eval moe-init moe-dump moe-merge
       moe-generate"

# ---- texts common to all tools --------------------------------------------
for t in $TOOLS; do
    run "$t.help" "$t" --help
    run "$t.version" "$t" --version
    run "$t.badopt" "$t" --no-such-option
    case $t in moe-dump|moe-merge|moe-init) run "$t.missing" "$t" does-not-exist.msgpack.zst ;;
    *) run "$t.missing" "$t" --model m/deepseek does-not-exist.msgpack.zst ;; esac
    run "$t.noargs" "$t"
done
for t in moe-calib moe-expert-rank moe-layer-search moe-eval moe-tokenize; do
    run "$t.nomodel" "$t" --model no-such-dir s/deepseek/tokens.msgpack.zst
done

# ---- bad streams ----------------------------------------------------------
head -c 100 s/deepseek/tokens.msgpack.zst >trunc.msgpack.zst
printf 'not a stream at all\n' >garbage.msgpack.zst
printf '{"text":"x"}\n' | zstd -q >notmsgpack.msgpack.zst
for t in moe-dump moe-calib moe-merge; do
    for b in trunc garbage notmsgpack; do
        if [ $t = moe-calib ]; then run "$t.bad-$b" "$t" --model m/deepseek $b.msgpack.zst
        else run "$t.bad-$b" "$t" $( [ $t = moe-dump ] && echo --check ) $b.msgpack.zst; fi
    done
done
run dump.check-trunc moe-dump --check trunc.msgpack.zst
run dump.trunc moe-dump trunc.msgpack.zst

# ---- moe-init -------------------------------------------------------------
for a in deepseek qwen2_moe qwen3_moe olmoe mixtral; do
    run "init.$a" moe-init --arch $a --seed 3 -o "i/$a"
    run "init.$a-f32" moe-init --arch $a --dtype f32 --seed 4 --layers 3 -o "i/$a-f32"
done
run init.sharded moe-init --arch deepseek --seed 5 --shard-size 20K -o i/sharded
run init.config moe-init --config "$FIX/ckpt/deepseek-moe-16b.config.json" --hidden 64 --layers 2 \
    --experts 8 --moe-intermediate 16 --intermediate 64 --heads 4 --kv-heads 4 --vocab 300 --seed 1 -o i/cfg
run init.exists moe-init --arch deepseek --seed 3 -o i/deepseek
run init.badarch moe-init --arch llama --seed 3 -o i/llama
run init.badvocab moe-init --arch deepseek --vocab 10 --seed 3 -o i/v10

# ---- moe-tokenize ---------------------------------------------------------
run tok.init moe-tokenize --model i/deepseek -o tok.msgpack.zst texts.jsonl
run tok.init-maxlen moe-tokenize --model i/deepseek -n 8 -o tok8.msgpack.zst texts.jsonl
run tok.init-nospecial moe-tokenize --model i/qwen2_moe --no-special texts.jsonl
runin tok.stdin texts.jsonl moe-tokenize --model i/olmoe -
run tok.threads1 moe-tokenize --model i/deepseek --threads 1 -o tok-t1.msgpack.zst texts.jsonl
run tok.decode moe-tokenize --model i/deepseek --decode tok.msgpack.zst
run tok.decode-skip moe-tokenize --model i/deepseek --decode --skip-special tok.msgpack.zst
printf '[1,2,3,4,5,6,7,8,9,10]\n[11,12,13,14,15,16]\n' >ids.jsonl
run tok.ids moe-tokenize --model i/deepseek --ids -o ids.msgpack.zst ids.jsonl
printf 'one line\nanother line\n' >lines.txt
run tok.lines moe-tokenize --model i/deepseek --lines lines.txt
printf '{"text": 1}\n' >badfield.jsonl
run tok.badfield moe-tokenize --model i/deepseek badfield.jsonl
printf '{"text": "a"\n' >badjson.jsonl
run tok.badjson moe-tokenize --model i/deepseek badjson.jsonl
run tok.field moe-tokenize --model i/deepseek --field query e/tiny_task.jsonl
run tok.decode-bad moe-tokenize --model i/deepseek --decode garbage.msgpack.zst
for t in gpt2 qwen3 deepseek-v3; do
    [ -f "golden-$t.jsonl" ] && run "tok.golden-$t" moe-tokenize --model e/model --field text "golden-$t.jsonl"
done

# ---- calib, rank, search, condense on every fixture architecture ---------
for a in deepseek qwen2_moe qwen3_moe olmoe mixtral deepseek-l5 qwen2_moe-l5; do
    case $a in *-l5) M=m/$a ;; *) M=m/$a ;; esac
    T=s/$a/tokens.msgpack.zst
    run "calib.$a" moe-calib --model $M -o "c-$a.msgpack.zst" $T
    run "calib.$a-maxlen" moe-calib --model $M --max-length 8 $T
    run "calib.$a-batch" moe-calib --model $M --batch-tokens 16 --threads 1 -o "c-$a-b.msgpack.zst" $T
    C=c-$a.msgpack.zst
    run "rank.$a" moe-expert-rank --model $M --max-length 16 -o "r-$a.msgpack.zst" $C
    for met in kl mse cosine; do
        run "rank.$a-$met" moe-expert-rank --model $M --max-length 16 --metric $met $C
    done
    case $a in deepseek|mixtral) # the literal algorithm is slow: two models, one layer
        run "rank.$a-naive" moe-expert-rank --model $M --max-length 8 --max-experts 2 --layers 1 --naive $C ;;
    esac
    run "rank.$a-mem1" moe-expert-rank --model $M --max-length 16 --mem-mib 1 $C
    run "rank.$a-layers" moe-expert-rank --model $M --max-length 16 --layers 1 -o "r1-$a.msgpack.zst" $C
    run "rank.$a-weight" moe-expert-rank --model $M --max-length 16 --weight 1:0=0.05 --max-experts 2 $C
    Rk=r-$a.msgpack.zst
    for k in 0 2; do
        run "search.$a-k$k" moe-layer-search --model $M --experts $k --max-length 16 -o "p-$a-k$k.msgpack.zst" $Rk
        case $a in deepseek|mixtral|qwen3_moe)
            run "search.$a-k$k-naive" moe-layer-search --model $M --experts $k --max-length 16 --naive $Rk ;;
        esac
        run "search.$a-k$k-cm" moe-layer-search --model $M --experts $k --max-length 16 --candidate-major $Rk
        run "search.$a-k$k-beam" moe-layer-search --model $M --experts $k --max-length 16 --beam 2 $Rk
        run "search.$a-k$k-stream" moe-layer-search --model $M --experts $k --max-length 16 --stream-weights \
            --mem-mib 1 $Rk
    done
    run "search.$a-kl" moe-layer-search --model $M --experts 1 --metric kl --max-length 16 --layers 1 $Rk
    run "search.$a-weight" moe-layer-search --model $M --experts 1 --max-length 16 --weight 1:0=0.05 $Rk
    P=p-$a-k2.msgpack.zst
    run "condense.$a" moe-condense --model $M --layers 1 --experts 2 -o "cd-$a" $P
    run "condense.$a-k0" moe-condense --model $M --layers 1 --experts 0 -o "cd0-$a" p-$a-k0.msgpack.zst
    run "condense.$a-zero" moe-condense --model $M --layers 0 --experts 0 -o "cdz-$a" $P
    run "condense.$a-exists" moe-condense --model $M --layers 1 --experts 2 -o "cd-$a" $P
    run "condense.$a-toomany" moe-condense --model $M --layers 99 --experts 2 -o "cdx-$a" $P
    for w in weights experts order; do
        run "dump.$a-cdmoe-$w" moe-dump --cdmoe-json $w $P
    done
    run "dump.$a-plan" moe-dump --type plan $P
    run "dump.$a-full" moe-dump --full --type ranking $Rk
    run "dump.$a-check" moe-dump --check $P $Rk $C
    run "dump.$a-header" moe-dump --header $P
    run "eval.$a-dump" moe-eval --model $M --dump hidden,logits --max-length 8 -o "d-$a.msgpack.zst" ids.msgpack.zst
    run "eval.$a-dump-cd" moe-eval --model "cd-$a" --dump logits --max-length 8 ids.msgpack.zst
    run "eval.$a-ppl" moe-eval --model $M --model "cd-$a" --ppl ids.msgpack.zst --json
done
run merge.shards moe-merge r1-deepseek.msgpack.zst r-deepseek.msgpack.zst
run merge.models moe-merge c-deepseek.msgpack.zst c-mixtral.msgpack.zst
run merge.force moe-merge --force -o mf.msgpack.zst c-deepseek.msgpack.zst c-mixtral.msgpack.zst
run calib.wrongmodel moe-calib --model m/mixtral s/deepseek/tokens.msgpack.zst
run rank.wrongmodel moe-expert-rank --model m/mixtral c-deepseek.msgpack.zst
run rank.wrongkind moe-expert-rank --model m/deepseek s/deepseek/tokens.msgpack.zst
run search.wrongkind moe-layer-search --model m/deepseek --experts 2 c-deepseek.msgpack.zst
run search.noexperts moe-layer-search --model m/deepseek r-deepseek.msgpack.zst
run condense.noplan moe-condense --model m/deepseek --layers 1 --experts 2 -o cdn r-deepseek.msgpack.zst
run condense.json moe-condense --model m/deepseek --layers 1 --experts 2 -o cdj \
    --cdmoe-weights s/deepseek/original_json.json --cdmoe-experts s/deepseek/original_json.json \
    --cdmoe-order s/deepseek/original_json.json
run dump.cdmoe-calibonly moe-dump --cdmoe-json order c-deepseek.msgpack.zst
run dump.types moe-dump --type calib --type ranking --no-header r-qwen3_moe.msgpack.zst
run dump.preview moe-dump --preview 3 --type calib c-olmoe.msgpack.zst
runin dump.stdin p-deepseek-k2.msgpack.zst moe-dump --check -

# ---- moe-eval on the eval fixture ----------------------------------------
EM=e/model
run eval.ppl-text moe-eval --model $EM --ppl e/ppl_text.jsonl
run eval.ppl-json moe-eval --model $EM --ppl e/ppl_text.jsonl --json --max-length 16
run eval.task moe-eval --model $EM --task e/tiny_task.jsonl --json
run eval.task-lm moe-eval --model $EM --task e/tiny_lm.jsonl --task e/tiny_schema.jsonl
run eval.task-noprefix moe-eval --model $EM --task e/tiny_task.jsonl --no-prefix-cache --json
run eval.task-bos moe-eval --model $EM --task e/tiny_task.jsonl --add-bos --limit 2
for f in piqa winogrande hellaswag rte; do
    for x in e/formats/$f/*; do
        case $x in *labels*) continue ;; esac
        run "eval.fmt-$f-$(basename "$x")" moe-eval --model $EM --task-format $f --task "$x" --json
    done
done
run eval.out moe-eval --model $EM --ppl e/ppl_text.jsonl --task e/tiny_task.jsonl -o ev.msgpack.zst
run eval.dump-out moe-dump ev.msgpack.zst
run eval.badtask moe-eval --model $EM --task badjson.jsonl
run eval.badfmt moe-eval --model $EM --task-format nope --task e/tiny_task.jsonl
runin eval.stdin e/ppl_text.jsonl moe-eval --model $EM --ppl - --json

# ---- moe-generate on the eval fixture --------------------------------------
run gen.greedy moe-generate --model $EM -n 8 --ignore-eos "Once upon a time" "The cat"
run gen.sample moe-generate --model $EM -n 8 -t 0.9 --top-k 40 --top-p 0.9 --seed 3 --samples 2 --jsonl "Once"
run gen.stop moe-generate --model $EM -n 16 --ignore-eos --stop e "Once upon a time"
run gen.tokens moe-generate --model $EM -n 8 -o gen.msgpack.zst "Once upon a time"
run gen.tokens-dump moe-dump gen.msgpack.zst
runin gen.stdin e/tiny_lm.jsonl moe-generate --model $EM -n 4 --field context --jsonl
run gen.notok moe-generate --model m/deepseek "hi"
run gen.badopt-topp moe-generate --model $EM -t 1 --top-p 2 "hi"

# ---- the pipeline, piped, at two thread counts ----------------------------
for th in 1 2; do
    run "pipe.t$th" sh -c "moe-tokenize --model i/deepseek --lines lines.txt | moe-calib --model i/deepseek --threads $th \
        | moe-expert-rank --model i/deepseek --threads $th | moe-layer-search --model i/deepseek --experts 1 \
        --threads $th > pipe-t$th.msgpack.zst"
done
run pipe.condense moe-condense --model i/deepseek --layers 1 --experts 1 -o pipe-cd pipe-t1.msgpack.zst
run pipe.same cmp pipe-t1.msgpack.zst pipe-t2.msgpack.zst

echo "record-runs: $n runs recorded in $R" >&2
