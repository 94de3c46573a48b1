# Condensed checkpoints in Hugging Face transformers: moe-condense writes
# hf/modeling_cdmoe.py and auto_map; AutoModelForCausalLM.from_pretrained(
# trust_remote_code=True) must give moe-eval's logits (1e-5 relative) for every
# architecture, f32 and bf16 checkpoints, folded (--fold) and not.  The
# transformers part needs a python with torch, transformers, numpy, msgpack and
# zstandard: $CDMOE_REF_PYTHON, ./.venv-ref/bin/python or python3 (pip install
# torch transformers numpy msgpack zstandard); it is skipped, loudly, without one.
. tests/shell/lib.sh
case $BIN in /*) ;; *) PATH=$PWD/$BIN:$PATH ;; esac   # the test works in $TMP
FIX=$PWD/tests/fixtures/models
HELPER=$PWD/tests/shell/hf_load_check.py
EVAL_DUMP=$PWD/tests/shell/eval_dump_py.py
MODELING=$PWD/hf/modeling_cdmoe.py
REF_PY=
for py in ${CDMOE_REF_PYTHON:-} "$PWD/.venv-ref/bin/python" python3; do
    if command -v "$py" >/dev/null 2>&1 &&
        "$py" -c 'import torch, transformers, numpy, msgpack, zstandard' 2>/dev/null; then
        REF_PY=$py
        break
    fi
done
PY=$(find_python) || PY=$REF_PY
[ -n "$PY" ] || skip "python3 with msgpack and zstandard not found"
cd "$TMP"

# plan files of the original CD-MoE code: condense the last MoE layer, keep 2 experts
DT=f32
condense() { # ARCH OUT [OPTIONS...]  (the fixture $FIX/ARCH-$DT)
    a=$1 out=$2; shift 2
    mkdir -p plan-$a
    $PY "$HELPER" plan "$FIX/$a-$DT" plan-$a || fail "$a: plan"
    moe-condense --model "$FIX/$a-$DT" --layers 1 --cdmoe-weights plan-$a/w.json \
        --cdmoe-experts plan-$a/e.json --cdmoe-order plan-$a/o.json -o "$out" "$@" >/dev/null
}

# without transformers: the files are there
condense olmoe o2 --experts 2 || fail "olmoe: condense"
cmp -s o2/modeling_cdmoe.py "$MODELING" || fail "modeling_cdmoe.py not written as hf/ has it"
grep -q '"AutoModelForCausalLM": "modeling_cdmoe.CdmoeOlmoeForCausalLM"' o2/config.json \
    || fail "no auto_map: $(cat o2/config.json)"
condense deepseek d2 --experts 2 || fail "deepseek: condense"
grep -q '"AutoConfig": "modeling_cdmoe.DeepseekConfig"' d2/config.json || fail "deepseek: no AutoConfig"
# --fold: the dense names, no expert tensors, the entry marked
condense deepseek d2f --experts 2 --fold || fail "deepseek: --fold"
grep -q '"folded": true' d2f/config.json || fail "folded entry not marked"
expect_fail 2 "qwen2_moe's shared expert is gated" condense qwen2_moe q2f --experts 2 --fold
[ ! -e q2f ] || fail "refused --fold left an output"
expect_fail 1 "--fold: layer 2 keeps no expert: nothing to fold" condense mixtral m0f --experts 0 --fold
[ ! -e m0f ] || fail "refused --fold left an output"

# cdmoe runs a folded layer as a dense one when it is intermediate_size wide
# (deepseek: 2 shared + 2 kept experts of 16 = 64; qwen3_moe 4 x 16; olmoe,
# mixtral 1 expert): the same logits, byte for byte, as the unfolded model
for ak in deepseek:2 qwen3_moe:4 olmoe:1 mixtral:1; do
    a=${ak%:*} k=${ak#*:}
    $PY "$EVAL_DUMP" tokens "$FIX/$a-f32" tok-$a.zst || fail "$a: tokens"
    condense $a $a-eu$k --experts $k && condense $a $a-ef$k --experts $k --fold || fail "$a: condense $k"
    moe-eval -m $a-eu$k -d logits --no-provenance tok-$a.zst -o u.zst || fail "$a: moe-eval"
    moe-eval -m $a-ef$k -d logits --no-provenance tok-$a.zst -o f.zst || fail "$a: moe-eval folded"
    cmp -s u.zst f.zst || fail "$a: folded logits differ from the condensed model's"
done
# a folded layer narrower than intermediate_size (2 x 16 < 64) runs at its own width
condense qwen3_moe q3u2 --experts 2 && condense qwen3_moe q3f2 --experts 2 --fold || fail "qwen3_moe: --fold"
moe-eval -m q3u2 -d logits --no-provenance tok-qwen3_moe.zst -o u.zst || fail "qwen3_moe 2: moe-eval"
moe-eval -m q3f2 -d logits --no-provenance tok-qwen3_moe.zst -o f.zst || fail "qwen3_moe 2: moe-eval folded"
cmp -s u.zst f.zst || fail "qwen3_moe: folded 32-wide logits differ from the condensed model's"
[ -n "$REF_PY" ] || skip "no python with torch and transformers: the Hugging Face load is NOT tested (pip install torch transformers numpy msgpack zstandard into .venv-ref)"

export HF_HOME="$TMP/hf-home" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
pairs=
# bf16 checkpoints too, run in float32 by both (folded: down in float32)
for DT in f32 bf16; do
    for a in deepseek qwen2_moe qwen3_moe olmoe mixtral; do
        $REF_PY "$EVAL_DUMP" tokens "$FIX/$a-$DT" tok-$a.zst || fail "$a: tokens"
        condense $a $a-$DT-c2 --experts 2 || fail "$a-$DT: condense"
        moe-eval -m $a-$DT-c2 -d logits tok-$a.zst -o dump-$a-$DT.zst || fail "$a-$DT: moe-eval"
        pairs="$pairs $a-$DT-c2 dump-$a-$DT.zst"
        [ $a = qwen2_moe ] && continue
        condense $a $a-$DT-f2 --experts 2 --fold || fail "$a-$DT: --fold"
        pairs="$pairs $a-$DT-f2 dump-$a-$DT.zst"     # the same model: the unfolded one's logits
    done
done
DT=f32
# shared experts only, folded: the MLP is the shared one
condense deepseek d0 --experts 0 || fail "deepseek --experts 0"
condense deepseek d0f --experts 0 --fold || fail "deepseek --experts 0 --fold"
moe-eval -m d0 -d logits tok-deepseek.zst -o dump-d0.zst || fail "d0: moe-eval"
$REF_PY "$HELPER" check $pairs d0f dump-d0.zst 2>err || fail "$(tail -3 err)"
exit 0
