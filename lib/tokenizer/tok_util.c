/* tok_util.c - buffers, hash maps, regexes and UTF-8 helpers of the tokenizer. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "common.h"
#include "tok_internal.h"

/* ---- buffers ------------------------------------------------------------ */

void tk_buf_reserve(tk_buf *b, size_t extra)
{
    if (b->n + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + extra + 1) cap *= 2;
    b->p = moe_realloc(b->p, cap);
    b->cap = cap;
}

void tk_buf_put(tk_buf *b, const void *s, size_t n)
{
    tk_buf_reserve(b, n);
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

void tk_ids_push(tk_ids *v, int32_t x)
{
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 256;
        v->p = moe_realloc(v->p, v->cap * sizeof *v->p);
    }
    v->p[v->n++] = x;
}

void tk_ids_append(tk_ids *v, const int32_t *x, size_t n)
{
    if (!n) return;
    if (v->n + n > v->cap) {
        size_t cap = v->cap ? v->cap : 256;
        while (cap < v->n + n) cap *= 2;
        v->p = moe_realloc(v->p, cap * sizeof *v->p);
        v->cap = cap;
    }
    memcpy(v->p + v->n, x, n * sizeof *x);
    v->n += n;
}

/* ---- string map ------------------------------------------------------- */

uint32_t tk_hash(const void *s, size_t n)
{
    /* FNV-1a, 32 bit, then a final avalanche */
    const unsigned char *p = s;
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 16777619u; }
    h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13;
    return h;
}

static void strmap_grow(tk_strmap *m)
{
    size_t ns = m->nslot ? m->nslot * 2 : 1024;
    free(m->slot);
    m->slot = moe_calloc(ns, sizeof *m->slot);
    m->nslot = ns;
    for (size_t i = 0; i < m->n; i++) {
        size_t j = m->ent[i].hash & (ns - 1);
        while (m->slot[j]) j = (j + 1) & (ns - 1);
        m->slot[j] = (uint32_t)i + 1;
    }
}

static size_t strmap_find(const tk_strmap *m, const char *s, size_t n, uint32_t h)
{
    size_t mask = m->nslot - 1, j = h & mask;
    while (m->slot[j]) {
        const struct tk_ent *e = &m->ent[m->slot[j] - 1];
        if (e->hash == h && e->len == n && memcmp(m->pool.p + e->off, s, n) == 0) return j;
        j = (j + 1) & mask;
    }
    return j;
}

size_t tk_strmap_put(tk_strmap *m, const char *s, size_t n, int32_t val)
{
    if ((m->n + 1) * 2 > m->nslot) strmap_grow(m);
    uint32_t h = tk_hash(s, n);
    size_t j = strmap_find(m, s, n, h);
    if (m->slot[j]) {
        m->ent[m->slot[j] - 1].val = val;
        return m->slot[j] - 1;
    }
    if (m->n == m->ent_cap) {
        m->ent_cap = m->ent_cap ? m->ent_cap * 2 : 1024;
        m->ent = moe_realloc(m->ent, m->ent_cap * sizeof *m->ent);
    }
    struct tk_ent *e = &m->ent[m->n];
    e->hash = h; e->len = (uint32_t)n; e->off = m->pool.n; e->val = val;
    tk_buf_put(&m->pool, s, n);
    m->slot[j] = (uint32_t)++m->n;
    return m->n - 1;
}

int32_t tk_strmap_get(const tk_strmap *m, const char *s, size_t n)
{
    if (!m->n) return -1;
    size_t j = strmap_find(m, s, n, tk_hash(s, n));
    return m->slot[j] ? m->ent[m->slot[j] - 1].val : -1;
}

void tk_strmap_clear(tk_strmap *m)
{
    if (m->slot) memset(m->slot, 0, m->nslot * sizeof *m->slot);
    m->n = 0;
    m->pool.n = 0;
}

void tk_strmap_free(tk_strmap *m)
{
    free(m->pool.p); free(m->ent); free(m->slot);
    memset(m, 0, sizeof *m);
}

/* ---- merge map -------------------------------------------------------- */

static inline uint64_t mkey(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }
static inline size_t mhash(uint64_t k) { k *= 0x9E3779B97F4A7C15ull; return (size_t)(k >> 29); }

void tk_merge_put(tk_mergemap *m, int32_t a, int32_t b, int32_t rank, int32_t id)
{
    if ((m->n + 1) * 2 > m->cap) {
        size_t nc = m->cap ? m->cap * 2 : 4096;
        tk_merge *nt = moe_malloc(nc * sizeof *nt);
        for (size_t i = 0; i < nc; i++) nt[i].key = UINT64_MAX;
        for (size_t i = 0; i < m->cap; i++) {
            if (m->t[i].key == UINT64_MAX) continue;
            size_t j = mhash(m->t[i].key) & (nc - 1);
            while (nt[j].key != UINT64_MAX) j = (j + 1) & (nc - 1);
            nt[j] = m->t[i];
        }
        free(m->t);
        m->t = nt; m->cap = nc;
    }
    uint64_t k = mkey(a, b);
    size_t j = mhash(k) & (m->cap - 1);
    while (m->t[j].key != UINT64_MAX && m->t[j].key != k) j = (j + 1) & (m->cap - 1);
    if (m->t[j].key == UINT64_MAX) m->n++;
    /* tokenizers builds a HashMap from the merge list: a later duplicate pair
     * overwrites an earlier one */
    m->t[j].key = k; m->t[j].rank = rank; m->t[j].id = id;
}

const tk_merge *tk_merge_get(const tk_mergemap *m, int32_t a, int32_t b)
{
    if (!m->cap) return NULL;
    uint64_t k = mkey(a, b);
    size_t j = mhash(k) & (m->cap - 1);
    while (m->t[j].key != UINT64_MAX) {
        if (m->t[j].key == k) return &m->t[j];
        j = (j + 1) & (m->cap - 1);
    }
    return NULL;
}

/* ---- regexes ------------------------------------------------------------ */

static int onig_ready;

int tk_regex_compile(tk_regex *r, const char *pat, size_t len, int is_literal, size_t *room, const char *what)
{
    if (!onig_ready) {
        OnigEncoding enc[1] = {ONIG_ENCODING_UTF8};
        onig_initialize(enc, 1);
        onig_ready = 1;
    }
    tk_buf esc = {0};
    int too_large = 0;
    if (is_literal) {   /* escape every non-alphanumeric ASCII character */
        for (size_t i = 0; i < len; i++) {
            unsigned char c = (unsigned char)pat[i];
            if (c < 0x80 && !((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))) {
                if (c == '\n') { tk_buf_put(&esc, "\\n", 2); continue; }
                if (c == '\r') { tk_buf_put(&esc, "\\r", 2); continue; }
                if (c == '\t') { tk_buf_put(&esc, "\\t", 2); continue; }
                if (c < 0x20 || c == 0x7f) {
                    char hx[8];
                    snprintf(hx, sizeof hx, "\\x%02X", c);
                    tk_buf_put(&esc, hx, 4);
                    continue;
                }
                tk_buf_putc(&esc, '\\');
            }
            tk_buf_putc(&esc, (char)c);
        }
        pat = esc.p ? esc.p : "";
        len = esc.n;
    } else {   /* the general categories of `tokenizers`' Unicode version */
        too_large = tk_regex_expand_props(pat, len, room ? *room : SIZE_MAX, &esc) < 0;
        pat = esc.p ? esc.p : "";
        len = esc.n;
    }
    if (too_large || (room && len > *room)) {
        moe_error_set(MOE_ERR_DATA, "%s: regex too large: its Unicode classes written out, the patterns "
                      "would take over %zu MiB", what, TK_REGEX_ROOM >> 20);
        free(esc.p);
        r->re = NULL;
        r->region = NULL;
        return -1;
    }
    if (room) *room -= len;
    OnigErrorInfo einfo;
    int rc = onig_new(&r->re, (const OnigUChar *)pat, (const OnigUChar *)pat + len,
                      ONIG_OPTION_NONE, ONIG_ENCODING_UTF8, ONIG_SYNTAX_RUBY, &einfo);
    free(esc.p);
    if (rc != ONIG_NORMAL) {
        OnigUChar msg[ONIG_MAX_ERROR_MESSAGE_LEN];
        onig_error_code_to_str(msg, rc, &einfo);
        moe_error_set(MOE_ERR_DATA, "%s: bad regex: %s", what, (char *)msg);
        r->re = NULL;
        return -1;
    }
    r->region = onig_region_new();
    return 0;
}

void tk_regex_free(tk_regex *r)
{
    if (r->re) onig_free(r->re);
    if (r->region) onig_region_free(r->region, 1);
    r->re = NULL; r->region = NULL;
}

int tk_regex_find(tk_regex *r, const char *s, size_t n, size_t from, size_t *b, size_t *e)
{
    const OnigUChar *u = (const OnigUChar *)s;
    int rc = onig_search(r->re, u, u + n, u + from, u + n, r->region, ONIG_OPTION_NONE);
    if (rc < 0) return 0;
    *b = (size_t)r->region->beg[0];
    *e = (size_t)r->region->end[0];
    return 1;
}

/* ---- UTF-8 -------------------------------------------------------------- */

int tk_utf8_decode(const unsigned char *s, size_t n, int32_t *cp)
{
    unsigned c = s[0];
    if (c < 0x80) { *cp = (int32_t)c; return 1; }
    int len;
    int32_t v, min;
    if (c >= 0xC2 && c <= 0xDF) { len = 2; v = c & 0x1F; min = 0x80; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; v = c & 0x0F; min = 0x800; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; v = c & 0x07; min = 0x10000; }
    else return -1;
    if ((size_t)len > n) return -1;
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return -1;
        v = (v << 6) | (s[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return -1;
    *cp = v;
    return len;
}

int tk_utf8_encode(int32_t cp, char *out)
{
    unsigned char *o = (unsigned char *)out;
    if (cp < 0x80) { o[0] = (unsigned char)cp; return 1; }
    if (cp < 0x800) { o[0] = 0xC0 | (cp >> 6); o[1] = 0x80 | (cp & 0x3F); return 2; }
    if (cp < 0x10000) {
        o[0] = 0xE0 | (cp >> 12); o[1] = 0x80 | ((cp >> 6) & 0x3F); o[2] = 0x80 | (cp & 0x3F);
        return 3;
    }
    o[0] = 0xF0 | (cp >> 18); o[1] = 0x80 | ((cp >> 12) & 0x3F);
    o[2] = 0x80 | ((cp >> 6) & 0x3F); o[3] = 0x80 | (cp & 0x3F);
    return 4;
}

/* The Rust char predicates, on the Unicode version of `tokenizers` (tk_gc). */
int tk_is_numeric(int32_t cp)
{
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    int c = tk_gc(cp);
    return c == TK_GC_ND || c == TK_GC_NL || c == TK_GC_NO;
}

int tk_is_whitespace(int32_t cp)
{
    /* the Unicode White_Space property */
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
           cp == 0x205F || cp == 0x3000;
}


size_t moe_utf8_check(const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        if (u[i] < 0x80) { i++; continue; }
        int32_t cp;
        int l = tk_utf8_decode(u + i, len - i, &cp);
        if (l < 0) return i;
        i += (size_t)l;
    }
    return len;
}

/* Length of the maximal prefix of an invalid sequence at s (>= 1), as the
 * WHATWG / Unicode "maximal subpart" rule that from_utf8_lossy follows. */
static size_t invalid_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    unsigned lo = 0x80, hi = 0xBF;
    size_t need;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) { need = 2; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { need = 3; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return 1;
    size_t i = 1;
    while (i <= need && i < n) {
        if (s[i] < lo || s[i] > hi) break;
        lo = 0x80; hi = 0xBF;
        i++;
    }
    return i;
}

char *moe_utf8_lossy(const char *s, size_t len, size_t *outlen)
{
    tk_buf b = {0};
    tk_buf_reserve(&b, len);
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        int32_t cp;
        int l = u[i] < 0x80 ? 1 : tk_utf8_decode(u + i, len - i, &cp);
        if (l > 0) { tk_buf_put(&b, s + i, (size_t)l); i += (size_t)l; continue; }
        tk_buf_put(&b, "\xEF\xBF\xBD", 3);
        i += invalid_len(u + i, len - i);
    }
    if (!b.p) tk_buf_reserve(&b, 0), b.p[0] = 0;
    if (outlen) *outlen = b.n;
    return b.p;
}
