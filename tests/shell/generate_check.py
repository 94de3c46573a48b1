"""Helper of test_generate.sh (stock msgpack + zstandard + numpy).

  generate_check.py greedy DUMP [NEW]   every generated token of each record of
      `moe-eval --dump logits` run on moe-generate's token stream is the argmax
      (first maximum) of the logits row before it; NEW: each record generated
      exactly NEW tokens
  generate_check.py counts TOKENS       print "prompt_tokens total" per record
"""
import sys

import numpy as np

from eval_dump_py import arr, read as records  # the stream reading of test_eval_dump.sh


def greedy(path, want_new):
    hdr, recs = records(path)
    assert hdr["kinds"] == ["tokens", "dump"], hdr["kinds"]
    tools = [p["tool"] for p in hdr["provenance"]]
    assert tools == ["moe-generate", "moe-eval"], tools
    pairs = [(recs[i], recs[i + 1]) for i in range(0, len(recs) - 1, 2)]
    assert pairs, "no records"
    checked, gap = 0, np.inf
    for tok, dump in pairs:
        assert tok["type"] == "tokens" and dump["type"] == "dump" and tok["index"] == dump["index"]
        ids, lg = arr(tok["ids"]), arr(dump["logits"])
        p = tok["prompt_tokens"]
        assert 1 <= p < len(ids), (p, len(ids))
        if want_new is not None:
            assert len(ids) - p == want_new, (tok["index"], len(ids) - p, want_new)
        for t in range(p - 1, len(ids) - 1):
            row = lg[t]
            assert int(np.argmax(row)) == int(ids[t + 1]), (tok["index"], t, int(np.argmax(row)), int(ids[t + 1]))
            top2 = np.sort(row)[-2:]
            gap = min(gap, float(top2[1] - top2[0]))
            checked += 1
    print(f"{checked} generated tokens are the argmax of moe-eval's logits (smallest top-2 gap {gap:.2e})")


def counts(path):
    _, recs = records(path)
    for r in recs:
        if r.get("type") == "tokens":
            print(r["prompt_tokens"], r["ids"]["shape"][0])


if __name__ == "__main__":
    if sys.argv[1] == "greedy":
        greedy(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
    else:
        counts(sys.argv[2])
