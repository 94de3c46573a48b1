"""PyTorch CPU peer for bench/forward.sh: Hugging Face forward of the same checkpoint.

    forward_torch.py ids MODEL NSEQ T OUT.i32     write deterministic random token ids
    forward_torch.py run MODEL NSEQ T IDS.i32 [float32|bfloat16]
                                                  time model(ids) (all cores; default float32;
                                                  bfloat16: weights and activations, as users run it)
"""
import os
import sys
import time

import numpy as np


def main():
    cmd, model, nseq, T = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    import json
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    if cmd == "ids":
        rng = np.random.default_rng(1234)
        rng.integers(0, vocab, size=nseq * T, dtype=np.int32).astype("<i4").tofile(sys.argv[5])
        return
    import torch
    import transformers as tf
    torch.set_num_threads(os.cpu_count())
    ids = torch.from_numpy(np.fromfile(sys.argv[5], dtype="<i4").astype(np.int64)).view(nseq, T)
    t = time.time()
    dtype = getattr(torch, sys.argv[6] if len(sys.argv) > 6 else "float32")
    m = tf.AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    load = time.time() - t
    best = None
    with torch.no_grad():
        for _ in range(4):  # the first call warms up; best of the rest (shared machine)
            t = time.time()
            out = m(input_ids=ids)
            dt = time.time() - t
            best = dt if best is None else min(best, dt)
    print(f"torch_load_s={load:.3f}\ntorch_total_s={best:.3f}\ntorch_tok_per_s={nseq * T / best:.1f}"
          f"\ntorch_dtype={dtype}\ntorch_logit0={float(out.logits[0, 0, 0]):.6g}\ntorch_threads={torch.get_num_threads()}"
          f"\ntorch_experts_impl={getattr(m.config, '_experts_implementation', 'n/a')}")


main()
