#!/usr/bin/env python3
"""Deterministic tiny MoE checkpoints for the search fixtures (5 decoder layers).

The search fixtures run mainly on the engine's tiny models
(tests/fixtures/models/<arch>-bf16, 3 decoder layers, made by
tests/ref/make_model_fixtures.py).  With 3 layers the greedy layer orders
are short and come out as plain descending layer order, so two deeper models
made here (deepseek-l5: 4 MoE layers; qwen2_moe-l5: MoE layers 0, 2, 3, 4)
give the layer search non-trivial orders to reproduce.

    python3 tests/ref/tiny_models.py [OUTDIR]   (default tests/fixtures/search/models)
        writes OUTDIR/deepseek-l5 and OUTDIR/qwen2_moe-l5 (the other
        architectures below are kept for experiments: --all)

Writes one Hugging Face-layout directory per architecture (config.json in the
hub spelling, model.safetensors with the hub's per-expert tensor names, bf16
storage).  Weights come from numpy's PCG64 with a fixed seed per architecture,
at scales chosen so that hidden states are O(1) (softmax over the hidden
dimension is far from uniform, so divergences are well above float32 noise)
and routing is sharp enough that every routed expert gets calibration tokens.

Architectures (every one has at least one quirk the C side must honour):
  deepseek   DeepSeekMoE v1: layer 0 dense (first_k_dense_replace 1), 2 fused
             shared experts, top-2 without renormalisation, MHA.
  qwen2_moe  shared expert with sigmoid gate, q/k/v biases, GQA, and a dense
             layer in the middle (mlp_only_layers [1]) so MoE layers are not
             contiguous.
  qwen3_moe  explicit head_dim (heads*head_dim != hidden), per-head q/k norm,
             norm_topk_prob true, no shared expert.
  olmoe      q/k RMSNorm over the whole projection, no renormalisation.
  mixtral    6 experts, top-2 always renormalised, block_sparse_moe names.
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

VOCAB = 64
HIDDEN = 16

ARCHS = {
    "deepseek": dict(seed=101, layers=5, heads=2, kv=2, head_dim=8, experts=8, topk=2,
                     inter=8, dense_inter=48, shared_inter=16),
    "qwen2_moe": dict(seed=202, layers=5, heads=2, kv=1, head_dim=8, experts=8, topk=2,
                      inter=8, dense_inter=48, shared_inter=16),
    "qwen3_moe": dict(seed=303, layers=4, heads=4, kv=2, head_dim=8, experts=8, topk=2,
                      inter=8),
    "olmoe": dict(seed=404, layers=4, heads=2, kv=2, head_dim=8, experts=8, topk=2, inter=8),
    "mixtral": dict(seed=505, layers=4, heads=2, kv=1, head_dim=8, experts=6, topk=2, inter=8),
}


def config_for(arch, a):
    common = {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": a["layers"],
        "num_attention_heads": a["heads"], "num_key_value_heads": a["kv"],
        "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }
    if arch == "deepseek":
        c = dict(common, architectures=["DeepseekForCausalLM"], model_type="deepseek",
                 intermediate_size=a["dense_inter"], moe_intermediate_size=a["inter"],
                 n_routed_experts=a["experts"], n_shared_experts=a["shared_inter"] // a["inter"],
                 num_experts_per_tok=a["topk"], first_k_dense_replace=1, moe_layer_freq=1,
                 norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001,
                 seq_aux=True, attention_bias=False, pretraining_tp=1)
    elif arch == "qwen2_moe":
        c = dict(common, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                 intermediate_size=a["dense_inter"], moe_intermediate_size=a["inter"],
                 shared_expert_intermediate_size=a["shared_inter"], num_experts=a["experts"],
                 num_experts_per_tok=a["topk"], norm_topk_prob=False, decoder_sparse_step=1,
                 mlp_only_layers=[1], use_sliding_window=False, sliding_window=None,
                 max_window_layers=a["layers"], router_aux_loss_coef=0.001)
    elif arch == "qwen3_moe":
        c = dict(common, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                 head_dim=a["head_dim"], intermediate_size=32, moe_intermediate_size=a["inter"],
                 num_experts=a["experts"], num_experts_per_tok=a["topk"], norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False,
                 use_sliding_window=False, sliding_window=None, max_window_layers=a["layers"],
                 router_aux_loss_coef=0.001)
    elif arch == "olmoe":
        c = dict(common, architectures=["OlmoeForCausalLM"], model_type="olmoe",
                 intermediate_size=a["inter"], num_experts=a["experts"],
                 num_experts_per_tok=a["topk"], norm_topk_prob=False, attention_bias=False,
                 clip_qkv=None, pad_token_id=1, router_aux_loss_coef=0.01)
    elif arch == "mixtral":
        c = dict(common, architectures=["MixtralForCausalLM"], model_type="mixtral",
                 intermediate_size=a["inter"], num_local_experts=a["experts"],
                 num_experts_per_tok=a["topk"], sliding_window=None, router_jitter_noise=0.0,
                 router_aux_loss_coef=0.02)
    return c


def moe_layers(arch, a):
    if arch == "deepseek":
        return list(range(1, a["layers"]))
    if arch == "qwen2_moe":
        return [l for l in range(a["layers"]) if l != 1]
    return list(range(a["layers"]))


def make(arch):
    a = ARCHS[arch]
    rng = np.random.Generator(np.random.PCG64(a["seed"]))
    t = {}

    def lin(name, out_f, in_f, gain=1.0):
        t[name] = rng.standard_normal((out_f, in_f)) * (gain / np.sqrt(in_f))

    def vec(name, n, mean, std):
        t[name] = mean + std * rng.standard_normal(n)

    H, D = HIDDEN, a["head_dim"]
    t["model.embed_tokens.weight"] = rng.standard_normal((VOCAB, H))
    mlayers = moe_layers(arch, a)
    for l in range(a["layers"]):
        p = "model.layers.%d." % l
        vec(p + "input_layernorm.weight", H, 1.0, 0.1)
        vec(p + "post_attention_layernorm.weight", H, 1.0, 0.1)
        lin(p + "self_attn.q_proj.weight", a["heads"] * D, H)
        lin(p + "self_attn.k_proj.weight", a["kv"] * D, H)
        lin(p + "self_attn.v_proj.weight", a["kv"] * D, H)
        lin(p + "self_attn.o_proj.weight", H, a["heads"] * D)
        if arch == "qwen2_moe":
            for n, f in (("q", a["heads"] * D), ("k", a["kv"] * D), ("v", a["kv"] * D)):
                vec(p + "self_attn.%s_proj.bias" % n, f, 0.0, 0.1)
        if arch == "qwen3_moe":
            vec(p + "self_attn.q_norm.weight", D, 1.0, 0.1)
            vec(p + "self_attn.k_norm.weight", D, 1.0, 0.1)
        if arch == "olmoe":
            vec(p + "self_attn.q_norm.weight", a["heads"] * D, 1.0, 0.1)
            vec(p + "self_attn.k_norm.weight", a["kv"] * D, 1.0, 0.1)
        if l not in mlayers:
            lin(p + "mlp.gate_proj.weight", a["dense_inter"], H)
            lin(p + "mlp.up_proj.weight", a["dense_inter"], H)
            lin(p + "mlp.down_proj.weight", H, a["dense_inter"])
            continue
        m = p + ("block_sparse_moe." if arch == "mixtral" else "mlp.")
        lin(m + "gate.weight", a["experts"], H, gain=3.0)
        I = a["inter"]
        # a per-layer gain on the routed experts, so that layers differ in how
        # much condensing them costs and the layer orders are not trivial
        g = 1.5 * float(rng.choice([0.3, 0.6, 1.0, 1.6]))
        for j in range(a["experts"]):
            e = m + "experts.%d." % j
            if arch == "mixtral":
                lin(e + "w1.weight", I, H, 1.5)
                lin(e + "w3.weight", I, H, 1.5)
                lin(e + "w2.weight", H, I, g)
            else:
                lin(e + "gate_proj.weight", I, H, 1.5)
                lin(e + "up_proj.weight", I, H, 1.5)
                lin(e + "down_proj.weight", H, I, g)
        if arch == "deepseek":
            S = a["shared_inter"]
            lin(m + "shared_experts.gate_proj.weight", S, H)
            lin(m + "shared_experts.up_proj.weight", S, H)
            lin(m + "shared_experts.down_proj.weight", H, S)
        if arch == "qwen2_moe":
            S = a["shared_inter"]
            lin(m + "shared_expert.gate_proj.weight", S, H)
            lin(m + "shared_expert.up_proj.weight", S, H)
            lin(m + "shared_expert.down_proj.weight", H, S)
            lin(m + "shared_expert_gate.weight", 1, H)
    vec("model.norm.weight", H, 1.0, 0.1)
    lin("lm_head.weight", VOCAB, H)
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)).to(torch.bfloat16).contiguous()
               for k, v in sorted(t.items())}
    return config_for(arch, a), tensors


def write(arch, outdir):
    cfg, tensors = make(arch)
    d = os.path.join(outdir, "%s-l%d" % (arch, ARCHS[arch]["layers"]))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    return d


def main():
    args = [a for a in sys.argv[1:] if a != "--all"]
    outdir = args[0] if args else "tests/fixtures/search/models"
    for arch in (ARCHS if "--all" in sys.argv else ["deepseek", "qwen2_moe"]):
        d = write(arch, outdir)
        print("wrote", d)


if __name__ == "__main__":
    main()
