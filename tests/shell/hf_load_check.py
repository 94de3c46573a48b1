"""Helpers for test_hf_load.sh: condensed checkpoints loaded by transformers.

  hf_load_check.py plan FIXDIR OUTDIR
      write the original CD-MoE JSON plan files (w.json, e.json, o.json) for
      FIXDIR's model into OUTDIR: every MoE layer ranks its experts 5, 2, 7, ...
      with distinct mean weights; the layer order is the MoE layers reversed.
  hf_load_check.py check CKPT DUMP [CKPT DUMP...]
      for each pair (one process: torch loads once), load CKPT with AutoModelForCausalLM.from_pretrained(trust_remote_code=True)
      in float32, run every tokens record of DUMP (moe-eval --dump logits) and
      compare the logits: relative L2 error of each sequence at most 1e-5.
      Prints the worst error.
Exit status 77 when torch or transformers is missing (the test skips).
"""
import json
import os
import sys


def moe_layers(cfg):
    n = cfg["num_hidden_layers"]
    if cfg["model_type"] == "deepseek":
        return [l for l in range(n) if l >= cfg.get("first_k_dense_replace", 0)
                and l % cfg.get("moe_layer_freq", 1) == 0]
    skip = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step") or 1
    return [l for l in range(n) if l not in skip and (l + 1) % step == 0]


def plan(fix, out):
    cfg = json.load(open(os.path.join(fix, "config.json")))
    E = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts")
    order = [(5 + 3 * i) % E for i in range(E)]      # 5, 0, 3, 6... for E = 8: distinct
    assert len(set(order)) == E, order
    n_moe = len(moe_layers(cfg))
    weights = {"%d-%d" % (L, e): [1.0, 1, round(0.05 + 0.9 * (e + 1) / (E + 2) + 0.01 * L, 4)]
               for L in range(n_moe) for e in range(E)}
    json.dump(weights, open(os.path.join(out, "w.json"), "w"))
    json.dump({str(L): order for L in range(n_moe)}, open(os.path.join(out, "e.json"), "w"))
    json.dump(list(reversed(range(n_moe))), open(os.path.join(out, "o.json"), "w"))


def read_stream(path):
    import msgpack
    import zstandard
    with open(path, "rb") as f:
        objs = list(msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(f), raw=False))
    return objs[1:]


def check(*pairs):
    for ckpt, dump in zip(pairs[::2], pairs[1::2]):
        check_one(ckpt, dump)


def check_one(ckpt, dump):
    import numpy as np
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print("hf_load_check: %s" % e, file=sys.stderr)
        sys.exit(77)
    torch.manual_seed(0)
    model, info = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    # every tensor on disk is used and every parameter comes from the disk
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if bad or info.get("error_msgs"):
        sys.exit("%s: loading: %s" % (ckpt, info))
    if type(model).__module__.startswith("transformers."):
        sys.exit("%s: loaded transformers' own %s, not modeling_cdmoe" % (ckpt, type(model).__name__))
    model.eval()
    recs = read_stream(dump)
    tokens = [r for r in recs if r.get("type") == "tokens"]
    dumps = [r for r in recs if r.get("type") == "dump"]
    assert tokens and len(tokens) == len(dumps), (len(tokens), len(dumps))
    worst = 0.0
    for tok, d in zip(tokens, dumps):
        ids = np.frombuffer(tok["ids"]["data"], dtype="<i4").astype("int64")
        want = np.frombuffer(d["logits"]["data"], dtype="<f4").reshape(d["logits"]["shape"])
        with torch.no_grad():
            got = model(torch.from_numpy(ids)[None]).logits[0].float().numpy()
        assert got.shape == want.shape, (got.shape, want.shape)
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        worst = max(worst, err)
    print("%s: %d sequences, worst relative error %.2e" % (ckpt, len(tokens), worst))
    if not worst <= 1e-5:
        sys.exit("%s: logits differ from moe-eval's: relative error %.2e > 1e-5" % (ckpt, worst))


if __name__ == "__main__":
    {"plan": plan, "check": check}[sys.argv[1]](*sys.argv[2:])
