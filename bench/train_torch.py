#!/usr/bin/env python3
"""PyTorch CPU peer for moe-tune's training benchmark: training steps (forward, backward,
gradient clipping, AdamW) of the same checkpoint in float32, timed.

    train_torch.py MODEL [--batch B] [--length T] [--steps N] [--train condensed|all]
                   [--threads N] [--ids FILE.i32] [--seed S]

MODEL is a checkpoint directory: a condensed one (config.json "condensed_layers", written by
moe-condense: loaded through its modeling_cdmoe.py, trust_remote_code) or a plain one
(transformers' own class; deepseek, which transformers lacks, through tests/ref/deepseek_v1.py).
--train condensed (the default when the model has condensed layers, as moe-tune's) trains every
parameter of the condensed layers' MLPs (their shared and kept experts); --train all trains
everything and adds the load-balancing loss (output_router_logits, the config's coefficient).
Each step is B sequences of T tokens, labels = the ids (every position trained, no padding):
the ids of --ids (little-endian int32, B*T of them, e.g. what bench/forward_torch.py ids
writes) or random ones from --seed.  Gradients are clipped to norm 1 and AdamW (lr 1e-5,
betas 0.9/0.999, eps 1e-8, weight decay 0.01 on tensors of two or more dimensions; PyTorch's
fused CPU kernel where it has one) updates the trained float32 weights.

The first step warms up; of the next N (default 3) the best time gives tokens_per_s = B*T /
step seconds (best, because the machine is shared; the mean is printed too), and
trained_tokens_per_s = B*(T-1) / step seconds (the positions with a target: moe-tune's "tokens").  One JSON object
on stdout.  Threads: --threads (default: every core), as the run of moe-tune it is compared with.
Memory: float32 weights, plus gradients and two AdamW moments for the trained ones (--train all
on bench/forward.sh's 1.1-billion-parameter qwen2_moe: about 18 GB; condense it first).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ref"))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--train", choices=["condensed", "all"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ids")
    ap.add_argument("--seed", type=int, default=1234)
    return ap.parse_args()


def load(path):
    """(config, model, how): the checkpoint in float32, training mode"""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("condensed_layers"):
        import transformers as tf
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         trust_remote_code=True)
        how = "transformers + modeling_cdmoe.py"
    elif cfg["model_type"] == "deepseek":
        import train_ref
        _, model = train_ref.load_model(path)
        how = "tests/ref/deepseek_v1.py"
    else:
        import transformers as tf
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        how = "transformers"
    model.train()
    return cfg, model, how


def trained_params(path, cfg, model, which):
    if which == "all":
        return list(model.parameters())
    layers = sorted(int(l) for l in (cfg.get("condensed_layers") or {}))
    if not layers:
        sys.exit("train_torch.py: %s: no condensed layers (--train all trains a plain model)" % path)
    return [p for l in layers for p in model.model.layers[l].mlp.parameters()]


def make_optimizer(params):
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, fused=True), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.999), eps=1e-8), "foreach"


def step_loss(cfg, model, ids, which):
    """the causal-LM loss of the batch (+ aux with --train all), as the model computes it"""
    aux = which == "all"
    if cfg["model_type"] == "deepseek" and not cfg.get("condensed_layers"):
        import train_ref
        seqs = ids.tolist()
        targets = [train_ref.shifted_targets(s) for s in seqs]
        n = sum(len(s) - 1 for s in seqs)
        coef = cfg.get("aux_loss_alpha", 0.001) if aux else 0.0
        return train_ref.batch_loss(model, seqs, targets, 1.0 / n, coef)[0]
    kw = {"output_router_logits": True} if aux and cfg["model_type"] != "deepseek" else {}
    return model(input_ids=ids, labels=ids, **kw).loss


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg, model, how = load(a.model)
    which = a.train or ("condensed" if cfg.get("condensed_layers") else "all")
    for p in model.parameters():
        p.requires_grad_(False)
    params = trained_params(a.model, cfg, model, which)
    for p in params:
        p.requires_grad_(True)
    opt, opt_kind = make_optimizer(params)
    n = a.batch * a.length
    if a.ids:
        ids = np.fromfile(a.ids, dtype="<i4")
        if ids.size < n:
            sys.exit("train_torch.py: %s: %d ids, need %d" % (a.ids, ids.size, n))
        ids = torch.from_numpy(ids[:n].astype(np.int64)).view(a.batch, a.length)
    else:
        ids = torch.randint(0, cfg["vocab_size"], (a.batch, a.length))
    times, losses = [], []
    for _ in range(a.steps + 1):
        t = time.perf_counter()
        loss = step_loss(cfg, model, ids, which)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    timed = times[1:] or times
    print(json.dumps({
        "tokens_per_s": n / min(timed), "trained_tokens_per_s": (n - a.batch) / min(timed),
        "step_s_best": min(timed),
        "step_s_mean": sum(timed) / len(timed), "warmup_step_s": times[0],
        "batch": a.batch, "length": a.length, "steps": len(timed), "train": which,
        "trained_params": sum(p.numel() for p in params), "loss_first": losses[0],
        "loss_last": losses[-1], "threads": torch.get_num_threads(), "model_code": how,
        "attn": getattr(model.config, "_attn_implementation", None),
        "experts": getattr(model.config, "_experts_implementation", None),
        "adamw": opt_kind, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
