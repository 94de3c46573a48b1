"""Load a moe-init checkpoint with transformers and check it is exactly what
the files hold: no missing/unexpected keys, every parameter equal to the
safetensors tensor, a forward pass that runs, and a tokenizer that loads and
round-trips arbitrary bytes.  Usage: init_hf_check.py DIR [DIR...]"""
import json
import sys
import warnings

import torch
from safetensors.torch import load_file
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from tokenizers import Tokenizer

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")


def files_state(d):
    import os
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        wm = json.load(open(idx))["weight_map"]
        sd = {}
        for shard in sorted(set(wm.values())):
            sd.update(load_file(os.path.join(d, shard)))
        assert set(sd) == set(wm), "index weight_map does not match the shards"
        return sd
    return load_file(os.path.join(d, "model.safetensors"))


def check(d):
    cfg = json.load(open(d + "/config.json"))
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True, dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs" or (k == "error_msgs" and v)}
    if bad:
        raise SystemExit(f"{d}: loading info not clean: {bad}")
    mc = model.config
    for k, v in cfg.items():
        if k in ("torch_dtype", "dtype", "architectures", "rope_scaling", "rope_theta") or v is None:
            continue
        if isinstance(v, (int, float, bool, str, list)) and hasattr(mc, k):
            if getattr(mc, k) != v:
                raise SystemExit(f"{d}: config {k}: transformers has {getattr(mc, k)!r}, file {v!r}")
    theta = getattr(mc, "rope_theta", None) or (getattr(mc, "rope_parameters", None) or {}).get("rope_theta")
    if float(theta) != float(cfg["rope_theta"]):
        raise SystemExit(f"{d}: rope_theta {theta} != {cfg['rope_theta']}")
    sd = files_state(d)
    msd = model.state_dict()
    # transformers 5 may fuse experts in memory: compare through the per-expert view
    n = 0
    for name, t in sd.items():
        if name in msd:
            if not torch.equal(msd[name].float(), t.float()):
                raise SystemExit(f"{d}: {name} differs after loading")
            n += 1
    # reverse check: every model parameter must come from the files (fused ones via save round-trip)
    import tempfile, os
    with tempfile.TemporaryDirectory() as td:
        model.save_pretrained(td)
        sd2 = files_state(td)
        if set(sd2) != set(sd):
            raise SystemExit(f"{d}: save_pretrained round-trip names differ: "
                             f"{sorted(set(sd2) ^ set(sd))[:5]}")
        for k in sd:
            if not torch.equal(sd2[k].float(), sd[k].float()):
                raise SystemExit(f"{d}: {k} differs after load + save_pretrained")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape == (1, 8, cfg["vocab_size"]), out.logits.shape
    assert torch.isfinite(out.logits).all()
    tok = Tokenizer.from_file(d + "/tokenizer.json")
    data = bytes(range(256)) + "héllo wörld, the model\n\n  expert".encode()
    text = data.decode("latin-1")
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text, "tokenizer round-trip failed"
    utf = "The expert layer — ünïcödé 文字 🙂\n\tend"
    assert tok.decode(tok.encode(utf).ids) == utf
    assert max(enc.ids) < cfg["vocab_size"]
    at = AutoTokenizer.from_pretrained(d)
    assert at.decode(at(utf)["input_ids"]) == utf
    assert at.eos_token_id == cfg["eos_token_id"], (at.eos_token_id, cfg["eos_token_id"])
    print(f"{d}: {cfg['model_type']} ok ({n} tensors compared, loaded by transformers {transformers.__version__})")


for d in sys.argv[1:]:
    check(d)
