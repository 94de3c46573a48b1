/* tok_unicode.c - the Unicode data of `tokenizers` where the system's
 * libraries differ: general categories for the split regexes (Unicode 16.0,
 * the Oniguruma bundled in `tokenizers`; the system's may know only 14.0, so
 * that a letter added in 15.0 is not \p{L} and "'s" after it splits
 * otherwise), the code points its normalizers (Unicode 9.0) do not know,
 * and its lowercase mapping (Rust's, with U+0130 -> "i\u0307"). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "common.h"
#include "tok_internal.h"

int tk_gc(int32_t cp)
{
    size_t lo = 0, hi = tk_gc_nranges;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < tk_gc_ranges[mid].lo) hi = mid;
        else if (cp > tk_gc_ranges[mid].hi) lo = mid + 1;
        else return tk_gc_ranges[mid].gc;
    }
    return -1;
}

int tk_norm_inert(int32_t cp)
{
    size_t lo = 0, hi = tk_norm_inert_nranges;
    if (cp < tk_norm_inert_ranges[0].lo) return 0;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < tk_norm_inert_ranges[mid].lo) hi = mid;
        else if (cp > tk_norm_inert_ranges[mid].hi) lo = mid + 1;
        else return 1;
    }
    return 0;
}

int tk_lowercase(int32_t cp, int32_t out[2])
{
    size_t lo = 0, hi = tk_lower_n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < tk_lower_map[mid].cp) hi = mid;
        else if (cp > tk_lower_map[mid].cp) lo = mid + 1;
        else {
            out[0] = tk_lower_map[mid].lower[0];
            out[1] = tk_lower_map[mid].lower[1];
            return out[1] ? 2 : 1;
        }
    }
    out[0] = cp;
    return 1;
}

/* ---- \p{...} in regexes ---------------------------------------------------- */

#define GC(x) (1u << TK_GC_##x)
#define GC_L (GC(LU) | GC(LL) | GC(LT) | GC(LM) | GC(LO))
#define GC_M (GC(MN) | GC(MC) | GC(ME))
#define GC_N (GC(ND) | GC(NL) | GC(NO))
#define GC_P (GC(PC) | GC(PD) | GC(PS) | GC(PE) | GC(PI) | GC(PF) | GC(PO))
#define GC_S (GC(SM) | GC(SC) | GC(SK) | GC(SO))
#define GC_Z (GC(ZS) | GC(ZL) | GC(ZP))

/* Oniguruma's names for the general categories (and their groups) whose
 * members changed between Unicode versions; compared as Oniguruma compares
 * them: case, spaces, '_' and '-' ignored.  The "Other" group (C) is left to
 * Oniguruma: it holds the unassigned code points. */
static const struct { const char *name; uint32_t mask; } gc_names[] = {
    {"l", GC_L}, {"letter", GC_L}, {"lu", GC(LU)}, {"uppercaseletter", GC(LU)},
    {"ll", GC(LL)}, {"lowercaseletter", GC(LL)}, {"lt", GC(LT)}, {"titlecaseletter", GC(LT)},
    {"lm", GC(LM)}, {"modifierletter", GC(LM)}, {"lo", GC(LO)}, {"otherletter", GC(LO)},
    {"lc", GC(LU) | GC(LL) | GC(LT)}, {"casedletter", GC(LU) | GC(LL) | GC(LT)},
    {"m", GC_M}, {"mark", GC_M}, {"combiningmark", GC_M}, {"mn", GC(MN)}, {"nonspacingmark", GC(MN)},
    {"mc", GC(MC)}, {"spacingmark", GC(MC)}, {"me", GC(ME)}, {"enclosingmark", GC(ME)},
    {"n", GC_N}, {"number", GC_N}, {"nd", GC(ND)}, {"decimalnumber", GC(ND)}, {"digit", GC(ND)},
    {"nl", GC(NL)}, {"letternumber", GC(NL)}, {"no", GC(NO)}, {"othernumber", GC(NO)},
    {"p", GC_P}, {"punctuation", GC_P}, {"punct", GC_P}, {"pc", GC(PC)}, {"connectorpunctuation", GC(PC)},
    {"pd", GC(PD)}, {"dashpunctuation", GC(PD)}, {"ps", GC(PS)}, {"openpunctuation", GC(PS)},
    {"pe", GC(PE)}, {"closepunctuation", GC(PE)}, {"pi", GC(PI)}, {"initialpunctuation", GC(PI)},
    {"pf", GC(PF)}, {"finalpunctuation", GC(PF)}, {"po", GC(PO)}, {"otherpunctuation", GC(PO)},
    {"s", GC_S}, {"symbol", GC_S}, {"sm", GC(SM)}, {"mathsymbol", GC(SM)}, {"sc", GC(SC)},
    {"currencysymbol", GC(SC)}, {"sk", GC(SK)}, {"modifiersymbol", GC(SK)}, {"so", GC(SO)},
    {"othersymbol", GC(SO)},
    {"z", GC_Z}, {"separator", GC_Z}, {"zs", GC(ZS)}, {"spaceseparator", GC(ZS)},
    {"zl", GC(ZL)}, {"lineseparator", GC(ZL)}, {"zp", GC(ZP)}, {"paragraphseparator", GC(ZP)},
};

/* The category mask of a property name, 0 if it is not one of gc_names. */
static uint32_t gc_mask(const char *s, size_t n)
{
    char key[32];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == ' ' || c == '_' || c == '-') continue;
        if (k + 1 >= sizeof key) return 0;
        key[k++] = (char)(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
    }
    key[k] = 0;
    for (size_t i = 0; i < sizeof gc_names / sizeof *gc_names; i++)
        if (!strcmp(gc_names[i].name, key)) return gc_names[i].mask;
    return 0;
}

/* [ranges] (or [^ranges]) of the categories in mask, adjacent ranges joined.
 * A bracket expression is a class on its own and a member inside another
 * class (Oniguruma's Ruby syntax nests classes), so it can stand wherever
 * \p{..} stood. */
static void put_class(tk_buf *out, uint32_t mask, int negate)
{
    tk_buf_put(out, negate ? "[^" : "[", negate ? 2 : 1);
    int32_t lo = -1, hi = -2;
    char item[40];
    for (size_t i = 0; i <= tk_gc_nranges; i++) {
        const tk_gc_range *r = i < tk_gc_nranges ? &tk_gc_ranges[i] : NULL;
        if (r && !(mask & (1u << r->gc))) continue;
        if (r && r->lo == hi + 1) { hi = r->hi; continue; }
        if (lo >= 0) {
            int len = lo == hi ? snprintf(item, sizeof item, "\\x{%X}", (unsigned)lo)
                               : snprintf(item, sizeof item, "\\x{%X}-\\x{%X}", (unsigned)lo, (unsigned)hi);
            tk_buf_put(out, item, (size_t)len);
        }
        if (r) { lo = r->lo; hi = r->hi; }
    }
    tk_buf_putc(out, ']');
}

void tk_regex_expand_props(const char *pat, size_t len, tk_buf *out)
{
    out->n = 0;
    size_t i = 0;
    while (i < len) {
        if (pat[i] != '\\' || i + 1 >= len) { tk_buf_putc(out, pat[i++]); continue; }
        char e = pat[i + 1];
        const char *close = (e == 'p' || e == 'P') && i + 2 < len && pat[i + 2] == '{'
                                ? memchr(pat + i + 3, '}', len - (i + 3)) : NULL;
        if (close) {
            const char *name = pat + i + 3;
            int negate = e == 'P';
            if (name < close && *name == '^') { negate = !negate; name++; }
            uint32_t mask = gc_mask(name, (size_t)(close - name));
            if (mask) {
                put_class(out, mask, negate);
                i = (size_t)(close - pat) + 1;
                continue;
            }
        }
        tk_buf_put(out, pat + i, 2);   /* any other escape, "\\\\" included, as it is */
        i += 2;
    }
}
