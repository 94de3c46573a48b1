#!/usr/bin/env python3
"""Reference implementation of the ORIGINAL CD-MoE algorithm (duterscmy/CD-MoE).

Written from tests/ref/CDMOE_ALGORITHM.md (which describes what the original
code computes); no code is taken from it.  It runs the method *literally* as
the original does -- a full model forward per candidate, the candidate being
installed by replacing the decoder layer's MLP module -- but model-agnostic:
DeepSeekMoE v1 (tests/ref/deepseek_v1.py) and transformers' qwen2_moe,
qwen3_moe, olmoe and mixtral.

    python3 tests/ref/cdmoe_reference.py fixtures [--out tests/fixtures/search]
        regenerate the committed fixtures from the tiny models
        (tests/ref/tiny_models.py writes those).
    python3 tests/ref/cdmoe_reference.py run --model DIR --tokens FILE.json ...
        run calibration / ranking / layer search on any model and token list
        (FILE.json: a JSON list of token-id lists).

Layers are identified by decoder-layer index everywhere (not by the
original's MoE-layer ordinal; see CDMOE_ALGORITHM.md for the mapping).
Everything runs in float32 (the original ran bfloat16 on CUDA), one sequence
at a time (the original batched 8 with left padding; see the notes).
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

EPS = 1e-10   # added to probabilities before every log, as the original


# --------------------------------------------------------------------------
# model adapters: one surface over the five architectures

class Adapter:
    """Wraps a loaded model.  moe_layers: decoder-layer indices with a routed MoE."""

    def __init__(self, model, arch):
        self.model, self.arch = model, arch
        self.layers = model.model.layers
        self.moe_layers = [l for l, layer in enumerate(self.layers) if hasattr(layer.mlp, "gate")]
        mlp = self.layers[self.moe_layers[0]].mlp
        if arch == "deepseek":
            self.n_experts = len(mlp.experts)
            self.top_k = mlp.gate.top_k
        else:
            self.n_experts = mlp.experts.gate_up_proj.shape[0]
            self.top_k = mlp.gate.top_k
        self.n_layers = len(self.layers)

    @torch.no_grad()
    def hidden_states(self, ids):
        """HF output_hidden_states: [emb, out(0), .., out(L-2), norm(out(L-1))], float32, [T, H]."""
        out = self.model(torch.tensor([ids]), output_hidden_states=True)
        return [h[0].to(torch.float32) for h in out.hidden_states]

    def expert(self, mlp, e, x):
        """Output of routed expert e of an (original) MoE module on x, unweighted."""
        if self.arch == "deepseek":
            return mlp.experts[e](x)
        ex = mlp.experts
        gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(ex.act_fn(gate) * up, ex.down_proj[e])

    def shared(self, mlp, x):
        """Shared-expert contribution (with Qwen2-MoE's sigmoid gate), or None."""
        if self.arch == "deepseek":
            return mlp.shared_experts(x) if mlp.shared_experts is not None else None
        if hasattr(mlp, "shared_expert"):
            return torch.sigmoid(mlp.shared_expert_gate(x)) * mlp.shared_expert(x)
        return None


def load(path, dtype=torch.float32):
    with open(os.path.join(path, "config.json")) as f:
        arch = json.load(f)["model_type"]
    if arch == "deepseek":
        from deepseek_v1 import DeepseekForCausalLM
        model = DeepseekForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     attn_implementation="eager").eval()
    return Adapter(model, arch)


class CondensedMLP(nn.Module):
    """The original's condensed ("pruned") layer: every token goes through the
    listed experts, each output multiplied by the expert's mean routing weight,
    plus the shared experts; no router.  Outputs are stacked in list order with
    the shared part last, then summed.

    unrouted="original": when an expert of the list has no mean weight (never
    routed in calibration) the original's lookup raises, its exception handler
    raises again, and the layer silently falls back to the ordinary routed MLP
    (output identical to the original model).  unrouted="exclude": callers
    never build such a layer (our tools' behaviour)."""

    def __init__(self, ad, orig, layer, experts, means, unrouted="original"):
        super().__init__()
        self.ad, self.orig, self.layer = ad, orig, layer
        self.experts, self.means, self.unrouted = list(experts), means, unrouted

    def forward(self, x):
        if any((self.layer, e) not in self.means for e in self.experts):
            if self.unrouted == "original":
                return self.orig(x)
            raise KeyError("layer %d: expert without mean weight in %s" % (self.layer, self.experts))
        outs = [self.ad.expert(self.orig, e, x) * self.means[(self.layer, e)] for e in self.experts]
        sh = self.ad.shared(self.orig, x)
        if sh is not None:
            outs.append(sh)
        if not outs:
            # K = 0 without shared experts: the MLP contributes nothing (our
            # definition; the original's torch.stack([]) raised and fell back
            # to routing, i.e. it could not express this case).
            return torch.zeros_like(x)
        return torch.stack(outs, dim=0).sum(dim=0)


class condensed:
    """Context manager: install condensed MLPs for {layer: [experts]}, restore after."""

    def __init__(self, ad, plan, means, unrouted="original"):
        self.ad, self.plan, self.means, self.unrouted = ad, plan, means, unrouted

    def __enter__(self):
        self.saved = {}
        for l, experts in self.plan.items():
            orig = self.ad.layers[l].mlp
            self.saved[l] = orig
            self.ad.layers[l].mlp = CondensedMLP(self.ad, orig, l, experts, self.means, self.unrouted)
        return self

    def __exit__(self, *exc):
        for l, orig in self.saved.items():
            self.ad.layers[l].mlp = orig
        return False


# --------------------------------------------------------------------------
# divergences

def kl_original(p, q):
    """The original's calculate_kl_divergence: KL(p||q) with 1e-10 added to both,
    'batchmean' = sum over all elements / number of rows (tokens)."""
    return F.kl_div((q + EPS).log(), p + EPS, reduction="batchmean")


def divergence(o, c, metric):
    """Per-sample divergence between original o and condensed c outputs [T, H]."""
    if metric == "js":
        p, q = F.softmax(o, dim=-1), F.softmax(c, dim=-1)
        m = 0.5 * (p + q)
        return (0.5 * (kl_original(p, m) + kl_original(q, m))).item()
    if metric == "kl":      # ours: KL(original || condensed), same conventions
        return kl_original(F.softmax(o, dim=-1), F.softmax(c, dim=-1)).item()
    if metric == "mse":     # ours: mean over tokens and dimensions
        return ((o - c) ** 2).mean().item()
    if metric == "cosine":  # ours: mean over tokens of 1 - cos
        return (1.0 - F.cosine_similarity(o, c, dim=-1)).mean().item()
    raise ValueError(metric)


def mean_divergence(origs, conds, metric):
    """Per-sample divergence, summed as Python floats, divided by the sample count."""
    s = 0.0
    for o, c in zip(origs, conds):
        s += divergence(o, c, metric)
    return s / len(origs)


# --------------------------------------------------------------------------
# step 1: calibration

@torch.no_grad()
def calibrate(ad, seqs, max_length=None):
    """Per MoE layer and routed expert: sum of the top-k weights the router
    outputs (after renormalisation only where the model renormalises), number
    of tokens routed to the expert, mean = sum / count.  Every position of every
    sequence counts (the original: untruncated texts with BOS, batch size 1).
    Sums are accumulated in double (Python floats), token-major, slots in the
    router's output order, as the original.

    Also (ours, for moe-calib): per layer the mean over tokens of the entropy
    (nats) of the full router softmax, computed in float64 from the router
    logits, and the load of each expert = count / (tokens * top_k)."""
    stats = {l: {"sum": [0.0] * ad.n_experts, "count": [0] * ad.n_experts,
                 "entropy_sum": 0.0, "tokens": 0} for l in ad.moe_layers}
    hooks = []

    def hook_for(l):
        def hook(_mod, _inp, out):
            logits, w, idx = out
            st = stats[l]
            for wt, it in zip(w.reshape(-1).tolist(), idx.reshape(-1).tolist()):
                st["sum"][it] += wt
                st["count"][it] += 1
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            ent = -(p * torch.log(p)).sum(dim=-1)
            for v in ent.tolist():
                st["entropy_sum"] += v
            st["tokens"] += logits.shape[0]
        return hook

    for l in ad.moe_layers:
        hooks.append(ad.layers[l].mlp.gate.register_forward_hook(hook_for(l)))
    try:
        for s in seqs:
            ad.model(torch.tensor([s[:max_length] if max_length else s]))
    finally:
        for h in hooks:
            h.remove()
    res = {}
    for l, st in stats.items():
        n = st["tokens"]
        res[l] = {
            "sum": st["sum"], "count": st["count"],
            "mean": [s / c if c else None for s, c in zip(st["sum"], st["count"])],
            "tokens": n,
            "entropy": st["entropy_sum"] / n,
            "load": [c / (n * ad.top_k) for c in st["count"]],
        }
    return res


def means_of(calib):
    """{(layer, expert): mean} for the experts calibration routed to."""
    return {(l, e): m for l, st in calib.items() for e, m in enumerate(st["mean"]) if m is not None}


# --------------------------------------------------------------------------
# step 2a: greedy expert ranking per layer

@torch.no_grad()
def rank_experts(ad, seqs, calib, max_experts, metric="js", layers=None, max_length=256,
                 unrouted="original"):
    """For each MoE layer (decoder index) independently: greedily add the routed
    expert whose condensed layer gives the lowest divergence between the
    original and condensed output of THAT decoder layer (hidden_states[l+1];
    after the final norm for the last layer), over the truncated sequences.
    Candidates in ascending expert id; a strictly lower score replaces the best
    (ties: the lowest id wins).  Returns {layer: {"experts", "scores",
    "candidates": [[[expert, score], ...] per pick]}}."""
    means = means_of(calib)
    seqs = [s[:max_length] for s in seqs]
    out = {}
    for l in (layers if layers is not None else ad.moe_layers):
        origs = [ad.hidden_states(s)[l + 1] for s in seqs]
        picked, scores, cands = [], [], []
        while len(picked) < max_experts:
            best, best_e, tried = 1000000, -1, []
            for e in range(ad.n_experts):
                if e in picked:
                    continue
                if unrouted == "exclude" and (l, e) not in means:
                    continue
                with condensed(ad, {l: picked + [e]}, means, unrouted):
                    conds = [ad.hidden_states(s)[l + 1] for s in seqs]
                sc = mean_divergence(origs, conds, metric)
                tried.append([e, sc])
                if sc < best:
                    best, best_e = sc, e
            if best_e < 0:
                break   # (the original would append -1 here)
            picked.append(best_e)
            scores.append(best)
            cands.append(tried)
        out[l] = {"experts": picked, "scores": scores, "candidates": cands}
    return out


# --------------------------------------------------------------------------
# step 2b: greedy layer search

@torch.no_grad()
def search_layers(ad, seqs, calib, ranking, k, n_layers=None, metric="js", beam=1,
                  max_length=256, unrouted="original"):
    """Greedy (beam) search over MoE layers to condense, each condensed with the
    first k experts of its ranking, scored by the divergence of the final
    hidden state (after the final norm).  Each step: for each kept partial
    list (in order), candidates are the other MoE layers in ascending decoder
    index; all (list + [candidate], score) pairs are sorted by score with a
    stable sort and the first `beam` kept (ties: earlier candidate).  Returns
    {"order", "scores", "candidates": [[[layer, score], ...] per step]} for the
    best list (candidates only for beam 1)."""
    means = means_of(calib)
    seqs = [s[:max_length] for s in seqs]
    n_layers = len(ad.moe_layers) if n_layers is None else n_layers
    experts = {l: list(ranking[l]["experts"][:k]) if k else [] for l in ad.moe_layers}
    origs = [ad.hidden_states(s)[-1] for s in seqs]
    beams = [[]]
    best_scores, cands = [], []
    while len(beams[0]) < n_layers:
        scored, tried = [], []
        for chosen in beams:
            for l in ad.moe_layers:
                if l in chosen:
                    continue
                trial = chosen + [l]
                with condensed(ad, {x: experts[x] for x in trial}, means, unrouted):
                    conds = [ad.hidden_states(s)[-1] for s in seqs]
                sc = mean_divergence(origs, conds, metric)
                scored.append((trial, sc))
                tried.append([l, sc])
        scored.sort(key=lambda t: t[1])
        beams = [t for t, _ in scored[:beam]]
        best_scores.append(scored[0][1])
        cands.append(tried)
    res = {"order": beams[0], "scores": best_scores}
    if beam == 1:
        res["candidates"] = cands
    return res


# --------------------------------------------------------------------------
# the original's published JSON shapes

def to_original_json(ad, calib, ranking=None, order=None):
    """Our results in the original's file shapes (keys = MoE-layer ordinals,
    i.e. position of the layer among the MoE layers, counted from 0)."""
    ordinal = {l: i for i, l in enumerate(ad.moe_layers)}
    dw = {}
    for l, st in calib.items():
        for e in range(ad.n_experts):
            if st["count"][e]:
                dw["%d-%d" % (ordinal[l], e)] = [st["sum"][e], st["count"][e], st["mean"][e]]
    res = {"dynamic_weight": dw}
    if ranking is not None:
        res["layer_idx_to_expert_idx"] = {str(ordinal[l]): r["experts"] for l, r in ranking.items()}
    if order is not None:
        res["layer_idx_order"] = [ordinal[l] for l in order]
    return res


# --------------------------------------------------------------------------
# fixtures

CALIB_LENGTHS = [12, 20, 7, 24]
SEARCH_MAX_LENGTH = 16


# fixture name -> model directory (relative to the repository root)
FIXTURE_MODELS = {
    "deepseek": "tests/fixtures/models/deepseek-bf16",
    "qwen2_moe": "tests/fixtures/models/qwen2_moe-bf16",
    "qwen3_moe": "tests/fixtures/models/qwen3_moe-bf16",
    "olmoe": "tests/fixtures/models/olmoe-bf16",
    "mixtral": "tests/fixtures/models/mixtral-bf16",
    "deepseek-l5": "tests/fixtures/search/models/deepseek-l5",
    "qwen2_moe-l5": "tests/fixtures/search/models/qwen2_moe-l5",
}


def calib_tokens(vocab, bos=0):
    g = torch.Generator().manual_seed(12345)
    return [[bos] + torch.randint(2, vocab, (n - 1,), generator=g).tolist() for n in CALIB_LENGTHS]


def min_gap(cands):
    """Smallest relative gap between the winner and any other candidate over all picks."""
    g = math.inf
    for tried in cands:
        sc = sorted(s for _, s in tried)
        if len(sc) > 1:
            g = min(g, (sc[1] - sc[0]) / max(abs(sc[1]), 1e-30))
    return g


def write_token_stream(path, seqs):
    """A moe-stream (see moe-stream(5)) of 'tokens' records, as moe-tokenize writes them."""
    import struct
    import msgpack
    import zstandard
    objs = [{"format": "moe-stream", "version": 1, "kinds": ["tokens"], "provenance": []}]
    for i, s in enumerate(seqs):
        objs.append({"type": "tokens", "sample": i,
                     "ids": {"dtype": "i32", "shape": [len(s)], "data": struct.pack("<%di" % len(s), *s)}})
    objs.append({"type": "end", "records": len(seqs)})
    raw = b"".join(msgpack.packb(o, use_bin_type=True) for o in objs)
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(raw))


def dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def make_fixtures(out_dir, names):
    torch.set_num_threads(1)
    for arch in names:
        model_dir = FIXTURE_MODELS[arch]
        ad = load(model_dir)
        cfg = ad.model.config
        bos = getattr(cfg, "bos_token_id", None)
        seqs = calib_tokens(cfg.vocab_size, bos if isinstance(bos, int) else 0)
        d = os.path.join(out_dir, arch)
        os.makedirs(d, exist_ok=True)
        calib = calibrate(ad, seqs)
        unrouted = [(l, e) for l, st in calib.items() for e in range(ad.n_experts) if not st["count"][e]]
        k = ad.top_k
        ranking = rank_experts(ad, seqs, calib, k, max_length=SEARCH_MAX_LENGTH)
        l0 = search_layers(ad, seqs, calib, ranking, 0, max_length=SEARCH_MAX_LENGTH)
        lk = search_layers(ad, seqs, calib, ranking, k, max_length=SEARCH_MAX_LENGTH)
        params = {"arch": ad.arch, "model": model_dir, "dtype": "float32",
                  "moe_layers": ad.moe_layers, "n_experts": ad.n_experts, "top_k": k,
                  "search_max_length": SEARCH_MAX_LENGTH, "metric": "js",
                  "calib_max_length": None, "unrouted_experts": unrouted,
                  "generator": "tests/ref/cdmoe_reference.py fixtures"}
        dump(os.path.join(d, "tokens.json"), {"sequences": seqs})
        write_token_stream(os.path.join(d, "tokens.msgpack.zst"), seqs)
        dump(os.path.join(d, "params.json"), params)
        dump(os.path.join(d, "calib.json"), {str(l): v for l, v in calib.items()})
        dump(os.path.join(d, "ranking.json"), {str(l): v for l, v in ranking.items()})
        dump(os.path.join(d, "layers_k0.json"), l0)
        dump(os.path.join(d, "layers_k%d.json" % k), lk)
        with open(os.path.join(d, "expected.txt"), "w") as f:
            for l, r in ranking.items():
                f.write("ranking %d: %s\n" % (l, " ".join(map(str, r["experts"]))))
            f.write("plan 0: %s\n" % " ".join(map(str, l0["order"])))
            f.write("plan %d: %s\n" % (k, " ".join(map(str, lk["order"]))))
        dump(os.path.join(d, "original_json.json"),
             to_original_json(ad, calib, ranking, lk["order"]))
        gaps = [min_gap(r["candidates"]) for r in ranking.values()] + \
            [min_gap(l0["candidates"]), min_gap(lk["candidates"])]
        print("%-10s moe layers %s unrouted %s min relative gap %.2e" % (
            arch, ad.moe_layers, unrouted, min(gaps)))
        for l, r in ranking.items():
            print("   layer %d experts %s scores %s" % (l, r["experts"], ["%.4g" % s for s in r["scores"]]))
        print("   K=0 order %s\n   K=%d order %s" % (l0["order"], k, lk["order"]))
        if arch == "deepseek-l5":
            make_unrouted_fixture(ad, seqs, os.path.join(d, "unrouted"))


def make_unrouted_fixture(ad, seqs, d):
    """Calibration on 4 tokens leaves experts unrouted: rank as the original
    (an unrouted candidate makes the layer fall back to routing: score 0, it
    wins, and every later candidate falls back too) and as our tools
    (unrouted experts left out)."""
    os.makedirs(d, exist_ok=True)
    few = [seqs[0][:4]]
    calib = calibrate(ad, few)
    unrouted = [(l, e) for l, st in calib.items() for e in range(ad.n_experts) if not st["count"][e]]
    dump(os.path.join(d, "tokens.json"), {"sequences": few, "search_sequences": seqs})
    dump(os.path.join(d, "calib.json"), {str(l): v for l, v in calib.items()})
    for mode in ("original", "exclude"):
        r = rank_experts(ad, seqs, calib, ad.top_k, max_length=SEARCH_MAX_LENGTH, unrouted=mode)
        dump(os.path.join(d, "ranking_%s.json" % mode), {str(l): v for l, v in r.items()})
        print("   unrouted %s: %s" % (mode, {l: (v["experts"], ["%.3g" % x for x in v["scores"]])
                                            for l, v in r.items()}))
    print("   unrouted experts:", unrouted)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    fx = sub.add_parser("fixtures")
    fx.add_argument("--out", default="tests/fixtures/search")
    fx.add_argument("--name", action="append", help="fixture name (default: all of FIXTURE_MODELS)")
    rn = sub.add_parser("run")
    rn.add_argument("--model", required=True)
    rn.add_argument("--tokens", required=True)
    rn.add_argument("--max-experts", type=int)
    rn.add_argument("--experts", type=int, help="K for the layer search")
    rn.add_argument("--max-length", type=int, default=256)
    rn.add_argument("--metric", default="js")
    rn.add_argument("--beam", type=int, default=1)
    rn.add_argument("--unrouted", default="original", choices=["original", "exclude"])
    a = ap.parse_args()
    if a.cmd == "fixtures":
        make_fixtures(a.out, a.name or list(FIXTURE_MODELS))
        return
    ad = load(a.model)
    with open(a.tokens) as f:
        seqs = json.load(f)
    calib = calibrate(ad, seqs)
    res = {"calib": calib}
    k = a.max_experts if a.max_experts is not None else ad.top_k
    ranking = rank_experts(ad, seqs, calib, k, a.metric, max_length=a.max_length, unrouted=a.unrouted)
    res["ranking"] = ranking
    if a.experts is not None:
        res["layers"] = search_layers(ad, seqs, calib, ranking, a.experts, metric=a.metric,
                                      beam=a.beam, max_length=a.max_length, unrouted=a.unrouted)
    json.dump(res, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
