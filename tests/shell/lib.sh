# tests/shell/lib.sh - helpers for shell tests (sourced).
# A test exits 0 (pass), 77 (skip: say why) or anything else (fail).
# Fail fast: a command that fails outside a condition (if, while, ||, &&, !)
# ends the test with its status, so no step's failure goes unnoticed; a
# command expected to fail goes through expect_fail or a condition.
set -eu
: "${BIN:=bin}"
PATH="$BIN:$PATH"
TMP=$(mktemp -d /tmp/cdmoe-shell.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

fail() { echo "FAIL: $*"; exit 1; }
skip() { echo "SKIP: $*"; exit 77; }

# expect_fail CODE PATTERN CMD...: CMD must exit CODE and print PATTERN
# (grep -E) on stderr as a single line, and nothing on stdout.
expect_fail() {
    code=$1 pattern=$2; shift 2
    rc=0
    "$@" >"$TMP/.expect-out" 2>"$TMP/.expect-err" || rc=$?
    [ $rc -eq "$code" ] || fail "'$*' exited $rc, expected $code; stderr: $(cat "$TMP/.expect-err")"
    grep -Eq -- "$pattern" "$TMP/.expect-err" || fail "'$*' stderr lacks /$pattern/: $(cat "$TMP/.expect-err")"
    [ "$(wc -l <"$TMP/.expect-err")" -le 2 ] || fail "'$*' printed more than one error line: $(cat "$TMP/.expect-err")"
}

# A python3 with msgpack and zstandard (the pip one, or Debian's), else empty.
find_python() {
    for py in python3 /usr/bin/python3; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import msgpack, zstandard' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    return 1
}
