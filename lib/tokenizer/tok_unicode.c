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

/* Index of the range holding cp in a sorted array of n structs of `size`
 * bytes that begin with int32_t lo, hi; -1 if none. */
static long find_range(const void *base, size_t n, size_t size, int32_t cp)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const int32_t *r = (const int32_t *)((const char *)base + mid * size);
        if (cp < r[0]) hi = mid;
        else if (cp > r[1]) lo = mid + 1;
        else return (long)mid;
    }
    return -1;
}

int tk_gc(int32_t cp)
{
    long i = find_range(tk_gc_ranges, tk_gc_nranges, sizeof *tk_gc_ranges, cp);
    return i < 0 ? -1 : tk_gc_ranges[i].gc;
}

int tk_norm_inert(int32_t cp)
{
    return find_range(tk_norm_inert_ranges, tk_norm_inert_nranges, sizeof *tk_norm_inert_ranges, cp) >= 0;
}

int tk_lowercase(int32_t cp, int32_t out[2])
{
    if (cp < 0x80) {
        out[0] = cp >= 'A' && cp <= 'Z' ? cp + ('a' - 'A') : cp;
        return 1;
    }
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

/* ---- \p{...}, \d, \w in regexes -------------------------------------------- */

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

/* Other_Alphabetic code points that are not marks (PropList.txt): circled
 * and squared Latin letters.  Word characters for Oniguruma and Rust alike. */
static const tk_cp_range alpha_symbols[] = {
    {0x24B6, 0x24E9}, {0x1F130, 0x1F149}, {0x1F150, 0x1F169}, {0x1F170, 0x1F189},
};
/* Oniguruma's \w also holds these Latin-1 numbers (superscripts, fractions). */
static const tk_cp_range latin1_word_numbers[] = {{0xB2, 0xB3}, {0xB9, 0xB9}, {0xBC, 0xBE}};
#define NELEM(a) (sizeof (a) / sizeof *(a))
#define GC_WORD (GC_L | GC_M | GC(ND) | GC(NL) | GC(PC))

int tk_is_word_char(int32_t cp)
{
    if (cp < 0x80)
        return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || cp == '_';
    int c = tk_gc(cp);
    if (c >= 0 && (GC_WORD & (1u << c))) return 1;
    if (cp == 0x200C || cp == 0x200D) return 1;   /* Join_Control */
    for (size_t i = 0; i < NELEM(alpha_symbols); i++)
        if (cp >= alpha_symbols[i].lo && cp <= alpha_symbols[i].hi) return 1;
    return 0;
}

static int range_cmp(const void *x, const void *y)
{
    const tk_cp_range *a = x, *b = y;
    return a->lo < b->lo ? -1 : a->lo > b->lo;
}

/* [ranges] (or [^ranges]) of the categories in mask and the extra ranges,
 * adjacent ranges joined.  A bracket expression is a class on its own and a
 * member inside another class (Oniguruma's Ruby syntax nests classes), so it
 * can stand wherever \p{..}, \d or \w stood. */
static void put_class(tk_buf *out, uint32_t mask, const tk_cp_range *const extras[], const size_t nextras[],
                      int nsets, int negate)
{
    size_t n = 0, cap = tk_gc_nranges;
    for (int k = 0; k < nsets; k++) cap += nextras[k];
    tk_cp_range *r = moe_malloc(cap * sizeof *r);
    for (size_t i = 0; i < tk_gc_nranges; i++)
        if (mask & (1u << tk_gc_ranges[i].gc)) r[n++] = (tk_cp_range){tk_gc_ranges[i].lo, tk_gc_ranges[i].hi};
    for (int k = 0; k < nsets; k++)
        for (size_t i = 0; i < nextras[k]; i++) r[n++] = extras[k][i];
    qsort(r, n, sizeof *r, range_cmp);
    tk_buf_put(out, negate ? "[^" : "[", negate ? 2 : 1);
    char item[40];
    for (size_t i = 0; i < n;) {
        int32_t lo = r[i].lo, hi = r[i].hi;
        for (i++; i < n && r[i].lo <= hi + 1; i++)
            if (r[i].hi > hi) hi = r[i].hi;
        int len = lo == hi ? snprintf(item, sizeof item, "\\x{%X}", (unsigned)lo)
                           : snprintf(item, sizeof item, "\\x{%X}-\\x{%X}", (unsigned)lo, (unsigned)hi);
        tk_buf_put(out, item, (size_t)len);
    }
    tk_buf_putc(out, ']');
    free(r);
}

/* \d and \w (negated: \D, \W) as Oniguruma defines them for Unicode:
 * decimal digits; letters, marks, decimal and letter numbers, connector
 * punctuation, the alphabetic symbols and Latin-1 numbers above. */
static int put_escape_class(tk_buf *out, char e)
{
    static const tk_cp_range *const word_extras[] = {alpha_symbols, latin1_word_numbers};
    static const size_t word_nextras[] = {NELEM(alpha_symbols), NELEM(latin1_word_numbers)};
    switch (e) {
    case 'd': case 'D': put_class(out, GC(ND), NULL, NULL, 0, e == 'D'); return 1;
    case 'w': case 'W': put_class(out, GC_WORD, word_extras, word_nextras, 2, e == 'W'); return 1;
    }
    return 0;
}

int tk_regex_expand_props(const char *pat, size_t len, size_t limit, tk_buf *out)
{
    out->n = 0;
    size_t i = 0;
    while (i < len) {
        if (out->n > limit) return -1;
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
                put_class(out, mask, NULL, NULL, 0, negate);
                i = (size_t)(close - pat) + 1;
                continue;
            }
        }
        if (!put_escape_class(out, e)) tk_buf_put(out, pat + i, 2);   /* other escapes as they are */
        i += 2;
    }
    return out->n > limit ? -1 : 0;
}
