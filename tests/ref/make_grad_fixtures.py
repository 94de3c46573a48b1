#!/usr/bin/env python3
"""Gradient and AdamW fixtures for moe-tune / lib/train.h (issue 12), from PyTorch autograd.

    $CDMOE_REF_PYTHON tests/ref/make_grad_fixtures.py [OUTDIR [grad|dropped|adamw|verify|f32-check]]
        (default tests/fixtures/train, both kinds; dropped: only the dropped-layer gradient
        fixtures, on the batch of the existing ones; verify: recompute every fixture and compare,
        exit 1 on a difference (tests/shell/test_train_fixtures.sh); f32-check: how far the same
        computation in float32 lands from the fixtures)

Reads the tiny float32 models of tests/fixtures/models/<arch>-f32 and writes, for each of the five
architectures, OUTDIR/grad_<arch>_condensed.{json,safetensors} and grad_<arch>_all.{json,...}
(gradients of one batch; deepseek and qwen2_moe also grad_<arch>_dropped: a LayerDrop and a
BlockDrop layer, every remaining weight trained), and the 10-step AdamW runs OUTDIR/adamw_<run>.{json,safetensors} on
OUTDIR/adamw_data.jsonl.  OUTDIR/README.md says what each holds and what moe-tune must reproduce.
Computed in float64 from the float32 checkpoints (transformers keeps a few casts to float32:
router softmax, the loss's logits) and stored in float32: an AdamW run in float32 drifts up to
5e-5 from it on tensors whose gradients are mostly rounding noise (qwen2_moe's k_proj.bias),
half the 1e-4 budget, so the fixture is the float64 answer, not one float32 rounding of it.
Deterministic (fixed seeds, CPU, one thread); the models are tests/ref/train_ref.py's.
"""
import json
import math
import os
import re
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_ref as tr  # noqa: E402

torch.set_num_threads(1)
try:
    import transformers
    transformers.utils.logging.disable_progress_bar()
except ImportError:
    pass
torch.use_deterministic_algorithms(True)

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "train")
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
VOCAB = 256

# condensed layers: deepseek and qwen2_moe those of their condensed.json (the forward fixtures);
# the others chosen here so that a routed (frozen) layer sits above or between condensed ones
OWN_CONDENSED = {
    "qwen3_moe": {"0": {"experts": [3, 0, 6], "weights": [0.5, 0.3, 0.2]},
                  "2": {"experts": [4, 1], "weights": [0.6, 0.45]}},
    "olmoe": {"1": {"experts": [5, 2], "weights": [0.55, 0.35]}},
    "mixtral": {"0": {"experts": [1, 3], "weights": [0.6, 0.4]},
                "1": {"experts": [2], "weights": [1.0]}},
}
# dropped layers (the baselines' checkpoints, every weight trained, no aux): a BlockDrop layer
# and a LayerDrop layer under a kept one, so that gradients cross both on their way down
DROPPED = {"deepseek": {"block": [0], "mlp": [1]}, "qwen2_moe": {"block": [0], "mlp": [1]}}
GRAD_LENS = [9, 14, 6]
GRAD_AUX_COEF = 0.1     # train-all gradient fixtures: large enough that aux shapes the router grads
MIN_MARGIN = 5e-4       # smallest top-k routing gap accepted (float noise must not flip a choice)

ADAMW = dict(steps=10, batch=2, accum=2, max_length=16, lr=1e-3, min_lr=1e-4, warmup=3,
             beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, max_grad_norm=1.0)
ADAMW_SEED = 700
ADAMW_MIN_MARGIN = 1e-4
ADAMW_RUNS = [(a, "condensed", False) for a in tr.ARCHS] + [("deepseek", "condensed", True),
                                                             ("qwen2_moe", "all", False)]


def model_dir(arch):
    return os.path.join(MODELS, arch + "-f32")


def condensed_table(arch):
    if arch in OWN_CONDENSED:
        return OWN_CONDENSED[arch]
    with open(os.path.join(model_dir(arch), "condensed.json")) as f:
        c = json.load(f)
    return {str(c["layer"]): {"experts": c["experts"], "weights": c["weights"]}}


def check_condensed_forward(arch, model):
    """our condensed layer against the engine-checked forward fixtures (seq*_condensed_logits)"""
    path = model_dir(arch)
    for s in range(3):
        ref = os.path.join(path, "seq%d_condensed_logits.npy" % s)
        if not os.path.exists(ref):
            return
        ids = np.load(os.path.join(path, "seq%d_ids.npy" % s)).tolist()
        with torch.no_grad():
            _, logits, _, _ = tr.batch_logits(model, [ids])
        want = torch.from_numpy(np.load(ref)).to(logits.dtype)
        err = float((logits[0, :len(ids)] - want).norm() / want.norm())
        if err > 1e-5:
            raise RuntimeError("%s: condensed forward off the fixture by %.2e" % (arch, err))


def setup(arch, case, train_weights=True, dtype=torch.float64):
    """(model, views, trained names) for case condensed / all / dropped"""
    path = model_dir(arch)
    _, model = tr.load_model(path, dtype)
    if case == "condensed":
        tr.condense(arch, model, condensed_table(arch))
        check_condensed_forward(arch, model)
    if case == "dropped":
        tr.drop(model, DROPPED[arch])
    views = tr.hub_views(arch, model, path)
    if case == "dropped":
        views = tr.drop_views(views, DROPPED[arch])
    if case == "condensed":
        trained = tr.condensed_trainable(views)
        if not train_weights:
            trained = [n for n in trained if not n.startswith("condensed_layers.")]
    else:
        trained = sorted(views)
    tr.set_trainable(model, views, trained)
    return model, views, trained


# ---- gradient fixtures -----------------------------------------------------------------------

def grad_labels(s, ids):
    """HF labels: sequence 0 all tokens, 1 a 5-token prompt masked, 2 one label masked"""
    lab = list(ids)
    if s == 1:
        lab[:5] = [-100] * 5
    if s == 2:
        lab[3] = -100
    return lab


def grad_batch(seed):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in GRAD_LENS]
    labels = [grad_labels(s, ids) for s, ids in enumerate(seqs)]
    return seqs, labels, [tr.shifted_targets(l) for l in labels]


def grad_case(arch, case, seqs, labels, targets, dtype=torch.float64):
    model, views, trained = setup(arch, case, dtype=dtype)
    cfg = tr.load_config(model_dir(arch))
    N = sum(1 for tg in targets for t in tg if t >= 0)
    coef = GRAD_AUX_COEF if case == "all" else 0.0
    loss, ce, aux, x0s, margins = tr.batch_loss(model, seqs, targets, 1.0 / N, coef)
    margin = min(margins)
    loss.backward()
    g = tr.grads(views, trained)
    for s, x0 in enumerate(x0s):
        g["input_grad.%d" % s] = x0().detach().contiguous().clone()
    if arch != "deepseek":
        check_hf_loss(model, seqs, labels, coef, float(loss.detach()))
        check_padding(arch, model, seqs)
    rec = {"model": "tests/fixtures/models/%s-f32" % arch, "arch": arch, "case": case,
           "sequences": [{"ids": ids, "labels": lab, "targets": tg}
                         for ids, lab, tg in zip(seqs, labels, targets)],
           "ntokens": N, "ce_sum": ce, "ce": ce / N, "loss": float(loss.detach()),
           "dscale": 1.0 / N, "min_router_margin": margin, "trained": trained}
    if case == "condensed":
        rec["condensed_layers"] = condensed_table(arch)
    elif case == "dropped":
        rec["dropped_layers"] = DROPPED[arch]
    else:
        rec.update(aux=aux, aux_coef=coef, aux_scale=coef, config_aux_coef=tr.aux_coef_of(cfg))
    return rec, g


def check_padding(arch, model, seqs):
    """the right-padded batch computes each sequence's real tokens as that sequence alone would"""
    with torch.no_grad():
        _, batch, _, _ = tr.batch_logits(model, seqs)
        for b, ids in enumerate(seqs):
            _, alone, _, _ = tr.batch_logits(model, [ids])
            err = float((batch[b, :len(ids)] - alone[0]).norm() / alone[0].norm())
            if err > 1e-6:
                raise RuntimeError("%s: padding changes sequence %d's logits by %.2e" % (arch, b, err))


def check_hf_loss(model, seqs, labels, coef, loss):
    """our loss against the one transformers' CausalLM returns for the same padded batch"""
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.zeros(B, T, dtype=torch.long)
    lab = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (s, l) in enumerate(zip(seqs, labels)):
        ids[b, :len(s)], lab[b, :len(s)], mask[b, :len(s)] = torch.tensor(s), torch.tensor(l), 1
    saved = model.router_aux_loss_coef
    model.router_aux_loss_coef = coef
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=lab, output_router_logits=coef > 0)
    model.router_aux_loss_coef = saved
    if abs(float(out.loss) - loss) > 1e-5 * abs(loss):
        raise RuntimeError("HF loss %.9g, ours %.9g" % (float(out.loss), loss))


def grad_cases(arch):
    return ("condensed", "all") + (("dropped",) if arch in DROPPED else ())


def make_grad_fixtures():
    summary = []
    for arch in tr.ARCHS:
        best = None
        for attempt in range(60):   # first batch whose routing margins are comfortable
            seqs, labels, targets = grad_batch(900 + attempt)
            recs = [grad_case(arch, case, seqs, labels, targets) for case in ("condensed", "all")]
            margin = min(r["min_router_margin"] for r, _ in recs)
            if best is None or margin > best[0]:
                best = (margin, recs)
            if margin >= MIN_MARGIN:
                break
        if arch in DROPPED:  # the same batch (its margin reported)
            seqs, labels, targets = ([q[k] for q in best[1][0][0]["sequences"]]
                                     for k in ("ids", "labels", "targets"))
            best[1].append(grad_case(arch, "dropped", seqs, labels, targets))
        for rec, g in best[1]:
            name = "grad_%s_%s" % (arch, rec["case"])
            save_file(as_f32(g), os.path.join(OUT, name + ".safetensors"), metadata={"format": "pt"})
            write_json(os.path.join(OUT, name + ".json"), rec)
            summary.append("%s: loss %.6f, %d trained tensors, min router margin %.2e"
                           % (name, rec["loss"], len(rec["trained"]), rec["min_router_margin"]))
            print(summary[-1], file=sys.stderr)
    return summary


def make_dropped_fixtures():
    summary = []
    for arch in DROPPED:
        with open(os.path.join(OUT, "grad_%s_all.json" % arch)) as f:
            want = json.load(f)
        seqs, labels, targets = ([q[k] for q in want["sequences"]] for k in ("ids", "labels", "targets"))
        rec, g = grad_case(arch, "dropped", seqs, labels, targets)
        name = "grad_%s_dropped" % arch
        save_file(as_f32(g), os.path.join(OUT, name + ".safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(OUT, name + ".json"), rec)
        summary.append("%s: loss %.6f, %d trained tensors, min router margin %.2e"
                       % (name, rec["loss"], len(rec["trained"]), rec["min_router_margin"]))
    return summary


# ---- AdamW reference -------------------------------------------------------------------------

def random_sequence(g):
    """a token sequence of 5..24 tokens (those over max_length are cut to their first tokens)"""
    n = int(torch.randint(5, 25, (1,), generator=g))
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def adamw_run(arch, case, train_weights, data, dtype=torch.float64):
    model, views, trained = setup(arch, case, train_weights, dtype)
    cfg = tr.load_config(model_dir(arch))
    coef = tr.aux_coef_of(cfg) if case == "all" else 0.0
    params = unique_params(views, trained)
    opt = tr.make_adamw(params, ADAMW)
    B, A, L = ADAMW["batch"], ADAMW["accum"], ADAMW["max_length"]
    seqs = [s[:L] for s in data]
    steps, margins = [], [float("inf")] * len(seqs)
    for k in range(ADAMW["steps"]):
        first = [(k * A + a) * B for a in range(A)]
        rec, m = tr.adamw_step(model, params, opt, [seqs[i:i + B] for i in first], ADAMW, k, coef)
        if case != "all":
            del rec["aux_mean"]
        steps.append(rec)
        for i, mb in zip(first, m):
            for j, mj in enumerate(mb):
                margins[i + j] = min(margins[i + j], mj)
    final = tr.values(views, trained)
    no_decay_names = [n for n in trained if views[n][0].dim() < 2]
    return steps, final, margins, no_decay_names, coef


def unique_params(views, names):
    seen, out = set(), []
    for n in names:
        p = views[n][0]
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def make_adamw_fixtures():
    """data whose routing stays comfortable in every run, at every step: a sequence with a small
    top-k margin anywhere is replaced by a fresh one, and the runs repeated"""
    summary = []
    g = torch.Generator().manual_seed(ADAMW_SEED)
    data = [random_sequence(g) for _ in range(ADAMW["steps"] * ADAMW["batch"] * ADAMW["accum"])]
    for attempt in range(40):
        runs = [(a, c, w) + adamw_run(a, c, w, data) for a, c, w in ADAMW_RUNS]
        bad = [i for i in range(len(data)) if min(r[5][i] for r in runs) < ADAMW_MIN_MARGIN]
        print("adamw data attempt %d: %d sequences with a small routing margin" % (attempt, len(bad)),
              file=sys.stderr)
        if not bad:
            break
        for i in bad:
            data[i] = random_sequence(g)
    else:
        raise RuntimeError("no AdamW data with comfortable routing margins")
    with open(os.path.join(OUT, "adamw_data.jsonl"), "w") as f:
        for s in data:
            f.write(json.dumps({"ids": s}) + "\n")
    for arch, case, tw, steps, final, margins, no_decay, coef in runs:
        margin = min(margins)
        name = "adamw_%s_%s%s" % (arch, case, "_weights" if tw else "")
        rec = {"model": "tests/fixtures/models/%s-f32" % arch, "arch": arch, "case": case,
               "train_weights": tw, "data": "adamw_data.jsonl", "spec": ADAMW,
               "aux_coef": coef, "min_router_margin": margin, "trained": sorted(final),
               "no_weight_decay": no_decay, "steps": steps}
        if case == "condensed":
            rec["condensed_layers"] = condensed_table(arch)
        save_file(as_f32(final), os.path.join(OUT, name + ".safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(OUT, name + ".json"), rec)
        summary.append("%s: loss %.5f -> %.5f, grad norm %.3f -> %.3f, clipped %d/10, margin %.2e"
                       % (name, steps[0]["loss"], steps[-1]["loss"], steps[0]["grad_norm"],
                          steps[-1]["grad_norm"], sum(s["clipped"] for s in steps), margin))
        print(summary[-1], file=sys.stderr)
    return summary


def recomputed(dtype):
    """every fixture in OUT recomputed: (name, its JSON, its tensors, the recomputed JSON record
    (AdamW: steps flattened to "step<k>.<key>", the same done to the file's), the recomputed
    tensors, the keys to compare)"""
    from safetensors.torch import load_file
    for arch in tr.ARCHS:
        for case in grad_cases(arch):
            name = "grad_%s_%s" % (arch, case)
            with open(os.path.join(OUT, name + ".json")) as f:
                want = json.load(f)
            seqs, labels, targets = ([q[k] for q in want["sequences"]] for k in ("ids", "labels", "targets"))
            got, g = grad_case(arch, case, seqs, labels, targets, dtype)
            got["targets_shifted"] = targets == [tr.shifted_targets(l) for l in labels]
            want["targets_shifted"] = True
            yield (name, want, load_file(os.path.join(OUT, name + ".safetensors")), got, g,
                   ["loss", "ntokens", "trained", "targets_shifted"] + (["aux"] if case == "all" else []))
    with open(os.path.join(OUT, "adamw_data.jsonl")) as f:
        data = [json.loads(line)["ids"] for line in f]
    for arch, case, tw in ADAMW_RUNS:
        name = "adamw_%s_%s%s" % (arch, case, "_weights" if tw else "")
        with open(os.path.join(OUT, name + ".json")) as f:
            want = json.load(f)
        steps, final, _, _, _ = adamw_run(arch, case, tw, data, dtype)
        got = {"spec": ADAMW, "trained": sorted(final)}
        for i, st in enumerate(steps):
            for k, v in st.items():
                got["step%d.%s" % (i + 1, k)] = v
                want["step%d.%s" % (i + 1, k)] = want["steps"][i][k] if i < len(want["steps"]) else None
        yield name, want, load_file(os.path.join(OUT, name + ".safetensors")), got, final, sorted(got)


def verify():
    """recompute every fixture (float64, as written) and compare with the files: the JSON values
    within 1e-9 relative, the tensors within 1e-6 (float32 storage; another torch version may
    round differently).  Returns the differences found."""
    bad = []
    for name, want, want_t, got, got_t, keys in recomputed(torch.float64):
        for k in keys:
            a, b = got[k], want[k]
            if a != b and not (isinstance(a, float) and abs(a - b) <= 1e-9 * max(abs(b), 1e-30)):
                bad.append("%s: %s is %r, recomputed %r" % (name, k, b, a))
        if sorted(want_t) != sorted(got_t):
            bad.append("%s: tensors %s, recomputed %s" % (name, sorted(want_t), sorted(got_t)))
            continue
        bad += ["%s: %s differs by %.1e" % (name, k, rel_err(got_t[k], want_t[k]))
                for k in want_t if rel_err(got_t[k], want_t[k]) > 1e-6]
    return bad


def as_f32(tensors):
    return {k: v.float().contiguous() for k, v in tensors.items()}


def f32_check():
    """the same computations in float32 against the fixtures: what float32 rounding alone costs"""
    lines = []
    for name, want, want_t, got, got_t, keys in recomputed(torch.float32):
        losses = [k for k in keys if k == "loss" or k.endswith(".loss")]
        loss = max(abs(got[k] - want[k]) / abs(want[k]) for k in losses)
        worst = max((rel_err(got_t[k], want_t[k]), k) for k in want_t)
        lines.append("%s: worst loss rel err %.1e, worst tensor rel err %.1e (%s)" % (name, loss, *worst))
    return lines


def rel_err(a, ref):
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def write_json(path, obj):
    """indented, with lists of numbers on one line"""
    text = json.dumps(obj, indent=1, sort_keys=True)
    text = re.sub(r"\[[-0-9.e,\s]*\]", lambda m: re.sub(r"\s+", " ", m.group(0))
                  .replace("[ ", "[").replace(" ]", "]"), text)
    with open(path, "w") as f:
        f.write(text + "\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    what = sys.argv[2] if len(sys.argv) > 2 else "all"
    if what not in ("all", "grad", "dropped", "adamw", "verify", "f32-check"):
        sys.exit("usage: make_grad_fixtures.py [OUTDIR [grad|dropped|adamw|verify|f32-check]]")
    lines = []
    if what in ("all", "grad"):
        lines += make_grad_fixtures()
    if what == "dropped":  # only the dropped cases, on the batch of the existing grad fixtures
        lines += make_dropped_fixtures()
    if what in ("all", "adamw"):
        lines += make_adamw_fixtures()
    if what == "f32-check":
        lines += f32_check()
    if what == "verify":
        bad = verify()
        print("\n".join(bad) if bad else "every training fixture recomputed within tolerance")
        sys.exit(1 if bad else 0)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
