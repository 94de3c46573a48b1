"""Write and read moe-streams with stock Python libraries (msgpack, zstandard),
as moe-stream(5) tells users to.  Used by test_stream_interop.sh.

  stream_py.py write OUT        write a sample stream (every dtype, nesting)
  stream_py.py read IN          read a stream, check the sample's values, print a summary
  stream_py.py bad KIND OUT     write a deliberately broken stream
  stream_py.py hostile KIND OUT [MIB]
                                write a stream made to hurt a reader: 'wrap' (a token
                                record whose i32 shape [2^40, 2^22] is 2^64 bytes, with
                                no data), 'bomb' (a token record of MIB MiB of zeros:
                                a few KB of zstd), 'arraybomb' (a list declaring MIB Mi
                                elements, then as many zero bytes)
"""
import struct
import sys

import msgpack
import zstandard


def typed(dtype, shape, fmt, values):
    return {"dtype": dtype, "shape": list(shape), "data": struct.pack("<%d%s" % (len(values), fmt), *values)}


def sample_records():
    recs = []
    for i in range(5):
        n = [0, 1, 7, 1000, 30000][i]
        recs.append({"type": "sample", "index": i,
                     "values": typed("f32", [n], "f", [i + j * 0.25 for j in range(n)]),
                     "ids": typed("i32", [1, n], "i", [j - i for j in range(n)]),
                     "note": "caf\u00e9 \U0001F600 \"q\"\n", "nested": {"a": [1, 2.5, None, True]}})
    recs.append({"type": "other", "wide": typed("i64", [2], "q", [-(2**40), 2**40]),
                 "half": typed("f16", [2], "e", [1.5, -2.0]), "dbl": typed("f64", [1], "d", [0.1])})
    return recs


def write(path, records, header=None, end=True, count=None):
    header = header or {"format": "moe-stream", "version": 1, "kinds": ["test"],
                        "provenance": [{"tool": "stream_py", "version": "1", "args": [], "model": None}]}
    raw = msgpack.packb(header)
    for r in records:
        raw += msgpack.packb(r)
    if end:
        raw += msgpack.packb({"type": "end", "records": len(records) if count is None else count})
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor(write_checksum=True).compress(raw))


def read(path):
    with open(path, "rb") as f:
        objs = list(msgpack.Unpacker(zstandard.ZstdDecompressor().stream_reader(f), raw=False))
    header, records, end = objs[0], objs[1:-1], objs[-1]
    assert header["format"] == "moe-stream" and header["version"] == 1, header
    assert end == {"type": "end", "records": len(records)}, end
    want = sample_records()
    got = [r for r in records if r["type"] in ("sample", "other")]
    assert got == want, "records differ from the sample"
    print("ok", len(records), "records, kinds", ",".join(header["kinds"]),
          "tools", ",".join(p["tool"] for p in header["provenance"]))


def bad(kind, path):
    recs = sample_records()[:2]
    if kind == "format":
        write(path, recs, header={"format": "not-moe", "version": 1, "kinds": [], "provenance": []})
    elif kind == "version":
        write(path, recs, header={"format": "moe-stream", "version": 99, "kinds": [], "provenance": []})
    elif kind == "noend":
        write(path, recs, end=False)
    elif kind == "count":
        write(path, recs, count=7)
    elif kind == "notype":
        write(path, [{"index": 1}])
    elif kind == "shape":
        write(path, [{"type": "x", "v": {"dtype": "f32", "shape": [3], "data": b"\0" * 8}}])
    elif kind == "nonmsgpack":
        with open(path, "wb") as f:
            f.write(zstandard.ZstdCompressor().compress(b"\xc1\xc1\xc1 plain bytes"))
    else:
        raise SystemExit("unknown kind " + kind)


def hostile(kind, path, mib=0):
    header = {"format": "moe-stream", "version": 1, "kinds": ["tokens"], "provenance": []}
    n = mib << 20
    if kind == "wrap":
        ids = {"dtype": "i32", "shape": [2**40, 2**22], "data": b""}
        write(path, [{"type": "tokens", "index": 0, "ids": ids}], header=header)
        return
    # The large part is streamed through the compressor, never held whole.
    if kind == "bomb":
        head = (b"\x83" + msgpack.packb("type") + msgpack.packb("tokens") + msgpack.packb("index") +
                msgpack.packb(0) + msgpack.packb("ids") + b"\x83" + msgpack.packb("dtype") +
                msgpack.packb("u8") + msgpack.packb("shape") + msgpack.packb([n]) +
                msgpack.packb("data") + b"\xc6" + struct.pack(">I", n))
    elif kind == "arraybomb":
        head = (b"\x82" + msgpack.packb("type") + msgpack.packb("x") + msgpack.packb("v") +
                b"\xdd" + struct.pack(">I", n))
    else:
        raise SystemExit("unknown kind " + kind)
    with open(path, "wb") as f:
        with zstandard.ZstdCompressor(write_checksum=True).stream_writer(f) as z:
            z.write(msgpack.packb(header) + head)
            zeros = bytes(1 << 20)
            for _ in range(mib):
                z.write(zeros)
            z.write(msgpack.packb({"type": "end", "records": 1}))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sample_records())
    elif sys.argv[1] == "read":
        read(sys.argv[2])
    elif sys.argv[1] == "bad":
        bad(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "hostile":
        hostile(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 0)
