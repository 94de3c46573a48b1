#!/bin/sh
# Stream throughput: moe-dump --check (our reader: zstd + msgpack + checks) vs
# Python msgpack + zstandard reading the same stream, same run.
set -u
: "${BIN:=bin}"
PY=
for p in python3 /usr/bin/python3; do
    $p -c 'import msgpack, zstandard' 2>/dev/null && PY=$p && break
done
[ -n "$PY" ] || { echo "stream bench: SKIP (no python3 with msgpack+zstandard)"; exit 0; }
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
$PY - "$T/big.msgpack.zst" <<'PYEOF'
import msgpack, zstandard, struct, sys, random
random.seed(0)
c = zstandard.ZstdCompressor(write_checksum=True).compressobj()
with open(sys.argv[1], "wb") as f:
    f.write(c.compress(msgpack.packb({"format": "moe-stream", "version": 1, "kinds": ["bench"], "provenance": []})))
    n = 0
    for i in range(2000):
        vals = struct.pack("<256f", *[random.random() for _ in range(256)])
        f.write(c.compress(msgpack.packb({"type": "x", "index": i, "v": {"dtype": "f32", "shape": [128, 128], "data": vals * 64}})))
        n += 1
    f.write(c.compress(msgpack.packb({"type": "end", "records": n})))
    f.write(c.flush())
PYEOF
t0=$(date +%s.%N); "$BIN/moe-dump" --check "$T/big.msgpack.zst" >/dev/null; t1=$(date +%s.%N)
$PY - "$T/big.msgpack.zst" <<'PYEOF'
import msgpack, zstandard, sys
with open(sys.argv[1], "rb") as f:
    for o in msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(f), raw=False, max_buffer_size=1 << 30):
        pass
PYEOF
t2=$(date +%s.%N)
mb=$(( $(stat -c %s "$T/big.msgpack.zst") / 1000000 ))
awk -v a="$t0" -v b="$t1" -v c="$t2" -v mb="$mb" 'BEGIN { printf "stream read (131 MB raw, %d MB compressed): moe-dump --check %.2f s, python msgpack+zstandard %.2f s; ours is %.1fx faster\n", mb, b - a, c - b, (c - b) / (b - a) }' 
