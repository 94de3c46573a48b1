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

# The common options each tool takes (those it acts on): --help and the man
# page list exactly these; any other is a usage error naming it, e.g.
# moe-dump --seed 9 (moe-dump draws no random numbers).
takes() {
    case $1 in
    moe-tokenize) echo "threads no-provenance quiet" ;;
    moe-calib|moe-expert-rank|moe-layer-search) echo "threads device precision force no-provenance quiet" ;;
    moe-condense) echo "force" ;;
    moe-eval) echo "threads device precision seed force no-provenance quiet" ;;
    moe-generate) echo "threads device precision seed force no-provenance quiet" ;;
    moe-init) echo "threads seed force quiet" ;;
    moe-dump) echo "" ;;
    moe-merge) echo "force no-provenance" ;;
    moe-tune) echo "threads device precision seed force no-provenance quiet" ;;
    *) fail "$1: not in the table of common options" ;;
    esac
}
value() { case $1 in threads) echo 2 ;; device) echo cpu ;; precision) echo bf16 ;; seed) echo 9 ;; esac; }
for t in "$BIN"/moe-*; do
    name=$(basename "$t")
    taken=$(takes "$name")
    "$t" --help >"$TMP/help" || fail "$name --help"
    for opt in threads device precision seed force no-provenance quiet; do
        man_has=0; help_has=0
        grep -q -- "--$opt\b" "$TMP/help" && help_has=1
        # the man page as text: without font escapes and roff's backslashes
        sed -e 's/\\f[BIRP]//g' -e 's/\\//g' "man/man1/$name.1" | grep -q -- "--$opt\b" && man_has=1
        case " $taken " in
        *" $opt "*)
            [ $help_has = 1 ] || fail "$name --help does not list --$opt, which it takes"
            [ $man_has = 1 ] || fail "man page of $name does not list --$opt, which it takes" ;;
        *)
            [ $help_has = 0 ] || fail "$name --help lists --$opt, which it does not take"
            [ $man_has = 0 ] || fail "man page of $name lists --$opt, which it does not take"
            v=$(value $opt)
            expect_fail 2 "^$name: option '--$opt' is not used by $name\$" "$t" --$opt ${v:+"$v"} --help ;;
        esac
    done
done
# --precision takes f32 or bf16 only
expect_fail 2 "^moe-calib: --precision: expected f32 or bf16, got 'fp16'" "$BIN/moe-calib" --precision fp16 --help
echo "$n tools checked"
