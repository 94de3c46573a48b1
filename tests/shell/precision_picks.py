"""Compare the greedy picks of two search streams (moe-dump --full JSON Lines
of the ranking and plan records): float32 (first) vs --precision bf16.

At each greedy step where both runs have made the same picks so far, the
candidates' scores of the two runs are compared: the bf16 error of the step
is the largest relative difference of a candidate's score.  A different pick
is accepted when the float32 scores of the two picks are closer (relatively)
than that error, i.e. BF16's rounding can explain it; otherwise it is a
failure.  After a different pick the rest of that record is not comparable.
Prints one line per record; exits 1 on a failure.
usage: precision_picks.py F32.jsonl BF16.jsonl"""
import json
import math
import sys


def records(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r.get("type") in ("ranking", "plan"):
            key = (r["type"], r.get("layer", r.get("experts")))
            out[key] = r
    return out


def num(v):
    return float("nan") if v == "NaN" else float(v)


WORST = [0.0]


def compare(key, a, b):
    picks_key = "experts" if key[0] == "ranking" else "order"
    pa, pb = a[picks_key]["data"], b[picks_key]["data"]
    n = a["candidates"]["shape"][1]
    ca = [num(v) for v in a["candidates"]["data"]]
    cb = [num(v) for v in b["candidates"]["data"]]
    worst = 0.0
    for step in range(len(pa)):
        row_a, row_b = ca[step * n:(step + 1) * n], cb[step * n:(step + 1) * n]
        err = max((abs(y - x) / abs(x) for x, y in zip(row_a, row_b)
                   if not math.isnan(x) and not math.isnan(y) and x != 0), default=0.0)
        worst = max(worst, err)
        if pa[step] == pb[step]:
            continue
        x, y = row_a[pa[step]], row_a[pb[step]]
        gap = abs(y - x) / abs(x)
        verdict = "ok" if gap <= err else "FAIL"
        WORST[0] = max(WORST[0], err)
        print(f"{key[0]} {key[1]}: step {step}: f32 picks {pa[step]}, bf16 picks {pb[step]}; "
              f"their f32 scores {x:.6g} vs {y:.6g} differ by {gap:.2e}, bf16 error here {err:.2e}: {verdict}")
        return verdict == "ok"
    print(f"{key[0]} {key[1]}: same picks {pa} (bf16 error of the scores up to {worst:.2e})")
    WORST[0] = max(WORST[0], worst)
    return True


def main():
    a, b = records(sys.argv[1]), records(sys.argv[2])
    if not a or sorted(a) != sorted(b):
        print("the two streams do not hold the same ranking/plan records")
        return 1
    ok = all([compare(k, a[k], b[k]) for k in sorted(a, key=str)])
    if WORST[0] < 1e-7:  # the scores must move: else bf16 was not applied
        print(f"no score differs between the two runs (largest difference {WORST[0]:.2e})")
        return 1
    return 0 if ok else 1


sys.exit(main())
