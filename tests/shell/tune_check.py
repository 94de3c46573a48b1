"""moe-tune against PyTorch's 10 AdamW steps (tests/fixtures/train/README.md, section 2).

    tune_check.py setup RUN.json MODEL_OUT [SRC]  the fixture's model (or SRC, e.g. its bf16
                                              twin) with its condensed layers
                                              (config.json + the checkpoint's tensors)
    tune_check.py args RUN.json               moe-tune's options for the run's spec
    tune_check.py check RUN.json LOG OUT [TOL]  losses, lrs, grad norms (log) and the final
                                              trained tensors (OUT) against the fixture,
                                              within TOL relative (default 1e-4)
    tune_check.py compare OUT_A OUT_B TOL     two runs (--save-state): the logs' losses and
                                              grad norms, the float32 masters, within TOL
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

DTYPES = {"F32": np.float32, "BF16": None, "F64": np.float64}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        if t["dtype"] == "BF16":
            raw = np.frombuffer(data[a:b], dtype="<u2").astype(np.uint32) << 16
            arr = raw.view(np.float32)
        else:
            arr = np.frombuffer(data[a:b], dtype=DTYPES[t["dtype"]])
        out[name] = arr.reshape(t["shape"]).astype(np.float64)
    return out


def setup(run, out, src):
    os.makedirs(out)
    shutil.copy(os.path.join(src, "model.safetensors"), out)
    cfg = json.load(open(os.path.join(src, "config.json")))
    if run["case"] == "condensed":
        cfg["condensed_layers"] = run["condensed_layers"]
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)


def args(run):
    s = run["spec"]
    a = ["--steps", s["steps"], "--batch", s["batch"], "--accum", s["accum"], "--max-length", s["max_length"],
         "--lr", s["lr"], "--min-lr", s["min_lr"], "--warmup", s["warmup"], "--clip", s["max_grad_norm"],
         "--weight-decay", s["weight_decay"], "--no-shuffle"]
    if run["case"] == "all":
        a += ["--train", "all"]
    if run["train_weights"]:
        a += ["--train-weights"]
    print(" ".join(str(x) for x in a))


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def check(run, log, out, tol):
    steps = log_steps(os.path.dirname(log) or ".") if os.path.basename(log) == "tune.msgpack.zst" else \
        [json.loads(l) for l in subprocess.run(["moe-dump", "--no-header", "--type", "step", log],
                                               capture_output=True, text=True, check=True).stdout.splitlines()]
    ref = run["steps"]
    assert len(steps) == len(ref), (len(steps), len(ref))
    worst = 0.0
    for s, r in zip(steps, ref):
        assert s["tokens"] == r["ntokens"], (s, r)
        assert rel(s["lr"], r["lr"]) < 1e-9, (s, r)
        for key in ("loss", "grad_norm"):
            e = rel(s[key], r[key])
            worst = max(worst, e)
            assert e < tol, f"step {r['step']} {key}: {s[key]!r}, PyTorch {r[key]!r} (rel {e:.2e})"
    want = read_safetensors(os.path.splitext(sys.argv[2])[0] + ".safetensors")
    have = read_safetensors(os.path.join(out, "model.safetensors"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    wmax = 0.0
    for name, w in want.items():
        if name.startswith("condensed_layers."):
            layer = name.split(".")[1]
            h = np.array(cfg["condensed_layers"][layer]["weights"], dtype=np.float64)
        else:
            h = have[name]
        e = np.linalg.norm(h - w) / np.linalg.norm(w)
        wmax = max(wmax, e)
        assert e < tol, f"{name}: relative error {e:.2e}"
    print(f"{os.path.basename(sys.argv[2])}: {len(steps)} steps, losses and grad norms within {worst:.1e}, "
          f"{len(want)} tensors within {wmax:.1e}")


def log_steps(out):
    return [json.loads(l) for l in subprocess.run(
        ["moe-dump", "--no-header", "--type", "step", os.path.join(out, "tune.msgpack.zst")],
        capture_output=True, text=True, check=True).stdout.splitlines()]


def compare(a, b, tol):
    sa, sb = log_steps(a), log_steps(b)
    assert len(sa) == len(sb) and sa, (len(sa), len(sb))
    for x, y in zip(sa, sb):
        for key in ("loss", "grad_norm"):
            assert rel(x[key], y[key]) < tol, f"step {x['step']} {key}: {x[key]!r} vs {y[key]!r}"
    ma = read_safetensors(os.path.join(a, "tune-state.safetensors"))
    mb = read_safetensors(os.path.join(b, "tune-state.safetensors"))
    worst = 0.0
    for name, w in ma.items():
        if name.endswith(".master"):
            e = np.linalg.norm(mb[name] - w) / np.linalg.norm(w)
            worst = max(worst, e)
            assert e < tol, f"{name}: relative error {e:.2e}"
    print(f"{len(sa)} steps, masters within {worst:.1e}")


def main():
    if sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return
    run = json.load(open(sys.argv[2]))
    if sys.argv[1] == "setup":
        setup(run, sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else run["model"])
    elif sys.argv[1] == "args":
        args(run)
    else:
        check(run, sys.argv[3], sys.argv[4], float(sys.argv[5]) if len(sys.argv) > 5 else 1e-4)


main()
