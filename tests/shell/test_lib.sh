# tests/shell/lib.sh itself: a command that fails in a test fails the test
# (set -e), and stops it there; expect_fail still runs commands that must fail.
. tests/shell/lib.sh
rc=0
sh -c '. tests/shell/lib.sh; false; echo reached' >"$TMP/out" 2>&1 || rc=$?
[ $rc -ne 0 ] || fail "a failing command did not fail the test"
if grep -q reached "$TMP/out"; then fail "the test went on after a failing command"; fi
rc=0
sh -c '. tests/shell/lib.sh; x=$(exit 3); echo reached' >"$TMP/out" 2>&1 || rc=$?
[ $rc -eq 3 ] || fail "a failing command substitution did not fail the test (exit $rc)"
expect_fail 3 "^boom$" sh -c 'echo boom >&2; exit 3'
echo "lib.sh fails fast"
