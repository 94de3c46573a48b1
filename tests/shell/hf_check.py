"""Compare a moe-eval dump with the PyTorch reference forward of the same checkpoint.

  hf_check.py tokens MODEL OUT            two token sequences for MODEL's vocabulary
  hf_check.py check MODEL DUMP [MODEL DUMP...]  reference forward in float32 (transformers, or
                                          tests/ref's DeepseekRef for deepseek), rel err < 1e-5
"""
import json
import os
import sys

import msgpack
import numpy as np
import zstandard


def main():
    cmd, model = sys.argv[1], sys.argv[2]
    cfg = json.load(open(os.path.join(model, "config.json")))
    if cmd == "tokens":
        rng = np.random.default_rng(5)
        raw = msgpack.packb({"format": "moe-stream", "version": 1, "kinds": ["tokens"], "provenance": []})
        for i, T in enumerate([9, 16]):
            ids = rng.integers(0, cfg["vocab_size"], size=T, dtype=np.int32).astype("<i4")
            raw += msgpack.packb({"type": "tokens", "index": i,
                                  "ids": {"dtype": "i32", "shape": [T], "data": ids.tobytes()}})
        raw += msgpack.packb({"type": "end", "records": 2})
        open(sys.argv[3], "wb").write(zstandard.ZstdCompressor(write_checksum=True).compress(raw))
        return
    import torch
    torch.set_num_threads(1)
    bad = 0
    for i in range(2, len(sys.argv), 2):
        bad += check(sys.argv[i], sys.argv[i + 1])
    sys.exit(1 if bad else 0)


def check(model, dump_path):
    import torch
    cfg = json.load(open(os.path.join(model, "config.json")))
    with open(dump_path, "rb") as f:
        objs = list(msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(f), raw=False))
    recs = objs[1:]
    if cfg["model_type"] == "deepseek":
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "ref"))
        from make_model_fixtures import DeepseekRef
        from safetensors.torch import load_file
        m = DeepseekRef(cfg)
        st = load_file(os.path.join(model, "model.safetensors"))
        m.w = {k: st[k].float() for k in m.w}
        fwd = lambda ids: m.forward(ids)
    else:
        import transformers as tf
        m = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32,
                                                    attn_implementation="eager").eval()

        def fwd(ids):
            with torch.no_grad():
                o = m(input_ids=ids[None], output_hidden_states=True)
            return torch.stack([h[0] for h in o.hidden_states]), o.logits[0]
    worst = 0.0
    for i in range(0, len(recs) - 1, 2):
        tok, dump = recs[i], recs[i + 1]
        ids = torch.from_numpy(np.frombuffer(tok["ids"]["data"], dtype="<i4").astype(np.int64))
        hs, lg = fwd(ids)
        for key, ref in [("hidden", hs), ("logits", lg)]:
            got = np.frombuffer(dump[key]["data"], dtype="<f4").reshape(dump[key]["shape"])
            ref = ref.float().numpy()
            e = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            worst = max(worst, e)
    print(f"{cfg['model_type']}: worst rel err {worst:.2e}")
    if worst >= 1e-5:
        print(f"FAIL: {model}: relative error {worst} >= 1e-5")
        return 1
    return 0


main()
