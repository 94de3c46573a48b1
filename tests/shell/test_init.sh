# moe-init: usage errors, refusal to overwrite, determinism (seed, threads,
# sharding), DeepSeek layout, and (when torch + transformers are installed)
# loading by Hugging Face transformers for the four in-tree architectures.
. tests/shell/lib.sh

expect_fail 2 "unknown architecture 'llama'" moe-init --arch llama -o "$TMP/x"
expect_fail 2 "no output directory" moe-init --arch olmoe
expect_fail 2 "--dtype" moe-init --arch olmoe --dtype f16 -o "$TMP/x"
expect_fail 2 "has no shared experts" moe-init --arch mixtral --shared 1 -o "$TMP/x"
expect_fail 1 "num_experts_per_tok 9" moe-init --arch olmoe --top-k 9 -o "$TMP/x"
printf '{"model_type": "gpt_neox"}' >"$TMP/bad.json"
expect_fail 1 "bad.json: model_type 'gpt_neox' is not supported" moe-init --config "$TMP/bad.json" -o "$TMP/x"
[ -e "$TMP/x" ] && fail "a failed moe-init left $TMP/x behind"
expect_fail 2 "--hidden 66 is not a multiple of --heads 4" moe-init --arch mixtral --hidden 66 -o "$TMP/x"
expect_fail 2 "--first-dense is for deepseek only" moe-init --arch olmoe --first-dense 0 -o "$TMP/x"

# --config with condensed layers, resized: the condensed layer stays as it was
# (moe-init used its expert list after freeing it)
moe-init --arch deepseek --seed 1 -o "$TMP/cd" || fail "moe-init deepseek"
sed 's/^{/{"condensed_layers": {"1": {"experts": [5, 3], "weights": [0.5, 0.25]}},/' "$TMP/cd/config.json" \
    >"$TMP/cd.json"
moe-init --config "$TMP/cd.json" --layers 3 --seed 1 -o "$TMP/cd3" || fail "moe-init --config with condensed_layers"
tr -d ' \n' <"$TMP/cd3/config.json" | grep -q '"condensed_layers":{"1":{"experts":\[5,3\],"weights":\[0.5,0.25\]}}' \
    || fail "condensed layer lost: $(cat "$TMP/cd3/config.json")"
grep -q '"num_hidden_layers": 3' "$TMP/cd3/config.json" || fail "--layers 3 not applied"

# determinism: same seed -> identical bytes, whatever the thread count
moe-init --arch qwen2_moe --seed 7 -o "$TMP/a" --threads 1 || fail "moe-init qwen2_moe"
moe-init --arch qwen2_moe --seed 7 -o "$TMP/b" --threads 2 || fail "moe-init qwen2_moe (2 threads)"
for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do
    cmp -s "$TMP/a/$f" "$TMP/b/$f" || fail "same seed, different $f"
done
moe-init --arch qwen2_moe --seed 8 -o "$TMP/c" || fail "moe-init seed 8"
cmp -s "$TMP/a/model.safetensors" "$TMP/c/model.safetensors" && fail "seeds 7 and 8 gave the same weights"

# refusing to overwrite, replacing with --force
expect_fail 3 "exists \(use --force" moe-init --arch qwen2_moe --seed 7 -o "$TMP/a"
moe-init --arch qwen2_moe --seed 8 -o "$TMP/a" --force || fail "--force"
cmp -s "$TMP/a/model.safetensors" "$TMP/c/model.safetensors" || fail "--force did not replace the model"
ls -A "$TMP" | grep -q '\.tmp\.' && fail "temporary left behind: $(ls -A "$TMP")"

# sharding: f32 with small shards; tensors identical to the unsharded file
moe-init --arch deepseek --seed 3 --dtype f32 --shard-size 100K -o "$TMP/ds_sh" || fail "sharded"
moe-init --arch deepseek --seed 3 --dtype f32 --shard-size 0 -o "$TMP/ds_one" || fail "unsharded"
[ -f "$TMP/ds_sh/model.safetensors.index.json" ] || fail "no index for a sharded checkpoint"
[ -f "$TMP/ds_one/model.safetensors" ] || fail "no model.safetensors"
ls "$TMP/ds_sh" | grep -q 'model-00001-of-000[0-9][0-9].safetensors' || fail "shard names: $(ls "$TMP/ds_sh")"

# DeepSeekMoE-16B widths from its config (hidden 2048, experts 1408 wide, 2 shared), with fewer
# layers/experts, a smaller dense MLP and vocab, to stay quick
moe-init --config tests/fixtures/ckpt/deepseek-moe-16b.config.json --layers 2 --experts 8 --top-k 6 \
    --intermediate 1024 --vocab 1024 --seed 1 \
    -o "$TMP/ds16" || fail "deepseek-16b-shaped"
grep -q '"moe_intermediate_size": 1408' "$TMP/ds16/config.json" || fail "config lost moe_intermediate_size"

PY=python3
if ! $PY -c 'import torch, transformers, safetensors, tokenizers' 2>/dev/null; then
    echo "SKIP: python torch/transformers absent (C-side checks passed)"; exit 77
fi
$PY - "$TMP" <<'PYEOF' || fail "safetensors layout check"
import json, sys
from safetensors import safe_open
t = sys.argv[1]
def shapes(d):
    import os, glob
    out = {}
    for p in sorted(glob.glob(d + "/*.safetensors")):
        with safe_open(p, "pt") as f:
            assert f.metadata() == {"format": "pt"}, f.metadata()
            for k in f.keys():
                out[k] = (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape())
    return out
a, b = shapes(t + "/ds_sh"), shapes(t + "/ds_one")
assert a == b, "sharded vs single differ"
idx = json.load(open(t + "/ds_sh/model.safetensors.index.json"))
assert set(idx["weight_map"]) == set(a)
s = shapes(t + "/ds16")
L = "model.layers."
assert s[L + "0.mlp.gate_proj.weight"] == ("BF16", [1024, 2048])
assert s[L + "1.mlp.gate.weight"] == ("BF16", [8, 2048])
assert s[L + "1.mlp.experts.7.down_proj.weight"] == ("BF16", [2048, 1408])
assert s[L + "1.self_attn.q_proj.weight"] == ("BF16", [2048, 2048])
assert s[L + "1.mlp.shared_experts.up_proj.weight"] == ("BF16", [2816, 2048])
assert s["lm_head.weight"] == ("BF16", [1024, 2048])
assert not any(k.startswith(L + "0.mlp.experts") for k in s)
cfg = json.load(open(t + "/ds16/config.json"))
for k in ("n_routed_experts", "n_shared_experts", "first_k_dense_replace", "moe_layer_freq", "scoring_func",
          "norm_topk_prob", "num_experts_per_tok", "aux_loss_alpha", "seq_aux", "auto_map"):
    assert k in cfg, k
print("layout ok")
PYEOF
for a in qwen2_moe qwen3_moe olmoe mixtral; do
    moe-init --arch $a --seed 5 --norm-std 0.1 --bias-std 0.02 -o "$TMP/hf_$a" || fail "moe-init $a"
done
moe-init --arch qwen3_moe --seed 5 --dtype f32 --shard-size 200K --heads 8 --kv-heads 4 --head-dim 16 \
    -o "$TMP/hf_q3_sharded" || fail "moe-init qwen3 sharded"
rc=0
$PY tests/shell/init_hf_check.py "$TMP"/hf_qwen2_moe "$TMP"/hf_qwen3_moe "$TMP"/hf_olmoe "$TMP"/hf_mixtral \
    "$TMP"/hf_q3_sharded >"$TMP/py.log" 2>&1 || rc=$?
grep -v -e 'it/s' -e '^$' "$TMP/py.log" || true
[ $rc -eq 0 ] || fail "transformers could not load a moe-init checkpoint"
echo "moe-init ok"
