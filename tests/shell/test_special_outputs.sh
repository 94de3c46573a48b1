# Every writing tool given -o a FIFO, a character device (a copy of /dev/null
# made with mknod here -- the real one is never touched) and a symlink
# (issue 14).  A target that is not a regular file is written in place, as
# cp does, and stays what it was (the tools used to rename a temporary file
# over it, so as root -o /dev/null replaced /dev/null with a regular file); a
# symlink stays a symlink and the file it names gets the output.  Checkpoint
# directories (moe-condense, moe-init): a device or FIFO is refused, a symlink
# to a directory keeps the link and replaces the directory.  Write errors on
# standard output (/dev/full) name it.
. tests/shell/lib.sh
export OMP_NUM_THREADS=1
M=tests/fixtures/models/qwen3_moe-bf16
TOK=tests/fixtures/search/qwen3_moe/tokens.msgpack.zst
TK=tests/fixtures/tokenizer/synth-split
TEXTS=tests/fixtures/tokenizer/texts.jsonl

mkdir "$TMP/dev" "$TMP/sub"
if mknod "$TMP/dev/null" c 1 3 2>/dev/null && mknod "$TMP/dev/full" c 1 7 2>/dev/null; then
    have_dev=1
else
    have_dev=0; echo "note: mknod not permitted (not root?): device cases not run"
fi

# inputs for the tools further down the pipeline
moe-calib --quiet --model $M "$TOK" >"$TMP/calib" || fail "moe-calib"
moe-expert-rank --quiet --model $M --max-length 16 "$TMP/calib" >"$TMP/rank" || fail "moe-expert-rank"
moe-layer-search --quiet --model $M --experts 2 --max-length 16 "$TMP/rank" >"$TMP/plan" || fail "moe-layer-search"
moe-tokenize --model $TK "$TEXTS" >"$TMP/tktok" || fail "moe-tokenize"
printf '[1,2,3,4]\n[5,6,7]\n' >"$TMP/ids"
moe-tokenize --model $TK --ids "$TMP/ids" >"$TMP/evaltok" || fail "moe-tokenize --ids"

# each writer, as "NAME command with OUT for its output" (eval'd);
# --no-provenance so that outputs compare byte for byte whatever their path
WRITERS='
tokenize|moe-tokenize --no-provenance --model $TK -o "$OUT" $TEXTS
decode|moe-tokenize --model $TK --decode -o "$OUT" $TMP/tktok
calib|moe-calib --quiet --no-provenance --model $M -o "$OUT" $TOK
rank|moe-expert-rank --quiet --no-provenance --model $M --max-length 16 -o "$OUT" $TMP/calib
search|moe-layer-search --quiet --no-provenance --model $M --experts 2 --max-length 16 -o "$OUT" $TMP/rank
eval|moe-eval --no-provenance --model $M --dump logits -o "$OUT" $TMP/evaltok
merge|moe-merge --no-provenance -o "$OUT" $TMP/calib $TMP/rank
dump|moe-dump $TOK >"$OUT"'

# no temporary output (.NAME.tmp.PID.N, .NAME.old.PID) may be left beside a target
no_leftovers() {
    left=$(ls -A "$1" | grep '^\.' | grep -v '^\.expect-' || true)
    [ -z "$left" ] || fail "$2: left behind in $1: $left"
}

echo "$WRITERS" | while IFS='|' read -r name cmd; do
    [ -n "$name" ] || continue
    OUT="$TMP/ref.$name"
    eval "$cmd" || fail "$name: to a regular file"

    # a character device: written in place, still a device afterwards
    if [ $have_dev = 1 ]; then
        OUT="$TMP/dev/null"
        eval "$cmd" 2>"$TMP/err" || fail "$name -o a copy of /dev/null: $(cat "$TMP/err")"
        [ -c "$TMP/dev/null" ] || fail "$name replaced the device $OUT with a regular file"
        no_leftovers "$TMP/dev" "$name -o device"
    fi

    # a FIFO: written in place, its reader gets the same bytes as the file
    rm -f "$TMP/fifo" "$TMP/fromfifo"
    mkfifo "$TMP/fifo"
    cat "$TMP/fifo" >"$TMP/fromfifo" &
    reader=$!
    OUT="$TMP/fifo"
    eval "$cmd" 2>"$TMP/err" || { kill $reader 2>/dev/null; fail "$name -o FIFO: $(cat "$TMP/err")"; }
    wait $reader
    [ -p "$TMP/fifo" ] || fail "$name replaced the FIFO"
    cmp -s "$TMP/fromfifo" "$TMP/ref.$name" || fail "$name -o FIFO: the reader got other bytes"

    # a symlink: the link stays, the file it names (relative to the link's
    # directory) gets the output; a dangling link names the file to create
    rm -f "$TMP/real" "$TMP/new.real" "$TMP/sub/link" "$TMP/sub/dangling"
    echo old >"$TMP/real"
    ln -s ../real "$TMP/sub/link"
    OUT="$TMP/sub/link"
    eval "$cmd" || fail "$name -o symlink"
    [ -L "$TMP/sub/link" ] && [ "$(readlink "$TMP/sub/link")" = ../real ] || fail "$name replaced the symlink"
    cmp -s "$TMP/real" "$TMP/ref.$name" || fail "$name -o symlink: its target does not hold the output"
    ln -s ../new.real "$TMP/sub/dangling"
    OUT="$TMP/sub/dangling"
    eval "$cmd" || fail "$name -o dangling symlink"
    [ -L "$TMP/sub/dangling" ] && cmp -s "$TMP/new.real" "$TMP/ref.$name" || fail "$name -o dangling symlink"
    no_leftovers "$TMP" "$name"
    no_leftovers "$TMP/sub" "$name"
done || exit 1

# /dev/stdout is a link whose text ("pipe:[N]") is no path: written in place
moe-merge --no-provenance -o /dev/stdout "$TMP/calib" "$TMP/rank" | cat >"$TMP/viastdout" || fail "-o /dev/stdout"
cmp -s "$TMP/viastdout" "$TMP/ref.merge" || fail "-o /dev/stdout: other bytes"
# a directory is refused before any work
mkdir "$TMP/adir"
expect_fail 3 "adir: is a directory" moe-merge -o "$TMP/adir" "$TMP/calib"

# ---- checkpoint directories --------------------------------------------------
DIRW='
condense|moe-condense --model $M --layers 1 --experts 2 -o "$OUT" $TMP/plan
init|moe-init --arch olmoe --seed 1 -o "$OUT"'
mkdir "$TMP/ck"
echo "$DIRW" | while IFS='|' read -r name cmd; do
    [ -n "$name" ] || continue
    # a device or a FIFO is not a directory: refused, and left as it was
    rm -f "$TMP/fifo"; mkfifo "$TMP/fifo"
    for OUT in "$TMP/fifo" $( [ $have_dev = 1 ] && echo "$TMP/dev/null" ); do
        eval "expect_fail 3 'exists \\(use --force' $cmd"
        eval "expect_fail 3 'exists and is not a directory' $cmd --force"
        [ -p "$OUT" ] || [ -c "$OUT" ] || fail "$name: $OUT was replaced"
    done
    no_leftovers "$TMP" "$name -o FIFO"
    [ $have_dev = 0 ] || no_leftovers "$TMP/dev" "$name -o device"

    # a symlink to a checkpoint: with --force the link stays and the
    # directory it names is replaced (its old files gone)
    rm -rf "$TMP/ck/real" "$TMP/ck/link"
    mkdir "$TMP/ck/real"; echo old >"$TMP/ck/real/old-file"
    ln -s real "$TMP/ck/link"
    OUT="$TMP/ck/link"
    eval "expect_fail 3 'exists \\(use --force' $cmd"
    eval "$cmd --force" >/dev/null || fail "$name -o symlink --force"
    [ -L "$TMP/ck/link" ] || fail "$name replaced the symlink to its output directory"
    [ -f "$TMP/ck/real/config.json" ] && [ ! -e "$TMP/ck/real/old-file" ] || fail "$name: the link's directory not replaced"
    # replacing again: nothing but the new checkpoint remains (the old one is
    # swapped out in one step and then removed, never left under another name)
    eval "$cmd --force" >/dev/null || fail "$name: second --force"
    [ "$(ls -A "$TMP/ck")" = "$(printf 'link\nreal')" ] || fail "$name: left behind: $(ls -A "$TMP/ck")"
done || exit 1

# "DIR/" names DIR (its temporary used to be looked for inside it)
moe-init --arch olmoe --seed 1 -o "$TMP/slash/" >/dev/null || fail "moe-init -o DIR/"
[ -f "$TMP/slash/config.json" ] || fail "moe-init -o DIR/: no checkpoint"
moe-init --arch olmoe --seed 1 -o "$TMP/ck/link/" --force >/dev/null || fail "moe-init -o LINK/ --force"
[ -L "$TMP/ck/link" ] && [ -f "$TMP/ck/real/config.json" ] || fail "moe-init -o LINK/"
no_leftovers "$TMP" "-o DIR/"

# ---- replacing a checkpoint where directories cannot be exchanged ----------
# A shim makes renameat2 fail as on a file system without RENAME_EXCHANGE,
# and (with SHIM_TERM) sends SIGTERM right after the old checkpoint is moved
# aside: it must then sit under a name that no later run sweeps away (it used
# to be a temporary name, deleted by the next run as stale).
if command -v cc >/dev/null 2>&1 && ! ldd "$(command -v moe-init)" 2>/dev/null | grep -q libasan; then
    cat >"$TMP/shim.c" <<'CEOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
int renameat2(int a, const char *from, int b, const char *to, unsigned flags) {
    (void)a, (void)from, (void)b, (void)to, (void)flags;
    errno = EINVAL;
    return -1;
}
int rename(const char *from, const char *to) {
    int (*real)(const char *, const char *) = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    int rc = real(from, to);
    if (rc == 0 && getenv("SHIM_TERM") && strstr(to, ".old.")) raise(SIGTERM);
    return rc;
}
CEOF
    cc -shared -fPIC -o "$TMP/shim.so" "$TMP/shim.c" -ldl || fail "building the rename shim"
    mkdir "$TMP/rp"
    moe-init --arch olmoe --seed 1 -o "$TMP/rp/ck" >/dev/null || fail "moe-init"
    moe-init --arch olmoe --seed 2 -o "$TMP/seed2" >/dev/null || fail "moe-init"
    LD_PRELOAD="$TMP/shim.so" moe-init --arch olmoe --seed 2 -o "$TMP/rp/ck" --force >/dev/null \
        || fail "replacing without RENAME_EXCHANGE"
    cmp -s "$TMP/rp/ck/model.safetensors" "$TMP/seed2/model.safetensors" || fail "not replaced"
    [ "$(ls -A "$TMP/rp")" = ck ] || fail "replacing without exchange left: $(ls -A "$TMP/rp")"
    rc=0
    LD_PRELOAD="$TMP/shim.so" SHIM_TERM=1 moe-init --arch olmoe --seed 3 -o "$TMP/rp/ck" --force >/dev/null 2>&1 \
        || rc=$?
    [ $rc -eq 143 ] || fail "the shim did not stop moe-init (exit $rc)"
    old=$(ls -A "$TMP/rp" | grep '^\.ck\.old\.') || fail "old checkpoint not kept aside: $(ls -A "$TMP/rp")"
    moe-init --arch olmoe --seed 4 -o "$TMP/rp/ck" >/dev/null || fail "the next run"
    cmp -s "$TMP/rp/$old/model.safetensors" "$TMP/seed2/model.safetensors" \
        || fail "the next run removed the old checkpoint left at $old"
else
    echo "note: no cc (or a sanitizer build): replacement without RENAME_EXCHANGE not tested"
fi

# ---- standard output ------------------------------------------------------------
if [ $have_dev = 1 ]; then
    rm -rf "$TMP/cfull"
    rc=0
    moe-condense --model $M --layers 1 --experts 2 -o "$TMP/cfull" "$TMP/plan" >"$TMP/dev/full" 2>"$TMP/err" \
        || rc=$?
    [ $rc -eq 3 ] || fail "moe-condense >/dev/full exited $rc"
    grep -q "^moe-condense: <stdout>: write error: No space left on device" "$TMP/err" \
        || fail "moe-condense >/dev/full: $(cat "$TMP/err")"
    for cmd in "moe-dump $TOK" "moe-calib --quiet --model $M $TOK" "moe-tokenize --model $TK $TEXTS"; do
        rc=0
        $cmd >"$TMP/dev/full" 2>"$TMP/err" || rc=$?
        [ $rc -eq 3 ] && grep -q "<stdout>: write error" "$TMP/err" || fail "$cmd >/dev/full: exit $rc: $(cat "$TMP/err")"
    done
fi
exit 0
