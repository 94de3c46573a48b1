#!/usr/bin/env python3
"""Reference of the paper's baselines' layer choice (moe-layer-search --method
layerdrop|blockdrop), written plainly on the PyTorch models of
cdmoe_reference.py, to check the C search's picks.

  greedy   (the default): as the CD-MoE layer search, a candidate = the layers
           chosen so far plus one more, all dropped; score = divergence of the
           final hidden state (after the final norm) from the original model's,
           per token over the hidden dimension, mean over a sequence's tokens,
           then over sequences; the lowest wins (ties: the lower layer).
  cosine   He et al.'s one-shot criterion: one forward of the original model;
           a MoE layer's score is the cosine similarity of its input and output
           (LayerDrop: the hidden state after the attention vs after the MLP's
           residual add; BlockDrop: the decoder layer's input vs its output),
           mean over tokens, then over sequences; most similar first.

Dropping is done the most literal way: LayerDrop replaces the layer's MLP by
a module returning zeros (h + 0 = h); BlockDrop also zeroes the attention's
output projection for the duration (h + 0 + 0 = h).  Nothing of the C
engine's drop code is mirrored.

  baselines_reference.py picks --model DIR --tokens tokens.json [--max-length 16]
prints "layerdrop greedy: 4 3 1 2" lines, one per method and criterion.
  baselines_reference.py prune-check --model DIR --pruned DIR2 --dump D.zst
checks moe-eval's logits of an expert-pruned checkpoint (moe-condense --method
prune-freq|prune-reap) against the original model pruned in PyTorch.
  baselines_reference.py reap-check --model DIR --tokens tokens.json --calib C.zst
checks moe-calib --reap's saliencies against a plain computation.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cdmoe_reference import load, mean_divergence  # noqa: E402


class ZeroMLP(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class dropped:
    """Context manager: drop the MLP (method "layerdrop") or the whole block
    ("blockdrop") of the given layers; restore after."""

    def __init__(self, ad, layers, method):
        self.ad, self.layers, self.method = ad, list(layers), method

    def __enter__(self):
        self.saved = []
        for l in self.layers:
            layer = self.ad.layers[l]
            o = layer.self_attn.o_proj
            self.saved.append((layer, layer.mlp, o.weight.data.clone()))
            layer.mlp = ZeroMLP()
            if self.method == "blockdrop":
                o.weight.data.zero_()
        return self

    def __exit__(self, *exc):
        for layer, mlp, w in self.saved:
            layer.mlp = mlp
            layer.self_attn.o_proj.weight.data.copy_(w)
        return False


def greedy(ad, seqs, method, metric="js"):
    origs = [ad.hidden_states(s)[-1] for s in seqs]
    chosen = []
    while len(chosen) < len(ad.moe_layers):
        best = None
        for l in ad.moe_layers:
            if l in chosen:
                continue
            with dropped(ad, chosen + [l], method):
                cands = [ad.hidden_states(s)[-1] for s in seqs]
            sc = mean_divergence(origs, cands, metric)
            if best is None or sc < best[1]:
                best = (l, sc)
        chosen.append(best[0])
    return chosen


@torch.no_grad()
def cosine(ad, seqs, method):
    """Mean cosine similarity of each MoE layer's input and output, most similar first."""
    sims = {l: [] for l in ad.moe_layers}
    seen = {}

    def hooks(l):
        layer = ad.layers[l]
        if method == "blockdrop":
            pre = layer.register_forward_pre_hook(
                lambda m, args, kwargs: seen.__setitem__("in", args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True)
            post = layer.register_forward_hook(
                lambda m, args, out: seen.__setitem__("out", out[0] if isinstance(out, tuple) else out))
        else:  # the MLP block: its residual input h, its output h + mlp(norm(h))
            pre = layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, args: seen.__setitem__("in", args[0]))
            post = layer.mlp.register_forward_hook(
                lambda m, args, out: seen.__setitem__("out", seen["in"] + (out[0] if isinstance(out, tuple) else out)))
        return pre, post

    for l in ad.moe_layers:
        handles = hooks(l)
        for s in seqs:
            ad.hidden_states(s)
            a = seen["in"].reshape(-1, seen["in"].shape[-1]).double()
            b = seen["out"].reshape(-1, seen["out"].shape[-1]).double()
            sims[l].append(F.cosine_similarity(a, b, dim=-1, eps=0).mean().item())
        for h in handles:
            h.remove()
    mean = {l: sum(v) / len(v) for l, v in sims.items()}
    return sorted(ad.moe_layers, key=lambda l: (-mean[l], l))


@torch.no_grad()
def prune_check(model_dir, pruned_dir, dump):
    """The original model pruned in PyTorch (per pruned_dir's config.json
    "pruned_experts"): each MoE layer keeps the router's rows of the kept
    experts and those experts, and routes top-k among them (softmax over the
    kept experts' logits).  Its logits must equal moe-eval's on the pruned
    checkpoint (the dump), relative error under 1e-5."""
    import numpy as np
    import msgpack
    import zstandard
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with open(os.path.join(pruned_dir, "config.json")) as f:
        kept = {int(l): ids for l, ids in json.load(f)["pruned_experts"].items()}
    for l, ids in kept.items():
        mlp = model.model.layers[l].mlp
        idx = torch.tensor(ids)
        mlp.gate.weight = nn.Parameter(mlp.gate.weight[idx].clone())
        mlp.experts.gate_up_proj = nn.Parameter(mlp.experts.gate_up_proj[idx].clone())
        mlp.experts.down_proj = nn.Parameter(mlp.experts.down_proj[idx].clone())
        for m in (mlp, mlp.gate, mlp.experts):
            if hasattr(m, "num_experts"):
                m.num_experts = len(ids)
    with open(dump, "rb") as f:
        recs = list(msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(f), raw=False))[1:]
    tokens = [r for r in recs if r.get("type") == "tokens"]
    dumps = [r for r in recs if r.get("type") == "dump"]
    worst = 0.0
    for tok, d in zip(tokens, dumps):
        ids = np.frombuffer(tok["ids"]["data"], dtype="<i4").astype("int64")
        want = np.frombuffer(d["logits"]["data"], dtype="<f4").reshape(d["logits"]["shape"])
        got = model(torch.from_numpy(ids)[None]).logits[0].float().numpy()
        worst = max(worst, float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    print("%s: %d sequences, worst relative error %.2e" % (pruned_dir, len(tokens), worst))
    if not (tokens and worst <= 1e-5):
        sys.exit("%s: logits differ from the PyTorch pruned model: relative error %.2e" % (pruned_dir, worst))


@torch.no_grad()
def reap(ad, seqs):
    """REAP saliency: per MoE layer and expert, the mean over the (token, slot)
    pairs routed to it of the router's top-k weight times the L2 norm of the
    expert's unweighted output on that token; None when nothing was routed."""
    sums = {l: [0.0] * ad.n_experts for l in ad.moe_layers}
    counts = {l: [0] * ad.n_experts for l in ad.moe_layers}

    def hook_for(l):
        def hook(mod, inp, out):
            _, w, idx = out
            x = inp[0].reshape(-1, inp[0].shape[-1])
            mlp = ad.layers[l].mlp
            for t in range(x.shape[0]):
                for wt, e in zip(w[t].tolist(), idx[t].tolist()):
                    y = ad.expert(mlp, e, x[t:t + 1]).double()
                    sums[l][e] += wt * y.norm().item()
                    counts[l][e] += 1
        return hook

    hooks = [ad.layers[l].mlp.gate.register_forward_hook(hook_for(l)) for l in ad.moe_layers]
    try:
        for s in seqs:
            ad.model(torch.tensor([s]))
    finally:
        for h in hooks:
            h.remove()
    return {l: [s / c if c else None for s, c in zip(sums[l], counts[l])] for l in ad.moe_layers}


def reap_check(ad, seqs, calib_stream):
    """moe-calib --reap's "reap" arrays against reap(), relative error under 1e-5."""
    import struct
    import msgpack
    import zstandard
    with open(calib_stream, "rb") as f:
        recs = list(msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(f), raw=False))[1:]
    want = reap(ad, seqs)
    seen = 0
    for r in recs:
        if r.get("type") != "calib":
            continue
        got = struct.unpack("<%dd" % r["reap"]["shape"][0], r["reap"]["data"])
        for e, (g, w) in enumerate(zip(got, want[r["layer"]])):
            if w is None:
                assert g != g, (r["layer"], e, g)   # NaN: never routed
            elif abs(g - w) > 1e-5 * abs(w):
                sys.exit("layer %d expert %d: REAP %.9g, reference %.9g" % (r["layer"], e, g, w))
        seen += 1
    if seen != len(ad.moe_layers):
        sys.exit("%d calib records with reap, %d MoE layers" % (seen, len(ad.moe_layers)))
    print("%s: REAP of %d layers within 1e-5" % (calib_stream, seen))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["picks", "prune-check", "reap-check"])
    ap.add_argument("--calib", help="reap-check: moe-calib --reap's stream (on --tokens)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens")
    ap.add_argument("--max-length", type=int, default=16)
    ap.add_argument("--pruned", help="prune-check: the pruned checkpoint")
    ap.add_argument("--dump", help="prune-check: moe-eval --dump logits of it")
    a = ap.parse_args()
    if a.cmd == "prune-check":
        prune_check(a.model, a.pruned, a.dump)
        return
    ad = load(a.model)
    with open(a.tokens) as f:
        seqs = json.load(f)
    seqs = seqs["sequences"] if isinstance(seqs, dict) else seqs
    if a.cmd == "reap-check":
        reap_check(ad, seqs, a.calib)    # calibration uses whole sequences
        return
    seqs = [s[:a.max_length] for s in seqs]
    for method in ("layerdrop", "blockdrop"):
        print("%s greedy: %s" % (method, " ".join(map(str, greedy(ad, seqs, method)))))
        print("%s cosine: %s" % (method, " ".join(map(str, cosine(ad, seqs, method)))))


if __name__ == "__main__":
    main()
