# The paper's baselines: LayerDrop / BlockDrop (moe-layer-search --method,
# moe-condense --method) and expert pruning with the router kept
# (prune-freq, prune-reap).
#  - the searches' picks equal tests/ref/baselines_reference.py's
#    (tests/fixtures/search/*/baselines.txt), fast and --naive alike;
#  - a dropped checkpoint's logits equal, bit for bit, those of the original
#    model with the dropped piece's output projections zeroed (a forward with
#    that MLP / block contributing nothing), computed by the ordinary path;
#  - a pruned checkpoint keeps the experts with the most routed tokens, and
#    (with torch) its logits equal a PyTorch model pruned from the original
#    by slicing the router's rows and the experts;
#  - bad input is refused with one line.
. tests/shell/lib.sh
export OMP_NUM_THREADS=1
case $BIN in /*) ;; *) PATH=$PWD/$BIN:$PATH ;; esac
ROOT=$PWD
FX=$PWD/tests/fixtures/search
PY=$(find_python) || skip "python3 with msgpack and zstandard not found"
REF_PY=
for py in ${CDMOE_REF_PYTHON:-} "$PWD/.venv-ref/bin/python" python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import torch, transformers, msgpack, zstandard' 2>/dev/null; then
        REF_PY=$py
        break
    fi
done
cd "$TMP"

# -- the layer choice against the reference
for name in deepseek-l5 qwen2_moe-l5; do
    M=$FX/models/$name
    moe-calib --quiet --model $M $FX/$name/tokens.msgpack.zst >calib-$name || fail "$name: moe-calib"
    : >got
    for method in layerdrop blockdrop; do
        for crit in greedy cosine; do
            moe-layer-search --quiet --model $M --method $method --criterion $crit --max-length 16 \
                calib-$name >plan-$name-$method-$crit || fail "$name: $method $crit"
            order=$(moe-dump --full --no-header --type plan plan-$name-$method-$crit \
                | sed -n 's/.*"order":{[^}]*"data":\[\([^]]*\)\].*/\1/p' | tr ',' ' ')
            echo "$method $crit: $order" >>got
        done
        moe-layer-search --quiet --naive --model $M --method $method --max-length 16 calib-$name >naive \
            || fail "$name: $method --naive"
        moe-dump --full --no-header --type plan naive >a && moe-dump --full --no-header --type plan \
            plan-$name-$method-greedy >b && cmp -s a b || fail "$name: $method --naive differs from the fast search"
    done
    diff $FX/$name/baselines.txt got >d || fail "$name: picks differ from the reference: $(cat d)"
done
# the fast search's variants give the naive search's plan, beam 2 included
M=$FX/models/deepseek-l5
for method in layerdrop blockdrop; do
    moe-layer-search --quiet --model $M --method $method --beam 2 --max-length 16 --naive calib-deepseek-l5 \
        | moe-dump --full --no-header --type plan - >want || fail "beam 2 --naive"
    for flags in "" --candidate-major --stream-weights "--mem-mib 1"; do
        moe-layer-search --quiet --model $M --method $method --beam 2 --max-length 16 $flags calib-deepseek-l5 \
            | moe-dump --full --no-header --type plan - >got || fail "$method $flags"
        cmp -s want got || fail "$method --beam 2 $flags differs from --naive"
    done
done
# REAP does not depend on the thread count
OMP_NUM_THREADS=2 moe-calib --quiet --reap --model $M $FX/deepseek-l5/tokens.msgpack.zst >r2 || fail "--reap"
OMP_NUM_THREADS=1 moe-calib --quiet --reap --model $M $FX/deepseek-l5/tokens.msgpack.zst >r1 || fail "--reap"
cmp -s r1 r2 || fail "moe-calib --reap: 1 and 2 threads differ"
moe-dump --full --no-header --type plan plan-deepseek-l5-blockdrop-cosine | grep -q '"method":"blockdrop","criterion":"cosine"' \
    || fail "plan record without method and criterion"

# -- a dropped checkpoint computes what the original computes with the piece zeroed
M=$FX/models/deepseek-l5
cp $FX/deepseek-l5/tokens.msgpack.zst tok.zst
zero() { # SRC DST TENSOR-PREFIX...: copy SRC with every tensor under the prefixes zeroed
    src=$1 dst=$2; shift 2
    cp -r "$src" "$dst" && $PY - "$dst/model.safetensors" "$@" <<'EOF'
import json, struct, sys
path, prefixes = sys.argv[1], sys.argv[2:]
with open(path, "r+b") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    hdr = json.loads(f.read(n))
    for name, t in hdr.items():
        if name != "__metadata__" and any(name.startswith(p) for p in prefixes):
            a, b = t["data_offsets"]
            f.seek(8 + n + a)
            f.write(bytes(b - a))
EOF
}
logits() { moe-eval -m "$1" -d logits --no-provenance tok.zst -o - | moe-dump --full --no-header --type dump -; }
moe-condense --model $M --method layerdrop --layers 2 -o ld plan-deepseek-l5-layerdrop-greedy >/dev/null \
    || fail "condense layerdrop"
moe-condense --model $M --method blockdrop --layers 2 -o bd plan-deepseek-l5-blockdrop-greedy >/dev/null \
    || fail "condense blockdrop"
grep -q '"4": "mlp"' ld/config.json && grep -q '"3": "mlp"' ld/config.json || fail "layerdrop config: $(cat ld/config.json)"
grep -q '"4": "block"' bd/config.json && grep -q '"3": "block"' bd/config.json || fail "blockdrop config"
zero $M ldref model.layers.3.mlp.experts.0.down_proj model.layers.3.mlp.experts. model.layers.3.mlp.shared_experts.down_proj \
    model.layers.4.mlp.experts. model.layers.4.mlp.shared_experts.down_proj || fail "zeroing"
# (zeroing the down projections alone: the gate and up of experts stay; the MLP still yields 0)
zero ldref bdref model.layers.3.self_attn.o_proj model.layers.4.self_attn.o_proj || fail "zeroing"
logits ld >a && logits ldref >b || fail "layerdrop: moe-eval"
cmp -s a b || fail "LayerDrop logits differ from the model with those MLPs zeroed"
logits bd >a && logits bdref >b || fail "blockdrop: moe-eval"
cmp -s a b || fail "BlockDrop logits differ from the model with those blocks zeroed"
logits $M >c && ! cmp -s a c || fail "the dropped model computes the original's logits"
# the checkpoints hold no tensor of what was dropped
hdr=$(head -c 100000 bd/model.safetensors | tr -c '[:print:]' '\n' | grep -o '"model[^"]*"' | tr -d '"')
echo "$hdr" | grep -q "^model.layers.3\." && fail "blockdrop kept a tensor of layer 3"
echo "$hdr" | grep -q "^model.layers.2.self_attn.q_proj.weight" || fail "blockdrop lost layer 2"
hdr=$(head -c 100000 ld/model.safetensors | tr -c '[:print:]' '\n' | grep -o '"model[^"]*"' | tr -d '"')
echo "$hdr" | grep -q "^model.layers.3.mlp\|^model.layers.3.post_attention" && fail "layerdrop kept layer 3's MLP"
echo "$hdr" | grep -q "^model.layers.3.self_attn.o_proj.weight" || fail "layerdrop lost layer 3's attention"

# multiple-choice scoring with a dropped block: the prefix cache's path (attention
# over a KV cache) gives what whole runs give, the first layer dropped too
E=$ROOT/tests/fixtures/eval
head -n 2 $E/ppl_text.jsonl >et.jsonl
moe-tokenize --model $E/model et.jsonl >et && moe-layer-search --quiet --model $E/model --method blockdrop et >ep \
    || fail "eval model: blockdrop search"
for n in 1 2; do
    moe-condense --model $E/model --method blockdrop --layers $n -o eb$n ep >/dev/null || fail "eval model: blockdrop $n"
    moe-eval --quiet -m eb$n --task $E/tiny_task.jsonl --json | sed 's/"seconds": [0-9.e+-]*//g' >a || fail "eval eb$n"
    moe-eval --quiet -m eb$n --task $E/tiny_task.jsonl --no-prefix-cache --json | sed 's/"seconds": [0-9.e+-]*//g' \
        | sed 's/"tokens_run": [0-9]*//' >b || fail "eval eb$n whole"
    sed 's/"tokens_run": [0-9]*//' a | cmp -s - b || fail "blockdrop $n: the prefix cache changes the scores"
done

# -- expert pruning: the most-routed experts, renumbered, router rows kept
moe-condense --model $M --method prune-freq --experts 4 -o pf calib-deepseek-l5 >out || fail "prune-freq: $(cat out)"
grep -q '"n_routed_experts": 4' pf/config.json || fail "prune-freq: n_routed_experts"
$PY - calib-deepseek-l5 pf/config.json <<'EOF' || fail "prune-freq: not the most-routed experts"
import json, sys, msgpack, zstandard
recs = list(msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(open(sys.argv[1], "rb")), raw=False))
kept = json.load(open(sys.argv[2]))["pruned_experts"]
import struct
for r in recs:
    if r.get("type") != "calib":
        continue
    d = r["count"]
    count = struct.unpack("<%dq" % d["shape"][0], d["data"]) if isinstance(d, dict) else d
    want = sorted(sorted(range(len(count)), key=lambda e: (-count[e], e))[:4])
    assert kept[str(r["layer"])] == want, (r["layer"], kept[str(r["layer"])], want, count)
EOF
logits pf >/dev/null || fail "prune-freq: moe-eval"
moe-calib --quiet --reap --model $M $FX/deepseek-l5/tokens.msgpack.zst >calib-reap || fail "moe-calib --reap"
moe-condense --model $M --method prune-reap --experts 3 -o pr calib-reap >/dev/null || fail "prune-reap"
if [ -n "$REF_PY" ]; then
    for a in qwen2_moe qwen3_moe olmoe mixtral; do
        F=$ROOT/tests/fixtures/models/$a-f32
        $PY "$ROOT/tests/shell/eval_dump_py.py" tokens $F tok-$a.zst || fail "$a: tokens"
        moe-calib --quiet --model $F tok-$a.zst >calib-$a || fail "$a: calib"
        moe-condense --model $F --method prune-freq --experts 3 -o pf-$a calib-$a >/dev/null || fail "$a: prune"
        moe-eval -m pf-$a -d logits tok-$a.zst -o dump-$a.zst || fail "$a: moe-eval"
        HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error $REF_PY "$ROOT/tests/ref/baselines_reference.py" prune-check \
            --model $F --pruned pf-$a --dump dump-$a.zst 2>err || fail "$a: $(tail -3 err)"
    done
    # REAP saliency against a plain PyTorch computation
    for name in deepseek-l5 qwen2_moe-l5; do
        moe-calib --quiet --reap --model $FX/models/$name $FX/$name/tokens.msgpack.zst >reap-$name || fail "$name: --reap"
        $REF_PY "$ROOT/tests/ref/baselines_reference.py" reap-check --model $FX/models/$name \
            --tokens $FX/$name/tokens.json --calib reap-$name 2>err || fail "$name: $(tail -3 err)"
    done
    # dropped checkpoints in transformers (hf/modeling_cdmoe.py): moe-eval's logits
    pairs=
    for a in deepseek qwen2_moe mixtral; do
        F=$ROOT/tests/fixtures/models/$a-f32
        [ -f tok-$a.zst ] || $PY "$ROOT/tests/shell/eval_dump_py.py" tokens $F tok-$a.zst || fail "$a: tokens"
        for method in layerdrop blockdrop; do
            moe-layer-search --quiet --model $F --method $method --layers 1 tok-$a.zst >p || fail "$a: $method search"
            moe-condense --model $F --method $method --layers 1 -o $a-$method p >/dev/null || fail "$a: $method"
            moe-eval -m $a-$method -d logits tok-$a.zst -o dump-$a-$method.zst || fail "$a: $method moe-eval"
            pairs="$pairs $a-$method dump-$a-$method.zst"
        done
    done
    # a pruned deepseek (no transformers class: modeling_cdmoe's) with 3 of 8 experts
    F=$ROOT/tests/fixtures/models/deepseek-f32
    moe-calib --quiet --model $F tok-deepseek.zst >calib-ds && moe-condense --model $F --method prune-freq \
        --experts 3 -o deepseek-prune calib-ds >/dev/null || fail "deepseek: prune"
    moe-eval -m deepseek-prune -d logits tok-deepseek.zst -o dump-deepseek-prune.zst || fail "deepseek-prune: moe-eval"
    pairs="$pairs deepseek-prune dump-deepseek-prune.zst"
    HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error $REF_PY "$ROOT/tests/shell/hf_load_check.py" check $pairs 2>err \
        || fail "$(tail -3 err)"
else
    echo "no python with torch and transformers: the PyTorch references of pruning and dropping are NOT run"
fi

# -- bad input: one line naming the problem
expect_fail 2 "--experts 9: the model has 8 routed experts" moe-condense --model $M --method prune-freq --experts 9 -o x calib-deepseek-l5
expect_fail 2 "fewer than the 2 experts the router picks per token" moe-condense --model $M --method prune-freq --experts 1 -o x calib-deepseek-l5
expect_fail 1 "no REAP saliency \(run moe-calib --reap\)" moe-condense --model $M --method prune-reap --experts 3 -o x calib-deepseek-l5
expect_fail 1 "the layer order is a blockdrop plan; --method layerdrop needs" moe-condense --model $M --method layerdrop --layers 1 -o x plan-deepseek-l5-blockdrop-greedy
expect_fail 1 "5 layers asked for, but the layer order has only 4" moe-condense --model $M --method layerdrop --layers 5 -o x plan-deepseek-l5-layerdrop-greedy
expect_fail 2 "--layers: --method prune-freq prunes every MoE layer" moe-condense --model $M --method prune-freq --layers 1 --experts 4 -o x calib-deepseek-l5
expect_fail 2 "--criterion cosine: only for --method layerdrop or blockdrop" moe-layer-search --model $M --experts 0 --criterion cosine calib-deepseek-l5
expect_fail 2 "--method: expected cdmoe, layerdrop or blockdrop" moe-layer-search --model $M --method drop calib-deepseek-l5
[ ! -e x ] || fail "a refused condense left an output"
cp -r ld bad && sed -i 's/"4": "mlp"/"9": "mlp"/' bad/config.json
expect_fail 1 "dropped_layers: key '9' is not a layer index in \[0, 5\)" moe-eval -m bad -d logits tok.zst -o /dev/null
cp -r ld bad2 && sed -i 's/"4": "mlp"/"4": "attention"/' bad2/config.json
expect_fail 1 "dropped_layers: layer 4: expected \"mlp\" or \"block\"" moe-eval -m bad2 -d logits tok.zst -o /dev/null
exit 0
