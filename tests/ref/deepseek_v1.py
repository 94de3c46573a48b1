"""A small PyTorch DeepSeekMoE v1 ("model_type": "deepseek") for reference scripts.

DeepSeekMoE v1 is remote code, not part of transformers.  This module
implements the same forward pass (see ../shared/docs/architectures.md §3.1),
written from the description, loading a Hugging Face checkpoint directory with
the hub tensor names.  It exposes what the CD-MoE reference needs, with the
same surface as transformers 5's MoE models:

  model.model.layers[l].mlp            the MLP of decoder layer l (replaceable)
  mlp.gate(x) -> (logits, topk_weight, topk_idx)   (the router, hookable)
  mlp.experts[j](x), mlp.shared_experts(x)
  model(ids, output_hidden_states=True).hidden_states
      [embeddings, out of layer 0, ..., out of layer L-2, final_norm(out of L-1)]

Only eager full-sequence inference (no KV cache, no padding, no training aux
loss); that is all the reference uses.  Computation happens in the dtype the
model is loaded in (float32 by default).
"""
import json
import math
import os
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dt)


class MLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.nh, self.nkv = c.num_attention_heads, c.num_key_value_heads
        self.d = c.hidden_size // c.num_attention_heads
        H = c.hidden_size
        bias = bool(getattr(c, "attention_bias", False))
        self.q_proj = nn.Linear(H, self.nh * self.d, bias=bias)
        self.k_proj = nn.Linear(H, self.nkv * self.d, bias=bias)
        self.v_proj = nn.Linear(H, self.nkv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.nh * self.d, H, bias=bias)
        self.theta = c.rope_theta

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.d).transpose(1, 2)
        inv = 1.0 / (self.theta ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d))
        ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
        emb = torch.cat((ang, ang), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(self.d)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        s = s.masked_fill(mask, torch.finfo(s.dtype).min)
        p = torch.softmax(s.to(torch.float32), dim=-1).to(q.dtype)
        o = (p @ v).transpose(1, 2).reshape(B, T, self.nh * self.d)
        return self.o_proj(o)


class MoEGate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.top_k = c.num_experts_per_tok
        self.norm_topk_prob = c.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))

    def forward(self, x):
        logits = F.linear(x, self.weight)
        scores = logits.softmax(dim=-1)      # model dtype, as the remote code
        w, idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, w, idx


class DeepseekMoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.experts = nn.ModuleList(MLP(c.hidden_size, c.moe_intermediate_size)
                                     for _ in range(c.n_routed_experts))
        self.gate = MoEGate(c)
        self.shared_experts = None
        if c.n_shared_experts:
            self.shared_experts = MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts)

    def forward(self, x):
        shp = x.shape
        flat = x.reshape(-1, shp[-1])
        _, w, idx = self.gate(flat)
        y = torch.zeros_like(flat)
        for e in range(len(self.experts)):          # ascending expert id, as moe_infer
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            out = self.experts[e](flat[tok]) * w[tok, slot, None]
            y.index_add_(0, tok, out)
        y = y.view(shp)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, c, l):
        super().__init__()
        self.self_attn = Attention(c)
        is_moe = (c.n_routed_experts is not None and l >= c.first_k_dense_replace
                  and l % c.moe_layer_freq == 0)
        self.mlp = DeepseekMoE(c) if is_moe else MLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x):
        h = x + self.self_attn(self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, l) for l in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.model = Model(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    @torch.no_grad()
    def forward(self, input_ids, output_hidden_states=False, **_):
        x = self.model.embed_tokens(input_ids)
        hs = []
        for layer in self.model.layers:
            hs.append(x)
            x = layer(x)
        x = self.model.norm(x)
        hs.append(x)
        return SimpleNamespace(logits=self.lm_head(x),
                               hidden_states=tuple(hs) if output_hidden_states else None)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        defaults = dict(n_shared_experts=None, n_routed_experts=None, first_k_dense_replace=0,
                        moe_layer_freq=1, norm_topk_prob=False, rope_theta=10000.0,
                        attention_bias=False, rms_norm_eps=1e-6)
        c = SimpleNamespace(**dict(defaults, **cfg))
        if getattr(c, "num_key_value_heads", None) is None:
            c.num_key_value_heads = c.num_attention_heads
        m = cls(c)
        sd = load_file(os.path.join(path, "model.safetensors"))
        own = m.state_dict()
        missing = set(own) - set(sd)
        extra = set(sd) - set(own)
        if missing or extra:
            raise ValueError("%s: tensor names differ: missing %s, unexpected %s"
                             % (path, sorted(missing)[:5], sorted(extra)[:5]))
        m.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
        return m.to(dtype).eval()
