"""PyTorch training reference for moe-tune (issue 12): the models, the condensed layers, the
trained-parameter sets and the losses, shared by make_grad_fixtures.py and bench/train_torch.py.

Models: qwen2_moe, qwen3_moe, olmoe, mixtral are Hugging Face transformers' own classes
(from_pretrained, float32, eager attention); deepseek (DeepSeekMoE v1, remote code, not in
transformers) is tests/ref/deepseek_v1.py plus the training-mode load-balancing loss of the
published modeling_deepseek.py (MoEGate with seq_aux), written here.

Every trainable tensor is addressed by its Hugging Face hub name (the checkpoint's names;
transformers 5 keeps a layer's experts fused in memory as gate_up_proj [E, 2I, H] and down_proj
[E, H, I]: hub_views() maps each hub name to its slice and checks it against the file).

A condensed layer is what cdmoe's engine computes (lib/config.h "condensed_layers"):
    y = sum_i weights[i] * Expert_{experts[i]}(x)   (list order)  +  Shared(x)
        (qwen2_moe: Shared(x) * sigmoid(x . shared_expert_gate))
with the kept experts as separate SwiGLU modules and the fixed weights as one [n] parameter,
named "condensed_layers.<l>.weights".
"""
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepseek_v1  # noqa: E402

ARCHS = ["deepseek", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral"]


def load_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def load_model(path, dtype=torch.float32):
    """(arch, model) in float32 (float64: to measure the reference's own rounding), eval mode
    (no dropout, no router jitter), every parameter frozen."""
    cfg = load_config(path)
    arch = cfg["model_type"]
    if arch == "deepseek":
        model = deepseek_v1.DeepseekForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        import transformers as tf
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                         attn_implementation="eager",
                                                         experts_implementation="eager")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return arch, model


def moe_prefix(arch, layer):
    """hub-name prefix of a MoE block"""
    return "model.layers.%d.%s" % (layer, "block_sparse_moe." if arch == "mixtral" else "mlp.")


def expert_names(arch):
    """hub names of an expert's gate, up, down projections"""
    return ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def shared_name(arch):
    return {"deepseek": "shared_experts", "qwen2_moe": "shared_expert"}.get(arch)


def is_moe_block(arch, mlp):
    if arch == "deepseek":
        return isinstance(mlp, deepseek_v1.DeepseekMoE)
    return hasattr(mlp, "gate") and hasattr(mlp, "experts")


# ---- condensed layers ------------------------------------------------------------------------

class SwiGLU(nn.Module):
    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_proj = nn.Parameter(gate.clone())
        self.up_proj = nn.Parameter(up.clone())
        self.down_proj = nn.Parameter(down.clone())

    def forward(self, x):
        return F.linear(F.silu(F.linear(x, self.gate_proj)) * F.linear(x, self.up_proj), self.down_proj)


class CondensedMLP(nn.Module):
    """Kept experts with fixed (trainable) weights, the block's shared expert(s), no router."""

    def __init__(self, arch, block, experts, weights):
        super().__init__()
        self.ids = [int(e) for e in experts]
        self.kept = nn.ModuleList(SwiGLU(*expert_weights(arch, block, e)) for e in self.ids)
        dtype = self.kept[0].down_proj.dtype if self.ids else torch.float32
        self.weights = nn.Parameter(torch.tensor(weights, dtype=dtype))
        self.shared = getattr(block, shared_name(arch)) if shared_name(arch) else None
        self.shared_gate = getattr(block, "shared_expert_gate", None)

    def forward(self, h):
        x = h.reshape(-1, h.shape[-1])
        y = torch.zeros_like(x)
        for i, expert in enumerate(self.kept):
            y = y + self.weights[i] * expert(x)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            y = y + s
        return y.reshape(h.shape)


def expert_weights(arch, block, e):
    """(gate [I,H], up [I,H], down [H,I]) of routed expert e of a loaded MoE block"""
    ex = block.experts
    if arch == "deepseek":
        return ex[e].gate_proj.weight.data, ex[e].up_proj.weight.data, ex[e].down_proj.weight.data
    gate, up = ex.gate_up_proj.data[e].chunk(2, dim=0)
    return gate, up, ex.down_proj.data[e]


def condense(arch, model, table):
    """table: {layer: {"experts": [...], "weights": [...]}}; replaces those MoE blocks."""
    for layer, entry in table.items():
        dec = model.model.layers[int(layer)]
        if not is_moe_block(arch, dec.mlp):
            raise ValueError("layer %s is not a MoE layer" % layer)
        dec.mlp = CondensedMLP(arch, dec.mlp, entry["experts"], entry["weights"])


class NoMLP(nn.Module):
    """a LayerDrop layer's MLP: contributes nothing (h = h + attn(...), no MLP)"""
    def forward(self, x):
        return torch.zeros_like(x)


class SkippedBlock(nn.Module):
    """a BlockDrop layer: the decoder layer is the identity"""
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def drop(model, table):
    """table: {"mlp": [layers], "block": [layers]} (moe-condense --method layerdrop/blockdrop)"""
    for layer in table.get("mlp", []):
        model.model.layers[layer].mlp = NoMLP()
    for layer in table.get("block", []):
        model.model.layers[layer] = SkippedBlock()


def drop_views(views, table):
    """the hub views a dropped model still has: a LayerDrop layer loses its post-attention norm
    (its MLP has no parameters left), a BlockDrop layer everything"""
    gone = ["model.layers.%d.post_attention_layernorm." % l for l in table.get("mlp", [])]
    gone += ["model.layers.%d." % l for l in table.get("block", [])]
    return {k: v for k, v in views.items() if not any(k.startswith(g) for g in gone)}


# ---- hub names -------------------------------------------------------------------------------

def hub_views(arch, model, path=None):
    """{hub name: (parameter, slice function)}: every tensor of the model under its checkpoint
    name (condensed layers: their kept experts, shared experts and "condensed_layers.<l>.weights";
    their router and dropped experts are absent).  With path, each view is checked against the
    checkpoint's tensor (condensed weights excepted)."""
    views = {}
    whole = lambda t: t
    for name, p in model.named_parameters():
        if ".experts.gate_up_proj" in name or ".experts.down_proj" in name or ".kept." in name \
                or name.endswith(".weights"):
            continue
        if ".mlp.shared." in name or ".mlp.shared_gate." in name:
            continue  # a condensed layer's view of the block's shared expert: named below
        hub = name
        if arch == "mixtral":
            hub = hub.replace(".mlp.", ".block_sparse_moe.")
        views[hub] = (p, whole)
    for layer, dec in enumerate(model.model.layers):
        pre = moe_prefix(arch, layer)
        names = expert_names(arch)
        if isinstance(dec, SkippedBlock):
            continue
        if isinstance(dec.mlp, CondensedMLP):
            c = dec.mlp
            for e, expert in zip(c.ids, c.kept):
                for hn, p in zip(names, (expert.gate_proj, expert.up_proj, expert.down_proj)):
                    views["%sexperts.%d.%s.weight" % (pre, e, hn)] = (p, whole)
            views["condensed_layers.%d.weights" % layer] = (c.weights, whole)
            if c.shared is not None:
                for hn in ("gate_proj", "up_proj", "down_proj"):
                    views["%s%s.%s.weight" % (pre, shared_name(arch), hn)] = \
                        (getattr(c.shared, hn).weight, whole)
            if c.shared_gate is not None:
                views[pre + "shared_expert_gate.weight"] = (c.shared_gate.weight, whole)
        elif arch != "deepseek" and is_moe_block(arch, dec.mlp):
            ex = dec.mlp.experts
            n, two_i = ex.gate_up_proj.shape[0], ex.gate_up_proj.shape[1]
            I = two_i // 2
            for e in range(n):
                views["%sexperts.%d.%s.weight" % (pre, e, names[0])] = \
                    (ex.gate_up_proj, lambda t, e=e: t[e, :I])
                views["%sexperts.%d.%s.weight" % (pre, e, names[1])] = \
                    (ex.gate_up_proj, lambda t, e=e: t[e, I:])
                views["%sexperts.%d.%s.weight" % (pre, e, names[2])] = \
                    (ex.down_proj, lambda t, e=e: t[e])
    if path is not None:
        check_views(views, path)
    return views


def check_views(views, path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for hub, (p, sl) in views.items():
            if hub.startswith("condensed_layers."):
                continue
            if hub not in keys:
                raise ValueError("%s: no tensor %s in the checkpoint" % (path, hub))
            if not torch.equal(sl(p.data), f.get_tensor(hub).to(p.dtype)):
                raise ValueError("%s: %s differs from the loaded model" % (path, hub))


def condensed_trainable(views):
    """CONDENSED set: every Linear of the shared and kept experts of condensed layers (qwen2_moe's
    shared_expert_gate included: it belongs to the shared expert), plus the fixed weights."""
    out = []
    for hub in views:
        if hub.startswith("condensed_layers."):
            out.append(hub)
            continue
        layer = hub_layer(hub)
        if layer is None or not any(("condensed_layers.%d.weights" % layer) == v for v in views):
            continue
        if ".experts." in hub or ".shared_expert" in hub:
            out.append(hub)
    return sorted(out)


def hub_layer(hub):
    if not hub.startswith("model.layers."):
        return None
    return int(hub.split(".")[2])


def set_trainable(model, views, names):
    """requires_grad on the parameters under names; every other parameter frozen"""
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        views[n][0].requires_grad_(True)


def grads(views, names):
    """{hub name: gradient} of names, in the model's dtype (zeros where autograd left none)"""
    out = {}
    for n in names:
        p, sl = views[n]
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[n] = sl(g).detach().contiguous().clone()
    return out


def values(views, names):
    return {n: views[n][1](views[n][0].data).float().contiguous().clone() for n in names}


# ---- the loss --------------------------------------------------------------------------------

class DeepseekAux:
    """The remote code's training-mode load-balancing loss of DeepSeekMoE v1 (MoEGate, seq_aux),
    collected per MoE layer for one sequence (a batch of one: no padding to count):
        aux_l = sum_e ce[e] * mean_t p[t, e],   ce[e] = (#top-k slots on e) / (T * K / E)
    seq_aux false: aux_l = sum_e (#slots on e / (T*K)) * E * mean_t p[t, e]  (the same for one
    sequence).  Unscaled (no alpha)."""

    def __init__(self, model):
        self.layers = []
        self.margins = []
        self.hooks = []
        for dec in model.model.layers:
            if isinstance(getattr(dec, "mlp", None), deepseek_v1.DeepseekMoE):
                self.hooks.append(dec.mlp.gate.register_forward_hook(self.hook))

    def hook(self, gate, inp, out):
        logits, _, idx = out
        p = logits.softmax(dim=-1)
        E = p.shape[-1]
        T, K = idx.shape
        counts = torch.zeros(E).scatter_add_(0, idx.reshape(-1), torch.ones(T * K))
        ce = counts / (T * K / E)
        self.layers.append((ce * p.mean(dim=0)).sum())
        self.margins.append(topk_margin(p.detach(), K))

    def remove(self):
        for h in self.hooks:
            h.remove()


def topk_margin(p, K):
    s = p.sort(dim=-1, descending=True).values
    return float((s[:, K - 1] - s[:, K]).min()) if s.shape[-1] > K else float("inf")


def aux_coef_of(cfg):
    return cfg["aux_loss_alpha"] if cfg["model_type"] == "deepseek" else cfg["router_aux_loss_coef"]


def track(x0):
    """the embedding output, with its gradient kept (a leaf when the embedding is frozen)"""
    if not x0.requires_grad:
        return x0.detach().requires_grad_(True)
    x0.retain_grad()
    return x0


def deepseek_forward(model, ids, want_aux):
    """one sequence: (x0 leaf-like embedding output, logits [T,V], aux per MoE layer, margins)"""
    hook = DeepseekAux(model)
    try:
        x0 = track(model.model.embed_tokens(torch.as_tensor(ids)[None]))
        x = x0
        for layer in model.model.layers:
            x = layer(x)
        logits = model.lm_head(model.model.norm(x))[0]
    finally:
        hook.remove()
    return x0, logits, hook.layers, hook.margins


def hf_forward(model, seqs, want_aux):
    """a right-padded batch with attention_mask: (x0 [B,T,H], logits [B,T,V], aux (pooled
    over MoE layers and real tokens, as load_balancing_loss_func), each sequence's smallest
    top-k routing margin, mask)"""
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.as_tensor(s)
        mask[b, :len(s)] = 1
    x0 = track(model.model.embed_tokens(ids))
    out = model(inputs_embeds=x0, attention_mask=mask, output_router_logits=True)
    K = model.config.num_experts_per_tok
    margins = [float("inf")] * B
    for rl in (getattr(out, "router_logits", None) or ()):
        p = F.softmax(rl.detach().float(), dim=-1).reshape(B, T, -1)
        margins = [min(m, topk_margin(p[b, :len(s)], K)) for b, (m, s) in enumerate(zip(margins, seqs))]
    aux = getattr(out, "aux_loss", None) if want_aux else None
    return x0, out.logits, aux, margins, mask


def batch_logits(model, seqs):
    """(x0s, logits [B, T, V] right-padded with zeros, None, margins) of a batch"""
    if not isinstance(model, deepseek_v1.DeepseekForCausalLM):
        x0, logits, _, margins, _ = hf_forward(model, seqs, False)
        return x0, logits, None, margins
    outs = [deepseek_forward(model, s, False) for s in seqs]
    T = max(len(s) for s in seqs)
    logits = torch.zeros(len(seqs), T, outs[0][1].shape[-1], dtype=outs[0][1].dtype)
    for b, o in enumerate(outs):
        logits[b, :len(seqs[b])] = o[1]
    return [o[0] for o in outs], logits, None, [min(o[3], default=float("inf")) for o in outs]


def ce_sum(logits, targets):
    """sum over positions of cross-entropy(logits[t], targets[t]), targets < 0 ignored"""
    t = torch.as_tensor(targets, dtype=torch.long)
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.cross_entropy(logits, t, ignore_index=-100, reduction="sum")


def shifted_targets(labels):
    """lib/train.h's targets: targets[t] = labels[t+1], the last position -100"""
    return list(labels[1:]) + [-100]


def batch_loss(model, seqs, targets, dscale, aux_scale):
    """loss = dscale * sum CE + aux_scale * aux (aux_scale 0: no aux), as lib/train.h.
    Returns (loss tensor, ce_sum float, aux float or None, [x0 gradient getter per sequence],
    [smallest top-k routing margin per sequence]).
    deepseek: one sequence at a time; aux = sum over MoE layers of the mean over sequences.
    Others (transformers classes, modeling_cdmoe.py's included): one right-padded batch; aux =
    HF's pooled load_balancing_loss_func."""
    want_aux = aux_scale != 0
    arch = "deepseek" if isinstance(model, deepseek_v1.DeepseekForCausalLM) else "hf"
    if arch == "deepseek" and want_aux and not getattr(model.config, "seq_aux", True):
        raise NotImplementedError("deepseek with seq_aux false: the batch-pooled aux is not written")
    if arch == "deepseek":
        total_ce, x0s, margins = 0, [], []
        per_layer = None
        for ids, tg in zip(seqs, targets):
            x0, logits, aux_l, m = deepseek_forward(model, ids, want_aux)
            total_ce = total_ce + ce_sum(logits, tg)
            x0s.append(lambda x0=x0: x0.grad[0])
            margins.append(min(m, default=float("inf")))
            per_layer = aux_l if per_layer is None else [a + b for a, b in zip(per_layer, aux_l)]
        aux = sum(a / len(seqs) for a in per_layer) if per_layer else torch.zeros(())
    else:
        x0, logits, aux, margins, _ = hf_forward(model, seqs, want_aux)
        total_ce = sum(ce_sum(logits[b, :len(s)], tg) for b, (s, tg) in enumerate(zip(seqs, targets)))
        x0s = [lambda b=b, n=len(s): x0.grad[b, :n] for b, s in enumerate(seqs)]
        if aux is None:
            aux = torch.zeros(())
    loss = dscale * total_ce + (aux_scale * aux if want_aux else 0)
    return loss, float(total_ce.detach()), (float(aux.detach()) if want_aux else None), x0s, margins


# ---- AdamW, as moe-tune does it (tests/fixtures/train/README.md section 2) --------------------

def lr_at(k, spec):
    """learning rate of update k (0-based) of S: linear warm-up over W updates, then linear decay
    from lr to the absolute floor min_lr, reached at the last update"""
    S, W, lr, lo = spec["steps"], spec["warmup"], spec["lr"], spec["min_lr"]
    if k < W:
        return lr * (k + 1) / W
    if S - 1 <= W:
        return lr
    return lo + (lr - lo) * (S - 1 - k) / (S - 1 - W)


def make_adamw(params, spec):
    """torch's AdamW on float32 (or float64) masters; weight decay on >= 2-D tensors only"""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": spec["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=spec["lr"], betas=(spec["beta1"], spec["beta2"]), eps=spec["eps"],
                             foreach=False, fused=False)


def adamw_step(model, params, opt, micro, spec, k, aux_coef):
    """update k from the micro-batches `micro` (lists of token sequences, already cut): the
    CE token-weighted over the whole step, aux averaged over the micro-batches, clipping, the
    schedule's lr.  Returns (step record, [per micro-batch: per sequence routing margin])."""
    A = len(micro)
    N = sum(len(s) - 1 for mb in micro for s in mb)
    opt.zero_grad(set_to_none=False)
    ce_total, aux_total, margins = 0.0, 0.0, []
    for mb in micro:
        targets = [shifted_targets(s) for s in mb]
        loss, ce, aux, _, m = batch_loss(model, mb, targets, 1.0 / N, aux_coef / A)
        loss.backward()
        ce_total += ce
        aux_total += aux if aux is not None else 0.0
        margins.append(m)
    norm = float(torch.nn.utils.clip_grad_norm_(params, spec["max_grad_norm"], foreach=False))
    lr = lr_at(k, spec)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    rec = {"step": k + 1, "lr": lr, "ntokens": N, "ce_sum": ce_total,
           "loss": ce_total / N + aux_coef * aux_total / A, "grad_norm": norm,
           "clipped": norm > spec["max_grad_norm"], "aux_mean": aux_total / A}
    return rec, margins
