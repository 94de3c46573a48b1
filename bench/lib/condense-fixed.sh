#!/bin/sh
# bench/lib/condense-fixed.sh SRC DST "L1 L2 ..." - condense decoder layers
# L1 L2 ... of checkpoint SRC to E(shared + 6): routed experts 0..5 kept with
# weight 1/6 each, written to DST by moe-condense from CD-MoE-style JSON files
# (MoE layers counted from 0 = decoder layer 1, as the original's).  For
# benchmarks that need a condensed model of given shapes without running the
# searches (tune-memory.sh, gpu-check.sh).  BIN: the tools (default bin).
set -eu
[ $# -eq 3 ] || { echo "usage: condense-fixed.sh SRC DST \"LAYERS...\"" >&2; exit 2; }
SRC=$1 DST=$2 LAYERS=$3
: "${BIN:=bin}"
J=$(mktemp -d "${TMPDIR:-/tmp}/cdmoe-condense.XXXXXX")
trap 'rm -rf "$J"' EXIT
order= experts= weights=
for l in $LAYERS; do
    m=$((l - 1))
    order="$order${order:+, }$m"
    experts="$experts${experts:+, }\"$m\": [0, 1, 2, 3, 4, 5]"
    for e in 0 1 2 3 4 5; do weights="$weights${weights:+, }\"$m-$e\": [1.0, 6, 0.1667]"; done
done
echo "[$order]" >"$J/order.json"
echo "{$experts}" >"$J/experts.json"
echo "{$weights}" >"$J/weights.json"
"$BIN/moe-condense" --model "$SRC" --layers "$(echo $LAYERS | wc -w)" --experts 6 \
    --cdmoe-order "$J/order.json" --cdmoe-experts "$J/experts.json" \
    --cdmoe-weights "$J/weights.json" -o "$DST" >/dev/null
