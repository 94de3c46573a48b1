# Every tool: --help on stdout exit 0, --version, bad usage exit 2 with a hint.
. tests/shell/lib.sh
n=0
for t in "$BIN"/moe-*; do
    name=$(basename "$t")
    "$t" --help >"$TMP/out" 2>"$TMP/err" || fail "$name --help exited non-zero"
    grep -q "Usage: $name" "$TMP/out" || fail "$name --help lacks a usage line"
    [ -s "$TMP/err" ] && fail "$name --help wrote to stderr"
    "$t" --version | grep -q "^$name (cdmoe) " || fail "$name --version"
    expect_fail 2 "Try '$name --help'" "$t" --no-such-option
    [ -f "man/man1/$name.1" ] || fail "$name has no man page man/man1/$name.1"
    n=$((n+1))
done
[ $n -gt 0 ] || fail "no tools found in $BIN"
echo "$n tools checked"
