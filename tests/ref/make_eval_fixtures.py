#!/usr/bin/env python3
"""Golden outputs for moe-eval (tests/fixtures/eval/).

Builds, deterministically:
  model/            a tiny qwen2_moe checkpoint (transformers' Qwen2MoeForCausalLM, float32,
                    spread random weights) + our own byte-level BPE tokenizer.json whose
                    post-processor prepends BOS (<|endoftext|>), like DeepSeek's tokenizer;
  expected.json     computed here with PyTorch + transformers + tokenizers:
    ppl             per-sample NLL sums (shifted-label cross entropy, as CD-MoE's compute_ppl
                    with batch size 1: tokenizer with special tokens, no truncation), the
                    CD-MoE perplexity exp(mean_s NLL_s/(T_s-1)) and the token-weighted one;
    tasks           for every task file (ours: tiny_task.jsonl (MosaicML mc shape),
                    tiny_schema.jsonl, tiny_lm.jsonl, and tiny files in the original
                    PIQA / WinoGrande / HellaSwag-text / RTE formats under formats/), each
                    choice's (context, continuation) built as lm-evaluation-harness does,
                    the harness's pair encoding (_encode_pair), loglik + is_greedy, and acc,
                    acc_norm (len(choice) characters), perplexity (lm tasks).
Run from the repository root:  python3 tests/ref/make_eval_fixtures.py
Needs: torch, transformers (5.x), tokenizers, safetensors, numpy.
"""
import json
import math
import os
import re
import sys

import numpy as np
import torch

OUT = "tests/fixtures/eval"
SEED = 1234

# ------------------------------------------------------------------------------------------
# tokenizer: GPT-2 byte-level BPE with merges learned from our own text


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


CORPUS = """The quick brown fox jumps over the lazy dog. The cat sat on the mat.
Once upon a time there was a little girl who lived in a small house near the woods.
Question: What is the answer? Answer: the answer is here. She said hello to her friend.
The water is hot and the fire is hot, the ice is cold. He ate a sandwich and then he slept.
"""


def learn_merges(n_merges):
    from tokenizers import pre_tokenizers
    pt = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = {}
    for w, _ in pt.pre_tokenize_str(CORPUS):
        words[w] = words.get(w, 0) + 1
    seqs = {w: list(w) for w in words}
    merges = []
    for _ in range(n_merges):
        pairs = {}
        for w, cnt in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + cnt
        if not pairs:
            break
        best = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        merges.append(best)
        for w in seqs:
            s, out, i = seqs[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def make_tokenizer(path):
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = learn_merges(60)
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    eos_id = len(vocab)
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": eos_id, "content": "<|endoftext|>", "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [eos_id],
                                                 "tokens": ["<|endoftext|>"]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [[a, b] for a, b in merges]},
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, indent=1)
        f.write("\n")
    return eos_id + 1, eos_id


# ------------------------------------------------------------------------------------------
# model


def make_model(vocab, bos, seed):
    import transformers as tf
    cfg = tf.Qwen2MoeConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                            moe_intermediate_size=16, shared_expert_intermediate_size=16,
                            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[],
                            decoder_sparse_step=1, norm_topk_prob=False, rope_theta=10000.0,
                            max_position_embeddings=512, tie_word_embeddings=False,
                            bos_token_id=bos, eos_token_id=bos, attn_implementation="eager")
    model = tf.Qwen2MoeForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                s = 1.0 / math.sqrt(fan_in)
                if name.endswith("embed_tokens.weight"):
                    s = 1.0
                elif name.endswith("mlp.gate.weight"):
                    s = 3.0 / math.sqrt(fan_in)
                p.copy_(s * torch.randn(p.shape, generator=gen))
    return model


MIN_MARGIN = [float("inf")]


def forward(model, ids):
    """float32 logits [T, V] (feeds ids); tracks the smallest router-logit gap between
    the k-th and (k+1)-th expert (a gap near float rounding would make routing fragile)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
    K = model.config.num_experts_per_tok
    for rl in out.router_logits or []:
        if rl is None:
            continue
        p = rl.float().sort(dim=-1, descending=True).values  # router logits
        MIN_MARGIN[0] = min(MIN_MARGIN[0], float((p[:, K - 1] - p[:, K]).min()))
    return out.logits[0].float()


def score(model, ids, start):
    """sum_{t>=start} log p(ids[t] | ids[<t]) in double, and is_greedy."""
    lg = forward(model, ids[:-1]).double()
    lp = torch.log_softmax(lg, dim=-1)
    tgt = torch.tensor(ids[start:])
    rows = lp[start - 1:]
    ll = float(rows.gather(1, tgt[:, None]).sum())
    greedy = bool((lg[start - 1:].argmax(-1) == tgt).all())
    return ll, greedy


# ------------------------------------------------------------------------------------------
# the harness's request construction and pair encoding


def encode_pair(tk, bos, ctx, cont):
    if ctx == "":
        return [bos], tk.encode(cont, add_special_tokens=False).ids
    n = len(ctx) - len(ctx.rstrip())
    if n > 0:
        cont = ctx[-n:] + cont
        ctx = ctx[:-n]
    whole = tk.encode(ctx + cont, add_special_tokens=False).ids
    c = tk.encode(ctx, add_special_tokens=False).ids
    return c, whole[len(c):]


def hs_preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


MOSAIC_ANSWER = {"arc_easy", "arc_challenge", "piqa", "boolq"}


def read_task(path):
    """-> (name, kind, has_norm, items) with items = [(pairs[(ctx, cont)], choice_texts, gold)]"""
    base = os.path.basename(path)
    stem = base.split(".")[0]
    items = []
    if path.endswith(".tsv"):  # RTE (GLUE)
        lines = open(path, encoding="utf-8").read().split("\n")
        head = lines[0].split("\t")
        for ln in lines[1:]:
            if not ln:
                continue
            f = dict(zip(head, ln.split("\t")))
            ctx = f"{f['sentence1']}\nQuestion: {f['sentence2']} True or False?\nAnswer:"
            items.append(([(ctx, " True"), (ctx, " False")], ["True", "False"], int(f["label"])))
        return "rte", "mc", False, items
    if path.endswith(".txt"):  # HellaSwag, llama.cpp text format
        lines = open(path, encoding="utf-8").read().split("\n")
        while lines and lines[-1] == "":
            lines.pop()
        for i in range(0, len(lines), 6):
            ctx = hs_preprocess(lines[i])
            ends = [hs_preprocess(e) for e in lines[i + 2:i + 6]]
            items.append(([(ctx, " " + e) for e in ends], ends, int(lines[i + 1])))
        return "hellaswag", "mc", True, items
    recs = [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]
    r0 = recs[0]
    if "goal" in r0:  # PIQA original + labels
        labels = open(path[:-6] + "-labels.lst").read().split()
        for r, lab in zip(recs, labels):
            ctx = f"Question: {r['goal']}\nAnswer:"
            sols = [r["sol1"], r["sol2"]]
            items.append(([(ctx, " " + s) for s in sols], sols, int(lab)))
        return "piqa", "mc", True, items
    if "sentence" in r0:  # WinoGrande original: partial scoring
        for r in recs:
            idx = r["sentence"].index("_")
            target = r["sentence"][idx + 1:].strip()
            ctxs = [r["sentence"][:idx] + o for o in (r["option1"], r["option2"])]
            items.append(([(c, " " + target) for c in ctxs], ctxs, {"1": 0, "2": 1}[r["answer"]]))
        return "winogrande", "mc", False, items
    if "context_options" in r0:
        for r in recs:
            items.append(([(c, " " + r["continuation"]) for c in r["context_options"]],
                          r["context_options"], r["gold"]))
        return stem, "mc", False, items
    if "choices" in r0:
        delim = "\nAnswer: " if stem in MOSAIC_ANSWER else " "
        for r in recs:
            items.append(([(r["query"], delim + c) for c in r["choices"]], r["choices"], r["gold"]))
        return stem, "mc", True, items
    for r in recs:  # lm
        items.append(([(r["context"], " " + r["continuation"])], [r["continuation"]], 0))
    return stem, "lm", False, items


def run_task(model, tk, bos, path, max_len):
    name, kind, has_norm, items = read_task(path)
    out_items, acc, accn, lls_all = [], 0, 0, []
    for pairs, texts, gold in items:
        lls, gr, enc = [], [], []
        for ctx, cont in pairs:
            c, k = encode_pair(tk, bos, ctx, cont)
            if len(c) == 0:  # whitespace-only context (our documented rule)
                c, k = [bos], tk.encode(ctx + cont, add_special_tokens=False).ids
            full = (c + k)[-(max_len + 1):]
            ll, g = score(model, full, len(full) - len(k))
            lls.append(ll)
            gr.append(g)
            enc.append({"ctx_tokens": len(c), "cont_ids": k})
        lls_np = np.array(lls)
        pred = int(np.argmax(lls_np))
        pred_norm = int(np.argmax(lls_np / np.array([float(len(t)) for t in texts])))
        acc += pred == gold
        accn += pred_norm == gold
        lls_all.append(lls)
        out_items.append({"loglik": lls, "greedy": gr, "pred": pred, "pred_norm": pred_norm,
                          "gold": gold, "encodings": enc})
    n = len(items)
    res = {"task": name, "file": os.path.relpath(path, OUT), "kind": kind, "items": out_items,
           "acc": acc / n}
    if kind == "mc" and has_norm:
        res["acc_norm"] = accn / n
    if kind == "lm":
        res["acc"] = sum(it["greedy"][0] for it in out_items) / n
        res["perplexity"] = math.exp(-sum(l[0] for l in lls_all) / n)
    return res


def margins(res):
    """smallest gap between the best and second-best choice (raw and normalised)."""
    m = float("inf")
    for it in res["items"]:
        for v in (it["loglik"],):
            s = sorted(v, reverse=True)
            if len(s) > 1:
                m = min(m, s[0] - s[1])
    return m


def main():
    from tokenizers import Tokenizer
    mdir = os.path.join(OUT, "model")
    os.makedirs(mdir, exist_ok=True)
    vocab, bos = make_tokenizer(os.path.join(mdir, "tokenizer.json"))
    tk = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    # the seed (of 8) whose routing is farthest from a near-tie (top-k margin) on all inputs
    best = None
    for seed in range(SEED, SEED + 8):
        model = make_model(vocab, bos, seed)
        MIN_MARGIN[0] = float("inf")
        run_all(model, tk, bos)
        if best is None or MIN_MARGIN[0] > best[1]:
            best = (seed, MIN_MARGIN[0])
    seed = best[0]
    model = make_model(vocab, bos, seed)
    MIN_MARGIN[0] = float("inf")
    ppl, tasks = run_all(model, tk, bos)
    model.save_pretrained(mdir, safe_serialization=True)
    for extra in ["generation_config.json"]:
        if os.path.exists(os.path.join(mdir, extra)):
            os.remove(os.path.join(mdir, extra))
    mm = min(margins(t) for t in tasks)
    import transformers
    exp = {"generator": "tests/ref/make_eval_fixtures.py", "torch": torch.__version__,
           "transformers": transformers.__version__, "seed": seed,
           "router_min_margin": MIN_MARGIN[0], "choice_min_margin": mm, "ppl": ppl,
           "tasks": tasks}
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(exp, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"seed {seed}; vocab {vocab}; ppl {ppl['ppl']:.6f} (token-weighted "
          f"{ppl['ppl_token']:.6f}); router margin {MIN_MARGIN[0]:.2e}; choice margin {mm:.2e}")
    for t in tasks:
        print(t["task"], {k: t[k] for k in ("acc", "acc_norm", "perplexity") if k in t})


TASK_FILES = ["tiny_task.jsonl", "tiny_schema.jsonl", "tiny_lm.jsonl",
              "formats/piqa/valid.jsonl", "formats/winogrande/dev.jsonl",
              "formats/hellaswag/hellaswag_tiny.txt", "formats/rte/dev.tsv"]


def run_all(model, tk, bos):
    max_len = model.config.max_position_embeddings
    # perplexity, as CD-MoE's compute_ppl
    texts = []
    for l in open(os.path.join(OUT, "ppl_text.jsonl"), encoding="utf-8"):
        if l.strip():
            r = json.loads(l)
            texts.append(r["turns"][0] if "turns" in r else r["text"])
    samples = []
    for t in texts:
        ids = tk.encode(t, add_special_tokens=True).ids
        if len(ids) < 2:
            samples.append({"ids": ids, "nll": None, "tokens": 0})
            continue
        ll, _ = score(model, ids, 1)
        samples.append({"ids": ids, "nll": -ll, "tokens": len(ids) - 1})
    ok = [s for s in samples if s["nll"] is not None]
    mean_nll = sum(s["nll"] / s["tokens"] for s in ok) / len(ok)
    tok_nll = sum(s["nll"] for s in ok) / sum(s["tokens"] for s in ok)
    ppl = {"samples": samples, "n_samples": len(ok), "n_skipped": len(samples) - len(ok),
           "n_tokens": sum(s["tokens"] for s in ok), "mean_nll": mean_nll,
           "ppl": math.exp(mean_nll), "token_nll": tok_nll, "ppl_token": math.exp(tok_nll)}

    tasks = [run_task(model, tk, bos, os.path.join(OUT, f), max_len) for f in TASK_FILES]
    # the harness's left truncation: a window of 24 tokens
    win = run_task(model, tk, bos, os.path.join(OUT, "tiny_task.jsonl"), 24)
    win["max_length"] = 24
    tasks.append(win)
    # perplexity of a condensed model: layer 1 -> experts CONDENSE with fixed weights
    restore = condense(model, *CONDENSE)
    nll = []
    for s in samples:
        nll.append(None if s["nll"] is None else -score(model, s["ids"], 1)[0])
    restore()
    ok = [(n, s["tokens"]) for n, s in zip(nll, samples) if n is not None]
    mean_c = sum(n / t for n, t in ok) / len(ok)
    ppl["condensed"] = {"layer": CONDENSE[0], "experts": CONDENSE[1], "weights": CONDENSE[2],
                        "sample_nll": nll, "ppl": math.exp(mean_c),
                        "ppl_token": math.exp(sum(n for n, _ in ok) / sum(t for _, t in ok))}
    return ppl, tasks


CONDENSE = (1, [2, 0], [0.4, 0.25])


def condense(model, layer, experts, weights):
    """qwen2_moe layer's MLP -> sum_e w_e*Expert_e(x) + sigmoid(x.g)*Shared(x), no router."""
    import torch.nn.functional as F
    blk = model.model.layers[layer].mlp
    ex = blk.experts

    def fwd(hidden_states):
        shp = hidden_states.shape
        x = hidden_states.reshape(-1, shp[-1])
        y = torch.zeros_like(x)
        for e, w in zip(experts, weights):
            g, u = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
            y = y + w * F.linear(F.silu(g) * u, ex.down_proj[e])
        y = y + torch.sigmoid(blk.shared_expert_gate(x)) * blk.shared_expert(x)
        return y.reshape(shp)

    orig = blk.forward
    blk.forward = fwd
    return lambda: setattr(blk, "forward", orig)


if __name__ == "__main__":
    sys.exit(main())
