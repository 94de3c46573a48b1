/* tok_bpe.c - the BPE model: initial symbols, merges by rank (a min-heap on
 * (rank, position) as tokenizers' Word::merge_all), and the word cache. */
#include <stdlib.h>
#include <string.h>
#include "common.h"
#include "tok_internal.h"

/* GPT-2 bytes_to_unicode: printable bytes map to themselves, the other 68 to
 * U+0100.. in increasing byte order. */
const int32_t tk_byte_char[256] = {
    0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x106, 0x107, 0x108, 0x109, 0x10A, 0x10B, 0x10C, 0x10D, 0x10E, 0x10F,
    0x110, 0x111, 0x112, 0x113, 0x114, 0x115, 0x116, 0x117, 0x118, 0x119, 0x11A, 0x11B, 0x11C, 0x11D, 0x11E, 0x11F,
    0x120, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A, 0x2B, 0x2C, 0x2D, 0x2E, 0x2F,
    0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x3B, 0x3C, 0x3D, 0x3E, 0x3F,
    0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4A, 0x4B, 0x4C, 0x4D, 0x4E, 0x4F,
    0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x5B, 0x5C, 0x5D, 0x5E, 0x5F,
    0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6A, 0x6B, 0x6C, 0x6D, 0x6E, 0x6F,
    0x70, 0x71, 0x72, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x7B, 0x7C, 0x7D, 0x7E, 0x121,
    0x122, 0x123, 0x124, 0x125, 0x126, 0x127, 0x128, 0x129, 0x12A, 0x12B, 0x12C, 0x12D, 0x12E, 0x12F, 0x130, 0x131,
    0x132, 0x133, 0x134, 0x135, 0x136, 0x137, 0x138, 0x139, 0x13A, 0x13B, 0x13C, 0x13D, 0x13E, 0x13F, 0x140, 0x141,
    0x142, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB, 0xAC, 0x143, 0xAE, 0xAF,
    0xB0, 0xB1, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xBB, 0xBC, 0xBD, 0xBE, 0xBF,
    0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF,
    0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF,
    0xE0, 0xE1, 0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xEB, 0xEC, 0xED, 0xEE, 0xEF,
    0xF0, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8, 0xF9, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF,
};

int tk_char_byte(int32_t cp)
{
    if ((cp >= 0x21 && cp <= 0x7E) || (cp >= 0xA1 && cp <= 0xAC) || (cp >= 0xAE && cp <= 0xFF)) return cp;
    if (cp < 0x100 || cp > 0x143) return -1;
    int k = cp - 0x100;   /* k-th byte outside the printable ranges: 0x00-0x20, 0x7F-0xA0, 0xAD */
    return k < 33 ? k : k < 67 ? 0x7F + (k - 33) : 0xAD;
}

/* ---- symbols ------------------------------------------------------------ */

static void sym_add(moe_tokenizer *t, size_t *ns, int32_t id, int32_t len)
{
    if (*ns == t->sym_cap) {
        t->sym_cap = t->sym_cap ? t->sym_cap * 2 : 256;
        t->sym = moe_realloc(t->sym, t->sym_cap * sizeof *t->sym);
    }
    struct tk_sym *s = &t->sym[*ns];
    s->id = id; s->len = len;
    s->prev = (int32_t)*ns - 1;
    s->next = (int32_t)*ns + 1;
    (*ns)++;
}

/* Symbols of a word that is not mapped byte by byte: one per character,
 * with prefix/suffix, byte fallback and unk handling as BPE::merge_word. */
static size_t initial_symbols(moe_tokenizer *t, const char *w, size_t n)
{
    size_t ns = 0;
    int32_t unk_len = -1;  /* pending unk run (-1 = none) */
    char tmp[64];
    tk_buf big = {0};
    size_t i = 0;
    while (i < n) {
        int32_t cp;
        int cl = tk_utf8_decode((const unsigned char *)w + i, n - i, &cp);
        if (cl < 0) cl = 1;   /* cannot happen for validated input */
        int first = i == 0, last = i + (size_t)cl == n;
        const char *s = w + i;
        size_t sl = (size_t)cl;
        if ((!first && t->cp_len) || (last && t->eow_len)) {
            big.n = 0;
            if (!first) tk_buf_put(&big, t->cont_prefix, t->cp_len);
            tk_buf_put(&big, w + i, (size_t)cl);
            if (last) tk_buf_put(&big, t->eow_suffix, t->eow_len);
            s = big.p; sl = big.n;
        }
        int32_t id = tk_strmap_get(&t->vocab, s, sl);
        if (id >= 0) {
            if (unk_len >= 0) { sym_add(t, &ns, t->unk_id, unk_len); unk_len = -1; }
            sym_add(t, &ns, id, cl);
        } else {
            int done = 0;
            if (t->byte_fallback) {
                int32_t bid[64];
                size_t k;
                for (k = 0; k < sl && k < 64; k++) {
                    snprintf(tmp, sizeof tmp, "<0x%02X>", (unsigned char)s[k]);
                    bid[k] = tk_strmap_get(&t->vocab, tmp, strlen(tmp));
                    if (bid[k] < 0) break;
                }
                if (k == sl) {
                    for (k = 0; k < sl; k++) sym_add(t, &ns, bid[k], 1);
                    done = 1;
                }
            }
            if (!done && t->unk_id >= 0) {
                if (unk_len >= 0 && t->fuse_unk) unk_len += cl;
                else {
                    if (unk_len >= 0) sym_add(t, &ns, t->unk_id, unk_len);
                    unk_len = cl;
                }
            }
        }
        i += (size_t)cl;
    }
    if (unk_len >= 0) sym_add(t, &ns, t->unk_id, unk_len);
    free(big.p);
    return ns;
}

/* ---- min-heap on (rank, pos) ------------------------------------------- */

static inline int heap_less(const struct tk_heap *a, const struct tk_heap *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(moe_tokenizer *t, size_t *hn, int32_t rank, int32_t pos, int32_t id)
{
    if (*hn == t->heap_cap) {
        t->heap_cap = t->heap_cap ? t->heap_cap * 2 : 256;
        t->heap = moe_realloc(t->heap, t->heap_cap * sizeof *t->heap);
    }
    struct tk_heap *h = t->heap, x = {rank, pos, id};
    size_t i = (*hn)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&x, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = x;
}

static struct tk_heap heap_pop(moe_tokenizer *t, size_t *hn)
{
    struct tk_heap *h = t->heap, top = h[0], x = h[--(*hn)];
    size_t n = *hn, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_less(&h[c + 1], &h[c])) c++;
        if (!heap_less(&h[c], &x)) break;
        h[i] = h[c];
        i = c;
    }
    if (n) h[i] = x;
    return top;
}

static void merge_all(moe_tokenizer *t, size_t ns)
{
    struct tk_sym *sy = t->sym;
    if (ns) sy[ns - 1].next = -1;
    size_t hn = 0;
    for (size_t i = 0; i + 1 < ns; i++) {
        const tk_merge *m = tk_merge_get(&t->merges, sy[i].id, sy[i + 1].id);
        if (m) heap_push(t, &hn, m->rank, (int32_t)i, m->id);
    }
    while (hn) {
        struct tk_heap top = heap_pop(t, &hn);
        struct tk_sym *cur = &t->sym[top.pos];
        if (cur->len == 0 || cur->next < 0) continue;
        int32_t np = cur->next;
        struct tk_sym *right = &t->sym[np];
        const tk_merge *m = tk_merge_get(&t->merges, cur->id, right->id);
        if (!m || m->rank != top.rank || m->id != top.id) continue;   /* stale */
        cur->id = top.id;
        cur->len += right->len;
        cur->next = right->next;
        right->len = 0;
        if (cur->next >= 0) t->sym[cur->next].prev = top.pos;
        if (cur->prev >= 0) {
            const tk_merge *pm = tk_merge_get(&t->merges, t->sym[cur->prev].id, cur->id);
            if (pm) heap_push(t, &hn, pm->rank, cur->prev, pm->id);
        }
        if (cur->next >= 0) {
            const tk_merge *nm = tk_merge_get(&t->merges, cur->id, t->sym[cur->next].id);
            if (nm) heap_push(t, &hn, nm->rank, top.pos, nm->id);
        }
    }
}

/* BPE of one pre-token (raw bytes when the tokenizer is byte-level);
 * appends the ids to t->out. */
void tk_bpe_word(moe_tokenizer *t, const char *s, size_t n)
{
    if (!n) return;
    int32_t c = tk_strmap_get(&t->cache, s, n);
    if (c >= 0) {
        tk_ids_append(&t->out, t->cache_ids.p + c + 1, (size_t)t->cache_ids.p[c]);
        return;
    }
    size_t ns = 0;
    const char *w = s;
    size_t wn = n;
    tk_buf *mb = &t->mbuf;   /* mapped word, when needed */
    if (t->byte_level && (!t->byte_fast || t->ignore_merges)) {
        mb->n = 0;
        char u[4];
        for (size_t i = 0; i < n; i++)
            tk_buf_put(mb, u, (size_t)tk_utf8_encode(tk_byte_char[(unsigned char)s[i]], u));
        w = mb->p; wn = mb->n;
    }
    int32_t whole = t->ignore_merges ? tk_strmap_get(&t->vocab, w, wn) : -1;
    if (whole >= 0) {
        sym_add(t, &ns, whole, (int32_t)n);
    } else if (t->byte_level && t->byte_fast) {
        for (size_t i = 0; i < n; i++) sym_add(t, &ns, t->byte_id[(unsigned char)s[i]], 1);
        merge_all(t, ns);
    } else {
        ns = initial_symbols(t, w, wn);
        merge_all(t, ns);
    }
    /* emit and cache */
    if (t->cache.n > 200000) { tk_strmap_clear(&t->cache); t->cache_ids.n = 0; }
    size_t start = t->cache_ids.n;
    tk_ids_push(&t->cache_ids, 0);
    int32_t cnt = 0;
    if (ns) t->sym[ns - 1].next = -1;
    for (int32_t i = ns ? 0 : -1; i >= 0; i = t->sym[i].next) {
        tk_ids_push(&t->out, t->sym[i].id);
        tk_ids_push(&t->cache_ids, t->sym[i].id);
        cnt++;
    }
    t->cache_ids.p[start] = cnt;
    if (n <= 256) tk_strmap_put(&t->cache, s, n, (int32_t)start);
    else t->cache_ids.n = start;
}
