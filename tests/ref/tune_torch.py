#!/usr/bin/env python3
"""moe-tune's training run in PyTorch, on any condensed checkpoint: the peer to compare moe-tune's
log, held-out loss and tuned tensors with (tests/fixtures/train/README.md section 2 is the spec;
the step itself is tests/ref/train_ref.py's, the one the AdamW fixtures were made with).

    tune_torch.py MODEL --data TRAIN.jsonl [--val VAL.jsonl] [--steps N | --epochs 1]
                  [--batch B] [--accum A] [--max-length T] [--lr LR] [--min-lr LR]
                  [--warmup W] [--weight-decay WD] [--clip C] [--train condensed|all]
                  [--out TUNED.safetensors] [--float64]

MODEL: a checkpoint written by moe-condense (config.json "condensed_layers"; loaded through its
modeling_cdmoe.py, trust_remote_code) or, with --train all, any checkpoint transformers (or
tests/ref/deepseek_v1.py) loads.  Data: JSON Lines of {"ids": [...]} (moe-tune's tokenized-
elsewhere form), in file order (moe-tune --no-shuffle), each cut to --max-length.  Step k takes
the next B*A sequences as micro-batches of B (the last step of an epoch possibly fewer); --steps
beyond one epoch wraps around the file.  W < 1 is a ratio of the steps (rounded), as moe-tune's.
Writes JSON Lines on stdout: {"type": "val", "step": 0, ...} before training (with --val), one
{"type": "step", ...} per step (loss before the update, lr, grad_norm before clipping, tokens),
{"type": "val", "step": N, ...} after.  --out: the trained tensors under their checkpoint names.
Condensed training only: the fixed expert weights are not trained (modeling_cdmoe.py keeps them
as constants).  Float32 (--float64: the exact answer, for judging both float32 runs).
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_ref as tr  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description="moe-tune's training run in PyTorch")
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--val")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--min-lr", type=float, default=5e-6)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--train", choices=["condensed", "all"], default="condensed")
    ap.add_argument("--out")
    ap.add_argument("--float64", action="store_true")
    return ap.parse_args()


def read_ids(path, max_length):
    seqs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            ids = json.loads(line).get("ids")
            if not isinstance(ids, list) or len(ids) < 2:
                sys.exit("tune_torch.py: %s:%d: not an {\"ids\": [...]} line of 2 or more ids" % (path, n))
            seqs.append(ids[:max_length] if max_length > 0 else ids)
    return seqs


def load(path, dtype):
    """(config, model): a condensed checkpoint through its modeling_cdmoe.py, else train_ref's"""
    cfg = tr.load_config(path)
    if not cfg.get("condensed_layers"):
        return cfg, tr.load_model(path, dtype)[1]
    import transformers as tf
    tf.utils.logging.disable_progress_bar()
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=True,
                                                     attn_implementation="eager")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return cfg, model


def condensed_tensors(arch, cfg, model):
    """{checkpoint name: (parameter, slice)} of every Linear of the condensed layers' MLPs, in
    modeling_cdmoe.py's layout (fused kept experts: slot i = the i-th smallest kept id)"""
    views, whole = {}, (lambda t: t)
    for layer in sorted(int(l) for l in cfg["condensed_layers"]):
        blk = model.model.layers[layer].mlp
        if not hasattr(blk, "kept_ids"):   # folded: one dense SwiGLU
            for hn in ("gate_proj", "up_proj", "down_proj"):
                views["model.layers.%d.mlp.%s.weight" % (layer, hn)] = (getattr(blk, hn).weight, whole)
            continue
        pre, names = tr.moe_prefix(arch, layer), tr.expert_names(arch)
        if isinstance(blk.experts, torch.nn.ModuleDict):
            for j, e in blk.experts.items():
                for hn, lin in zip(names, (e.gate_proj, e.up_proj, e.down_proj)):
                    views["%sexperts.%s.%s.weight" % (pre, j, hn)] = (lin.weight, whole)
        elif blk.experts is not None:
            gu, down = blk.experts.gate_up_proj, blk.experts.down_proj
            I = gu.shape[1] // 2
            for i, j in enumerate(blk.kept_ids):
                views["%sexperts.%d.%s.weight" % (pre, j, names[0])] = (gu, lambda t, i=i: t[i, :I])
                views["%sexperts.%d.%s.weight" % (pre, j, names[1])] = (gu, lambda t, i=i: t[i, I:])
                views["%sexperts.%d.%s.weight" % (pre, j, names[2])] = (down, lambda t, i=i: t[i])
        if blk.shared_name:
            for hn in ("gate_proj", "up_proj", "down_proj"):
                views["%s%s.%s.weight" % (pre, blk.shared_name, hn)] = \
                    (getattr(getattr(blk, blk.shared_name), hn).weight, whole)
        if blk.shared_expert_gate is not None:
            views[pre + "shared_expert_gate.weight"] = (blk.shared_expert_gate.weight, whole)
    return views


def val_loss(model, seqs, batch):
    """token-weighted mean CE over the held-out sequences (every position but the last)"""
    ce, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            mb = seqs[i:i + batch]
            _, c, _, _, _ = tr.batch_loss(model, mb, [tr.shifted_targets(s) for s in mb], 1.0, 0.0)
            ce += c
            n += sum(len(s) - 1 for s in mb)
    return {"loss": ce / n, "ppl": math.exp(ce / n), "tokens": n}


def steps_of(seqs, a):
    """the sequences of each step: file order, B*A per step, wrapping for --steps"""
    per = a.batch * a.accum
    if a.steps is None:
        chunks = [seqs[i:i + per] for e in range(a.epochs) for i in range(0, len(seqs), per)]
    else:
        chunks = [[seqs[(k * per + j) % len(seqs)] for j in range(per)] for k in range(a.steps)]
    return [[c[i:i + a.batch] for i in range(0, len(c), a.batch)] for c in chunks]


def main():
    a = parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.use_deterministic_algorithms(True)
    dtype = torch.float64 if a.float64 else torch.float32
    cfg, model = load(a.model, dtype)
    arch = cfg["model_type"]
    if a.train == "condensed":
        if not cfg.get("condensed_layers"):
            sys.exit("tune_torch.py: %s: no condensed layers (moe-condense first, or --train all)" % a.model)
        views = condensed_tensors(arch, cfg, model)
        coef = 0.0
    elif cfg.get("condensed_layers"):
        sys.exit("tune_torch.py: %s: --train all of a condensed checkpoint is not written" % a.model)
    else:
        views = tr.hub_views(arch, model)
        coef = tr.aux_coef_of(cfg)
    names = sorted(views)
    params = []
    for n in names:
        p = views[n][0]
        if all(p is not q for q in params):
            params.append(p)
    for p in params:
        p.requires_grad_(True)
    data = read_ids(a.data, a.max_length)
    plan = steps_of(data, a)
    warmup = round(a.warmup * len(plan)) if a.warmup < 1 else int(a.warmup)
    spec = {"steps": len(plan), "warmup": warmup, "lr": a.lr, "min_lr": a.min_lr, "beta1": 0.9,
            "beta2": 0.999, "eps": 1e-8, "weight_decay": a.weight_decay,
            "max_grad_norm": a.clip if a.clip > 0 else float("inf")}
    opt = tr.make_adamw(params, spec)
    val = read_ids(a.val, a.max_length) if a.val else None
    if val:
        print(json.dumps(dict(type="val", step=0, **val_loss(model, val, a.batch))))
    for k, micro in enumerate(plan):
        rec, _ = tr.adamw_step(model, params, opt, micro, spec, k, coef)
        if a.train != "all":
            del rec["aux_mean"]
        print(json.dumps(dict(type="step", **rec)), flush=True)
    if val:
        print(json.dumps(dict(type="val", step=len(plan), **val_loss(model, val, a.batch))))
    if a.out:
        from safetensors.torch import save_file
        save_file({n: views[n][1](views[n][0].data).float().contiguous() for n in names}, a.out,
                  metadata={"format": "pt"})


if __name__ == "__main__":
    main()
