#!/usr/bin/env python3
"""Build tiny random checkpoints of every supported architecture and their golden outputs.

    python3 tests/ref/make_model_fixtures.py [OUTDIR]     (default tests/fixtures/models)

For each architecture (deepseek, qwen2_moe, qwen3_moe, olmoe, mixtral) and each checkpoint dtype
(f32, bf16) this writes OUTDIR/<arch>-<dtype>/ with
    config.json, model.safetensors      the checkpoint, in Hugging Face hub layout
    seqS_ids.npy      int32 [T]           token ids of test sequence S
    seqS_hidden.npy   float32 [L+1,T,H]   output_hidden_states (embeddings first, last after final norm)
    seqS_logits.npy   float32 [T,V]
and, for deepseek and qwen2_moe, a condensed variant of one layer:
    condensed.json    {"layer": l, "experts": [...], "weights": [...]}
    seqS_condensed_hidden.npy / seqS_condensed_logits.npy
The reference runs in float32 (bf16 checkpoints are upcast).  qwen2_moe, qwen3_moe, olmoe and
mixtral run through transformers (eager attention); deepseek v1 (remote code, not in transformers)
runs through DeepseekRef below, written from the published modeling_deepseek.py
(deepseek-moe-16b-base, copy in github duterscmy/CD-MoE cd-moe/get_weight/modeling_deepseek.py).
OUTDIR/NOTES.md records the router margins and how far HF's native bf16 forward is from float32.
Deterministic (fixed seeds, CPU, one thread).
"""
import copy
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fixtures", "models")
SEQ_LENS = [5, 11, 17]
VOCAB = 256
H = 32


# ----------------------------------------------------------------------------------------------
# DeepSeek v1 reference (own code, same math as modeling_deepseek.py)

class DeepseekRef(torch.nn.Module):
    """Minimal DeepSeekMoE v1 causal LM; parameters use the hub tensor names."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        Hd = c["hidden_size"]
        nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
        D = Hd // nh
        self.D = D
        p = {}
        p["model.embed_tokens.weight"] = (c["vocab_size"], Hd)
        for l in range(c["num_hidden_layers"]):
            pre = f"model.layers.{l}."
            p[pre + "input_layernorm.weight"] = (Hd,)
            p[pre + "post_attention_layernorm.weight"] = (Hd,)
            p[pre + "self_attn.q_proj.weight"] = (nh * D, Hd)
            p[pre + "self_attn.k_proj.weight"] = (nkv * D, Hd)
            p[pre + "self_attn.v_proj.weight"] = (nkv * D, Hd)
            p[pre + "self_attn.o_proj.weight"] = (Hd, nh * D)
            if self.is_moe(l):
                I = c["moe_intermediate_size"]
                p[pre + "mlp.gate.weight"] = (c["n_routed_experts"], Hd)
                for j in range(c["n_routed_experts"]):
                    p[pre + f"mlp.experts.{j}.gate_proj.weight"] = (I, Hd)
                    p[pre + f"mlp.experts.{j}.up_proj.weight"] = (I, Hd)
                    p[pre + f"mlp.experts.{j}.down_proj.weight"] = (Hd, I)
                Is = I * c["n_shared_experts"]
                p[pre + "mlp.shared_experts.gate_proj.weight"] = (Is, Hd)
                p[pre + "mlp.shared_experts.up_proj.weight"] = (Is, Hd)
                p[pre + "mlp.shared_experts.down_proj.weight"] = (Hd, Is)
            else:
                I = c["intermediate_size"]
                p[pre + "mlp.gate_proj.weight"] = (I, Hd)
                p[pre + "mlp.up_proj.weight"] = (I, Hd)
                p[pre + "mlp.down_proj.weight"] = (Hd, I)
        p["model.norm.weight"] = (Hd,)
        p["lm_head.weight"] = (c["vocab_size"], Hd)
        self.w = {k: torch.zeros(v) for k, v in p.items()}
        self.condensed = {}  # layer -> (experts, weights)

    def is_moe(self, l):
        c = self.c
        return (c["n_routed_experts"] is not None and l >= c["first_k_dense_replace"]
                and l % c["moe_layer_freq"] == 0)

    def named_parameters(self):
        return list(self.w.items())

    def to_dtype(self, dt):
        self.w = {k: v.to(dt) for k, v in self.w.items()}
        return self

    def rms(self, x, w):
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.c["rms_norm_eps"])
        return w * xf.to(dt)

    def mlp(self, x, pre):
        g = F.linear(x, self.w[pre + "gate_proj.weight"])
        u = F.linear(x, self.w[pre + "up_proj.weight"])
        return F.linear(F.silu(g) * u, self.w[pre + "down_proj.weight"])

    def moe(self, x, pre, l):
        c = self.c
        if l in self.condensed:
            experts, weights = self.condensed[l]
            y = torch.zeros_like(x)
            for e, wgt in zip(experts, weights):
                y = y + wgt * self.mlp(x, pre + f"mlp.experts.{e}.")
            return y + self.mlp(x, pre + "mlp.shared_experts.")
        K = c["num_experts_per_tok"]
        logits = F.linear(x, self.w[pre + "mlp.gate.weight"])
        scores = logits.softmax(dim=-1)
        tw, ti = torch.topk(scores, k=K, dim=-1, sorted=False)
        if K > 1 and c["norm_topk_prob"]:
            tw = tw / (tw.sum(dim=-1, keepdim=True) + 1e-20)
        self.router_probs.append(scores.detach())
        # moe_infer: tokens grouped per expert, ascending expert id, scatter-summed
        y = torch.zeros_like(x)
        flat_i, flat_w = ti.reshape(-1), tw.reshape(-1, 1)
        for e in range(c["n_routed_experts"]):
            sel = (flat_i == e).nonzero().flatten()
            if sel.numel() == 0:
                continue
            tok = sel // K
            out = self.mlp(x[tok], pre + f"mlp.experts.{e}.") * flat_w[sel]
            y.index_add_(0, tok, out)
        return y + self.mlp(x, pre + "mlp.shared_experts.")

    def rope(self, x, T):
        D = self.D
        inv = 1.0 / (self.c["rope_theta"] ** (torch.arange(0, D, 2).float() / D))
        t = torch.arange(T, dtype=torch.float32)
        emb = torch.cat([torch.outer(t, inv)] * 2, dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        rot = torch.cat([-x[..., D // 2:], x[..., :D // 2]], dim=-1)
        return x * cos + rot * sin

    def attn(self, x, pre):
        c = self.c
        T = x.shape[0]
        nh, nkv, D = c["num_attention_heads"], c["num_key_value_heads"], self.D
        q = F.linear(x, self.w[pre + "q_proj.weight"]).view(T, nh, D).transpose(0, 1)
        k = F.linear(x, self.w[pre + "k_proj.weight"]).view(T, nkv, D).transpose(0, 1)
        v = F.linear(x, self.w[pre + "v_proj.weight"]).view(T, nkv, D).transpose(0, 1)
        q, k = self.rope(q, T), self.rope(k, T)
        k = k.repeat_interleave(nh // nkv, dim=0)
        v = v.repeat_interleave(nh // nkv, dim=0)
        s = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(D)
        mask = torch.full((T, T), torch.finfo(s.dtype).min).triu(1)
        s = s + mask
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(p, v).transpose(0, 1).reshape(T, nh * D)
        return F.linear(o, self.w[pre + "o_proj.weight"])

    @torch.no_grad()
    def forward(self, ids):
        self.router_probs = []
        x = self.w["model.embed_tokens.weight"][ids]
        hs = [x]
        L = self.c["num_hidden_layers"]
        for l in range(L):
            pre = f"model.layers.{l}."
            h = x + self.attn(self.rms(x, self.w[pre + "input_layernorm.weight"]), pre + "self_attn.")
            m = self.rms(h, self.w[pre + "post_attention_layernorm.weight"])
            if self.is_moe(l):
                x = h + self.moe(m, pre, l)
            else:
                x = h + self.mlp(m, pre + "mlp.")
            if l < L - 1:
                hs.append(x)
        x = self.rms(x, self.w["model.norm.weight"])
        hs.append(x)
        return torch.stack(hs), F.linear(x, self.w["lm_head.weight"])


# ----------------------------------------------------------------------------------------------
# configurations

def deepseek_config():
    return {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
        "vocab_size": VOCAB, "hidden_size": H, "intermediate_size": 64, "moe_intermediate_size": 16,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_shared_experts": 2, "n_routed_experts": 8, "num_experts_per_tok": 3,
        "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
        "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
        "max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
        "use_cache": True, "pretraining_tp": 1, "tie_word_embeddings": False, "rope_theta": 10000,
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }


def hf_model(arch):
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=3, num_attention_heads=4,
                  attn_implementation="eager", tie_word_embeddings=False)
    if arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                mlp_only_layers=[0], decoder_sparse_step=1, norm_topk_prob=False,
                                rope_theta=1000000.0, **common)
        return tf.Qwen2MoeForCausalLM(cfg)
    if arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                **common)
        return tf.Qwen3MoeForCausalLM(cfg)
    if arch == "olmoe":
        cfg = tf.OlmoeConfig(num_key_value_heads=4, eos_token_id=None, intermediate_size=16, num_experts=8,
                             num_experts_per_tok=2, norm_topk_prob=False, **common)
        return tf.OlmoeForCausalLM(cfg)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(num_key_value_heads=2, intermediate_size=24, num_local_experts=4,
                               num_experts_per_tok=2, **common)
        return tf.MixtralForCausalLM(cfg)
    raise ValueError(arch)


def randomise(named_params, gen):
    """Spread the weights so that routing and attention are far from uniform."""
    with torch.no_grad():
        for name, p in named_params:
            if p.dim() == 1 and ("norm" in name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # biases
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                scale = 1.0 / math.sqrt(fan_in)
                if name.endswith("embed_tokens.weight"):
                    scale = 1.0
                elif name.endswith("mlp.gate.weight") or name.endswith("gate.weight") and "experts" not in name:
                    scale = 3.0 / math.sqrt(fan_in)
                p.copy_(scale * torch.randn(p.shape, generator=gen))


# ----------------------------------------------------------------------------------------------
# running the references

def hf_forward(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids[None], output_hidden_states=True, output_router_logits=True)
    hs = torch.stack([h[0] for h in out.hidden_states])
    probs = []
    if getattr(out, "router_logits", None) is not None:
        for rl in out.router_logits:
            if rl is not None:
                probs.append(F.softmax(rl.float(), dim=-1).reshape(-1, rl.shape[-1]))
    return hs, out.logits[0], probs


def min_margin(probs, K):
    """smallest gap between the K-th and (K+1)-th routing probability over all tokens"""
    m = float("inf")
    for p in probs:
        s = p.sort(dim=-1, descending=True).values
        if s.shape[-1] > K:
            m = min(m, float((s[:, K - 1] - s[:, K]).min()))
    return m


def save_npy(path, a):
    np.save(path, np.ascontiguousarray(a))


def hf_condense(model, arch, layer, experts, weights):
    """Replace layer's MoE block by: sum_e w_e*Expert_e(x) + shared(x) [* sigmoid gate]."""
    blk = model.model.layers[layer].mlp
    ex = blk.experts

    def fwd(hidden_states):
        shp = hidden_states.shape
        x = hidden_states.reshape(-1, shp[-1])
        y = torch.zeros_like(x)
        for e, w in zip(experts, weights):
            g, u = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
            y = y + w * F.linear(F.silu(g) * u, ex.down_proj[e])
        if hasattr(blk, "shared_expert"):
            y = y + torch.sigmoid(blk.shared_expert_gate(x)) * blk.shared_expert(x)
        return y.reshape(shp)

    orig = blk.forward
    blk.forward = fwd
    return lambda: setattr(blk, "forward", orig)


def make(arch, seed):
    gen = torch.Generator().manual_seed(seed)
    if arch == "deepseek":
        model = DeepseekRef(deepseek_config())
        randomise(model.named_parameters(), gen)
        K = model.c["num_experts_per_tok"]
        fwd = lambda m, ids: (lambda hs_lg: (hs_lg[0], hs_lg[1], m.router_probs))(m.forward(ids))
    else:
        model = hf_model(arch).eval()
        randomise(model.named_parameters(), gen)
        K = model.config.num_experts_per_tok
        fwd = hf_forward
    return model, K, fwd


def round_bf16(model, arch):
    """Round the weights to bf16 values, kept in float32.  Only parameters: model.to(bf16)
    would also round buffers such as the rotary inv_freq, which HF computes in float32."""
    if arch == "deepseek":
        model.to_dtype(torch.bfloat16).to_dtype(torch.float32)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))


CONDENSE = {"deepseek": (1, [5, 2, 7], [0.31, 0.22, 0.115]),
            "qwen2_moe": (2, [6, 1], [0.4, 0.25])}


def main():
    os.makedirs(OUT, exist_ok=True)
    notes = ["# Model fixtures (generated by tests/ref/make_model_fixtures.py)", "",
             f"torch {torch.__version__}; transformers "
             f"{__import__('transformers').__version__}; float32 reference, eager attention.", "",
             "| arch | min top-k margin | native bf16 vs f32 ref: last hidden rel err | logits rel err |",
             "| --- | --- | --- | --- |"]
    for ai, arch in enumerate(["deepseek", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral"]):
        idgen = torch.Generator().manual_seed(77)
        seqs = [torch.randint(0, VOCAB, (T,), generator=idgen) for T in SEQ_LENS]
        # pick the first seed whose routing margins (f32 and bf16-rounded weights) are comfortable
        for attempt in range(50):
            seed = 1000 + 100 * ai + attempt
            model, K, fwd = make(arch, seed)
            m1 = min(min_margin(fwd(model, ids)[2], K) for ids in seqs)
            round_bf16(model, arch)
            m2 = min(min_margin(fwd(model, ids)[2], K) for ids in seqs)
            if min(m1, m2) >= 2e-4:
                break
        model, K, fwd = make(arch, seed)
        for dtype in ["f32", "bf16"]:
            d = os.path.join(OUT, f"{arch}-{dtype}")
            os.makedirs(d, exist_ok=True)
            if dtype == "bf16":
                round_bf16(model, arch)  # the reference runs on the upcast bf16 values
            # checkpoint
            if arch == "deepseek":
                tensors = {k: v.to(torch.bfloat16 if dtype == "bf16" else torch.float32).contiguous()
                           for k, v in model.w.items()}
                save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
                c = dict(model.c)
                c["torch_dtype"] = "bfloat16" if dtype == "bf16" else "float32"
                with open(os.path.join(d, "config.json"), "w") as f:
                    json.dump(c, f, indent=2, sort_keys=True)
            else:
                sm = copy.deepcopy(model).to(torch.bfloat16) if dtype == "bf16" else model
                sm.save_pretrained(d, safe_serialization=True)
                for extra in ["generation_config.json"]:
                    if os.path.exists(os.path.join(d, extra)):
                        os.remove(os.path.join(d, extra))
            # golden outputs
            margin = float("inf")
            for s, ids in enumerate(seqs):
                hs, logits, probs = fwd(model, ids)
                margin = min(margin, min_margin(probs, K))
                save_npy(os.path.join(d, f"seq{s}_ids.npy"), ids.numpy().astype(np.int32))
                save_npy(os.path.join(d, f"seq{s}_hidden.npy"), hs.float().numpy())
                save_npy(os.path.join(d, f"seq{s}_logits.npy"), logits.float().numpy())
            if arch in CONDENSE:
                layer, experts, weights = CONDENSE[arch]
                with open(os.path.join(d, "condensed.json"), "w") as f:
                    json.dump({"layer": layer, "experts": experts, "weights": weights}, f)
                if arch == "deepseek":
                    model.condensed = {layer: (experts, weights)}
                    undo = lambda: setattr(model, "condensed", {})
                else:
                    undo = hf_condense(model, arch, layer, experts, weights)
                for s, ids in enumerate(seqs):
                    hs, logits, _ = fwd(model, ids)
                    save_npy(os.path.join(d, f"seq{s}_condensed_hidden.npy"), hs.float().numpy())
                    save_npy(os.path.join(d, f"seq{s}_condensed_logits.npy"), logits.float().numpy())
                undo()
            # native bf16 forward vs the float32 reference on the same (bf16-rounded) weights
            if dtype == "bf16":
                if arch == "deepseek":
                    nat = model.to_dtype(torch.bfloat16)
                else:  # as users run it: from_pretrained in bf16
                    import transformers as tf
                    nat = tf.AutoModelForCausalLM.from_pretrained(
                        d, dtype=torch.bfloat16, attn_implementation="eager").eval()
                eh, el = [], []
                for s, ids in enumerate(seqs):
                    hb, lb, _ = fwd(nat, ids)
                    hr = np.load(os.path.join(d, f"seq{s}_hidden.npy"))
                    lr = np.load(os.path.join(d, f"seq{s}_logits.npy"))
                    eh.append(np.linalg.norm(hb[-1].float().numpy() - hr[-1]) / np.linalg.norm(hr[-1]))
                    el.append(np.linalg.norm(lb.float().numpy() - lr) / np.linalg.norm(lr))
                if arch == "deepseek":
                    model.to_dtype(torch.float32)
                notes.append(f"| {arch} | {margin:.2e} | {max(eh):.2e} | {max(el):.2e} |")
            print(f"{arch}-{dtype}: min top-{K} margin {margin:.3e}", file=sys.stderr)
            if margin < 1e-4:
                print(f"warning: {arch}-{dtype}: routing margin {margin:.3e} is small", file=sys.stderr)
    notes += ["", "Router margin: smallest gap between the k-th and (k+1)-th routing probability over",
              "all test tokens and MoE layers (a gap near float32 rounding would make the fixture fragile).",
              "bf16 columns: relative L2 error of Hugging Face's native bf16 forward (weights and",
              "activations bf16, as users run it) against the float32 forward on the same bf16 weights.",
              "(olmoe's larger value is one top-k flip: sequence 2, token 13, layer 0, whose 2nd and 3rd",
              "routing probabilities are 0.2296 and 0.2241 in float32; HF's bf16 router input is 5.3e-3 off",
              "(bf16 residual stream and attention), enough to swap them, while a bf16 router GEMM on the",
              "float32 input keeps the float32 choice; the other two sequences are at 1.0e-2.)", "",
              "transformers 5.24 save_pretrained writes per-expert tensors (hub layout:",
              "mlp.experts.{j}.gate_proj.weight; mixtral block_sparse_moe.experts.{j}.w1/w2/w3), not the",
              "fused in-memory gate_up_proj/down_proj.  Its config.json spells rope under",
              "rope_parameters.rope_theta, dtype instead of torch_dtype, qwen2_moe qkv_bias, and",
              "qwen3_moe's expert count as num_local_experts (hub files: num_experts).",
              "Pitfall for reference scripts: model.to(torch.bfloat16) also rounds the rotary inv_freq",
              "buffer; round only the parameters when making a float32 reference of bf16 weights."]
    with open(os.path.join(OUT, "NOTES.md"), "w") as f:
        f.write("\n".join(notes) + "\n")


if __name__ == "__main__":
    main()
