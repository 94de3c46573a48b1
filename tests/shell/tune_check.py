"""moe-tune against PyTorch's 10 AdamW steps (tests/fixtures/train/README.md, section 2).

    tune_check.py setup RUN.json MODEL_OUT    the fixture's model with its condensed layers
                                              (config.json + the checkpoint's tensors)
    tune_check.py args RUN.json               moe-tune's options for the run's spec
    tune_check.py check RUN.json LOG OUT      losses, lrs, grad norms (log) and the final
                                              trained tensors (OUT) against the fixture
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


def setup(run, out):
    src = run["model"]
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


def check(run, log, out):
    steps = [json.loads(l) for l in subprocess.run(["moe-dump", "--no-header", "--type", "step", log],
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
            assert e < 1e-4, f"step {r['step']} {key}: {s[key]!r}, PyTorch {r[key]!r} (rel {e:.2e})"
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
        assert e < 1e-4, f"{name}: relative error {e:.2e}"
    print(f"{os.path.basename(sys.argv[2])}: {len(steps)} steps, losses and grad norms within {worst:.1e}, "
          f"{len(want)} tensors within {wmax:.1e}")


def main():
    run = json.load(open(sys.argv[2]))
    if sys.argv[1] == "setup":
        setup(run, sys.argv[3])
    elif sys.argv[1] == "args":
        args(run)
    else:
        check(run, sys.argv[3], sys.argv[4])


main()
