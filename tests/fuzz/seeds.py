#!/usr/bin/env python3
"""Seed corpora for the fuzz targets (tests/fuzz/fuzz_*.c), derived from the
test fixtures and the few streams committed in tests/fuzz/seeds/.

  seeds.py OUT_DIR      writes OUT_DIR/<target>/<seed> for every target

A seed is a valid input (or a near one) that the fuzzer mutates: each target
starts from inputs that reach deep into its reader.  Targets that read a
selector byte first (see the target's comment) get it prepended here.
Standard library only."""
import glob
import json
import os
import struct
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def fixtures(pattern):
    return sorted(glob.glob(os.path.join(FIX, pattern), recursive=True))


class Out:
    def __init__(self, root, target):
        self.dir = os.path.join(root, target)
        os.makedirs(self.dir, exist_ok=True)
        self.n = 0

    def add(self, data, selector=None):
        if selector is not None:
            data = bytes([selector]) + data
        self.n += 1
        with open(os.path.join(self.dir, "seed-%03d" % self.n), "wb") as f:
            f.write(data)


def streams():
    return fixtures("**/*.msgpack.zst") + sorted(glob.glob(os.path.join(ROOT, "tests", "fuzz", "seeds", "*.msgpack.zst")))


def msgpack_of(path):
    """a stream's decompressed msgpack (the zstd command of DEB_PKGS)"""
    return subprocess.run(["zstd", "-q", "-dc", path], check=True, stdout=subprocess.PIPE).stdout


def safetensors_file(tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes per element)] -> file bytes (zero data)"""
    header, off = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, size in tensors:
        n = size
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(off)


def fixture_tensors(path):
    data = read(path)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return header


def seed_safetensors(out):
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I32": 4, "I64": 8, "U8": 1, "BOOL": 1}
    out.add(safetensors_file([("a", "F32", [2, 3], 4), ("b", "BF16", [4], 2), ("c", "F16", [1, 1, 2], 2),
                              ("d", "F64", [], 8), ("e", "I32", [0, 5], 4)], {"format": "pt"}))
    out.add(safetensors_file([(dt.lower(), dt, [3], s) for dt, s in sizes.items()]))
    out.add(safetensors_file([]))
    header = fixture_tensors(os.path.join(FIX, "search", "models", "deepseek-l5", "model.safetensors"))
    few = [(k, v["dtype"], v["shape"], sizes[v["dtype"]]) for k, v in list(header.items())[:6]]
    out.add(safetensors_file(few, {"format": "pt"}))
    out.add(read(os.path.join(FIX, "search", "models", "deepseek-l5", "model.safetensors")))


def seed_checkpoint(out):
    model = os.path.join(FIX, "search", "models", "deepseek-l5")
    out.add(read(os.path.join(model, "config.json")), 0)
    for path in fixtures("models/*-f32/config.json")[:2]:
        out.add(read(path), 0)
    names = sorted(fixture_tensors(os.path.join(model, "model.safetensors")))
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {"total_size": 0}, "weight_map": {n: shards[i % 2] for i, n in enumerate(names)}}
    out.add(json.dumps(index, indent=2).encode(), 1)
    index["weight_map"] = {n: shards[0] for n in names[: len(names) // 2]}
    out.add(json.dumps(index).encode(), 1)


def seed_cdmoe_json(out):
    for path in fixtures("search/*/original_json.json")[:3]:
        d = json.load(open(path))
        parts = [json.dumps(d[k]).encode() for k in ("dynamic_weight", "layer_idx_to_expert_idx", "layer_idx_order")]
        for sel, part in enumerate(parts):
            out.add(part, sel | (1 << 2) | (1 << 5))
        out.add(b"\0".join(parts), 3 | (2 << 2) | (1 << 5))


def seed_tasks(out):
    for name in ("tiny_task.jsonl", "tiny_schema.jsonl", "tiny_lm.jsonl"):
        out.add(read(os.path.join(FIX, "eval", name)), 0)
    out.add(read(os.path.join(FIX, "eval", "tiny_task.jsonl")), 1 | 16)
    out.add(read(os.path.join(FIX, "eval", "tiny_schema.jsonl")), 2 | (1 << 5))
    out.add(read(os.path.join(FIX, "eval", "tiny_lm.jsonl")), 3)
    formats = os.path.join(FIX, "eval", "formats")
    out.add(read(os.path.join(formats, "piqa", "valid.jsonl")) + b"\0" + read(os.path.join(formats, "piqa", "valid-labels.lst")), 4 | 8)
    out.add(read(os.path.join(formats, "winogrande", "dev.jsonl")) + b"\0" + read(os.path.join(formats, "winogrande", "dev-labels.lst")), 5 | 8)
    out.add(read(os.path.join(formats, "winogrande", "dev.jsonl")), 5)
    out.add(read(os.path.join(formats, "hellaswag", "hellaswag_tiny.txt")), 6)
    out.add(read(os.path.join(formats, "rte", "dev.tsv")), 7)


def texts():
    with open(os.path.join(FIX, "tokenizer", "texts.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def main():
    root = sys.argv[1]
    out = Out(root, "stream")
    for path in streams():
        out.add(msgpack_of(path), 0)
        out.add(read(path), 1)
    out = Out(root, "cdmoe_export")
    for path in streams():
        for sel in range(3):
            out.add(msgpack_of(path), sel)
        out.add(read(path), 128 + 2)
    seed_safetensors(Out(root, "safetensors"))
    seed_checkpoint(Out(root, "checkpoint"))
    out = Out(root, "config")
    for path in fixtures("**/config.json") + fixtures("ckpt/*.config.json"):
        out.add(read(path))
    # the baselines' keys: a dropped MLP, a dropped block (moe-condense --method)
    cfg = json.loads(read(os.path.join(FIX, "models", "qwen2_moe-f32", "config.json")))
    cfg["dropped_layers"] = {"1": "mlp", "2": "block"}
    out.add(json.dumps(cfg).encode())
    out = Out(root, "tokenizer")
    for path in fixtures("**/tokenizer.json"):
        out.add(read(path))
    out = Out(root, "encode")
    for i, t in enumerate(texts()):
        out.add(t.encode("utf-8"), i % 256)
    out = Out(root, "jsonl")
    out.add(read(os.path.join(FIX, "eval", "ppl_text.jsonl")), 0)
    out.add(read(os.path.join(FIX, "tokenizer", "texts.jsonl"))[:4096], 4 | (3 << 3))
    out.add(b"[1, 2, 3]\n\n{\"text\": [4, 5]}\n[]\n", 1)
    out.add("plain line\nsecond line caf\u00e9\r\n\n".encode(), 2)
    out.add(b"{\"t\": \"field t\"}\n", 64)
    seed_cdmoe_json(Out(root, "cdmoe_json"))
    seed_tasks(Out(root, "task"))
    out = Out(root, "tune_data")
    out.add(read(os.path.join(FIX, "eval", "ppl_text.jsonl")), 0)
    out.add(read(os.path.join(FIX, "train", "adamw_data.jsonl"))[:2048], 3 << 1)
    out.add(b'{"prompt": "a b", "response": " c"}\n{"turns": [{"role": "user", "content": "hi"}, '
            b'{"role": "assistant", "content": "ok"}]}\n', 0)
    out.add(b'{"instances": [{"text": "one two"}, {"text": "x"}]}', 2 << 1)
    for path in fixtures("**/*tokens*.msgpack.zst")[:2]:
        out.add(msgpack_of(path), 1)


if __name__ == "__main__":
    main()
