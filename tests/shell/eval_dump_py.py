"""Helpers for test_eval_dump.sh (stock msgpack + zstandard, as moe-stream(5) shows).

  eval_dump_py.py tokens FIXDIR OUT [KIND]   token stream from FIXDIR/seq*_ids.npy
  eval_dump_py.py check FIXDIR DUMP          compare dump records with the goldens
"""
import glob
import os
import sys

import msgpack
import numpy as np
import zstandard


def write(path, kinds, records):
    raw = msgpack.packb({"format": "moe-stream", "version": 1, "kinds": kinds, "provenance": []})
    for r in records:
        raw += msgpack.packb(r)
    raw += msgpack.packb({"type": "end", "records": len(records)})
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor(write_checksum=True).compress(raw))


def read(path):
    with open(path, "rb") as f:
        objs = list(msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(f), raw=False))
    return objs[0], objs[1:]


def arr(t):
    dt = {"f32": "<f4", "i32": "<i4"}[t["dtype"]]
    return np.frombuffer(t["data"], dtype=dt).reshape(t["shape"])


def main():
    cmd, fix = sys.argv[1], sys.argv[2]
    n = len(glob.glob(os.path.join(fix, "seq*_ids.npy")))
    if cmd == "tokens":
        kinds = [sys.argv[4]] if len(sys.argv) > 4 else ["tokens"]
        recs = []
        for s in range(n):
            ids = np.load(os.path.join(fix, f"seq{s}_ids.npy")).astype("<i4")
            recs.append({"type": "tokens", "index": s,
                         "ids": {"dtype": "i32", "shape": [len(ids)], "data": ids.tobytes()}})
        write(sys.argv[3], kinds, recs)
        return
    hdr, recs = read(sys.argv[3])
    assert "dump" in hdr["kinds"] and "tokens" in hdr["kinds"], hdr["kinds"]
    assert recs[-1]["type"] == "end" and recs[-1]["records"] == 2 * n, recs[-1]
    worst = 0.0
    for s in range(n):
        tok, dump = recs[2 * s], recs[2 * s + 1]
        assert tok["type"] == "tokens" and tok["index"] == s
        assert dump["type"] == "dump" and dump["index"] == s
        for key, name in [("hidden", "hidden"), ("logits", "logits")]:
            ref = np.load(os.path.join(fix, f"seq{s}_{name}.npy"))
            got = arr(dump[key])
            assert got.shape == ref.shape, (key, got.shape, ref.shape)
            e = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            worst = max(worst, e)
    print(f"worst rel err {worst:.2e}")
    if worst >= 1e-5:
        sys.exit(f"relative error {worst} >= 1e-5")


if __name__ == "__main__":  # generate_check.py imports read and arr
    main()
