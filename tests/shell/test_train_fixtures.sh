# The training fixtures (tests/fixtures/train: gradients and 10-step AdamW runs that lib/train.h
# and moe-tune are tested against) are what tests/ref/make_grad_fixtures.py computes: every one
# recomputed with PyTorch and compared (values within 1e-9, tensors within 1e-6 relative), so
# that neither the script nor the files change without the other.  Needs a python with torch
# and transformers ($CDMOE_REF_PYTHON, ./.venv-ref/bin/python or python3); skipped without.
. tests/shell/lib.sh
REF_PY=
for py in ${CDMOE_REF_PYTHON:-} "$PWD/.venv-ref/bin/python" python3; do
    if command -v "$py" >/dev/null 2>&1 &&
        "$py" -c 'import torch, transformers, safetensors, numpy' 2>/dev/null; then
        REF_PY=$py
        break
    fi
done
[ -n "$REF_PY" ] || skip "no python with torch, transformers, safetensors and numpy (CDMOE_REF_PYTHON)"
"$REF_PY" tests/ref/make_grad_fixtures.py tests/fixtures/train verify >"$TMP/verify.txt" 2>"$TMP/err.txt" ||
    fail "fixtures differ from the script's results: $(cat "$TMP/verify.txt") $(tail -n 5 "$TMP/err.txt")"
grep -q "every training fixture recomputed" "$TMP/verify.txt" || fail "no verdict: $(cat "$TMP/verify.txt")"
