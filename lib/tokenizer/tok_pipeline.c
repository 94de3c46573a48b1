/* tok_pipeline.c - normalizers, pre-tokenizers and decoders of the tokenizer,
 * with the semantics of the Hugging Face `tokenizers` library. */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>
#include "common.h"
#include "tok_internal.h"

/* ---- normalizers ------------------------------------------------------ */

/* utf8proc's normal form of s[0..n), appended to out. */
static int utf8proc_append(int flags, const char *s, size_t n, tk_buf *out)
{
    if (!n) return 0;
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst,
                                      (utf8proc_option_t)flags);
    if (r < 0) {
        moe_error_set(MOE_ERR_DATA, "normalizer: %s", utf8proc_errmsg(r));
        return -1;
    }
    tk_buf_put(out, dst, (size_t)r);
    free(dst);
    return 0;
}

/* A Unicode normal form as `tokenizers` computes it, with the tables of
 * Unicode 9.0: a code point assigned later is a starter that neither
 * decomposes nor composes there, so the text is cut at each one that
 * utf8proc would treat otherwise (tk_norm_inert), the pieces normalized by
 * utf8proc and the code point copied as it is.  (The cut changes nothing
 * else: no reordering or composition crosses such a starter.) */
static int nrm_unicode(int type, const char *s, size_t n, tk_buf *out)
{
    if (type == NRM_NFC) {   /* below U+0300 every string is NFC */
        size_t i = 0;
        while (i < n && (unsigned char)s[i] < 0xCC) i++;
        if (i == n) { tk_buf_put(out, s, n); return 0; }
    }
    int fl = UTF8PROC_STABLE;
    fl |= (type == NRM_NFC || type == NRM_NFKC) ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE;
    if (type == NRM_NFKC || type == NRM_NFKD) fl |= UTF8PROC_COMPAT;
    size_t start = 0, i = 0;
    while (i < n) {
        if ((unsigned char)s[i] < 0xDF) { i++; continue; }   /* the first inert code point is U+07FD */
        int32_t cp;
        int l = tk_utf8_decode((const unsigned char *)s + i, n - i, &cp);
        if (l < 0) { i++; continue; }   /* utf8proc reports it */
        if (tk_norm_inert(cp)) {
            if (utf8proc_append(fl, s + start, i - start, out) < 0) return -1;
            tk_buf_put(out, s + i, (size_t)l);
            start = i + (size_t)l;
        }
        i += (size_t)l;
    }
    return utf8proc_append(fl, s + start, n - start, out);
}

static int nrm_one(const tk_norm *nm, const char *s, size_t n, tk_buf *out)
{
    out->n = 0;
    switch (nm->type) {
    case NRM_NFC: case NRM_NFD: case NRM_NFKC: case NRM_NFKD:
        return nrm_unicode(nm->type, s, n, out);
    case NRM_LOWER: {
        size_t i = 0;
        while (i < n) {
            int32_t cp;
            int l = tk_utf8_decode((const unsigned char *)s + i, n - i, &cp);
            if (l < 0) l = 1, cp = 0xFFFD;
            int32_t lower[2];
            for (int k = 0, nl = tk_lowercase(cp, lower); k < nl; k++) {
                char u[4];
                tk_buf_put(out, u, (size_t)tk_utf8_encode(lower[k], u));
            }
            i += (size_t)l;
        }
        return 0;
    }
    case NRM_PREPEND:
        if (n) tk_buf_put(out, nm->str, nm->slen);
        tk_buf_put(out, s, n);
        return 0;
    case NRM_REPLACE: {
        size_t pos = 0, b, e;
        tk_regex *re = (tk_regex *)&nm->pat;
        while (pos < n && tk_regex_find(re, s, n, pos, &b, &e)) {
            if (e == b) {   /* empty match: keep one character and go on */
                size_t step = 1;
                while (b + step < n && ((unsigned char)s[b + step] & 0xC0) == 0x80) step++;
                tk_buf_put(out, s + pos, b + step - pos);
                pos = b + step;
                continue;
            }
            tk_buf_put(out, s + pos, b - pos);
            tk_buf_put(out, nm->str, nm->slen);
            pos = e;
        }
        if (pos < n) tk_buf_put(out, s + pos, n - pos);
        return 0;
    }
    case NRM_STRIP: {
        size_t b = 0, e = n;
        int32_t cp;
        int l;
        if (nm->left)
            while (b < e && (l = tk_utf8_decode((const unsigned char *)s + b, e - b, &cp)) > 0 &&
                   tk_is_whitespace(cp))
                b += (size_t)l;
        if (nm->right)
            while (e > b) {
                size_t k = e - 1;
                while (k > b && ((unsigned char)s[k] & 0xC0) == 0x80) k--;
                if (tk_utf8_decode((const unsigned char *)s + k, e - k, &cp) <= 0 || !tk_is_whitespace(cp))
                    break;
                e = k;
            }
        tk_buf_put(out, s + b, e - b);
        return 0;
    }
    }
    return 0;
}

/* Apply the normalizer sequence to s[0..n) into out. */
int tk_normalize(const moe_tokenizer *t, const char *s, size_t n, tk_buf *out)
{
    out->n = 0;
    if (!t->nnorm) { tk_buf_put(out, s, n); return 0; }
    tk_buf tmp = {0};
    const char *cur = s;
    size_t cn = n;
    for (int i = 0; i < t->nnorm; i++) {
        tk_buf *dst = (i % 2 == t->nnorm % 2) ? &tmp : out;   /* last step writes `out` */
        if (nrm_one(&t->norm[i], cur, cn, dst) < 0) { free(tmp.p); return -1; }
        if (!dst->p) tk_buf_reserve(dst, 0);
        cur = dst->p; cn = dst->n;
    }
    free(tmp.p);
    return 0;
}

/* ---- pre-tokenizers ----------------------------------------------------- */

static void span_push(struct tk_spans *v, size_t b, size_t e, int m)
{
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 64;
        v->p = moe_realloc(v->p, v->cap * sizeof *v->p);
    }
    v->p[v->n].b = b; v->p[v->n].e = e; v->p[v->n].m = m;
    v->n++;
}

/* mt: match/non-match spans covering `piece`; push the pieces that the
 * behaviour keeps to `out` (as normalizer.rs NormalizedString::split). */
static void apply_behavior(struct tk_spans *mt, const struct tk_span *piece, int behavior, int invert,
                           struct tk_spans *out)
{
    struct tk_span *s = mt->p;
    size_t n = mt->n, k = 0;
    if (invert) for (size_t i = 0; i < n; i++) s[i].m = !s[i].m;
    switch (behavior) {
    case SPLIT_ISOLATED:
        for (size_t i = 0; i < n; i++) s[i].m = 0;
        k = n;
        break;
    case SPLIT_REMOVED:
        k = n;
        break;
    case SPLIT_CONTIGUOUS: {
        int prev = 0;
        for (size_t i = 0; i < n; i++) {
            int m = s[i].m;
            if (m == prev && k) s[k - 1].e = s[i].e;
            else { s[k] = s[i]; s[k].m = 0; k++; }
            prev = m;
        }
        break;
    }
    case SPLIT_MERGED_PREV: {
        int prev = 0;
        for (size_t i = 0; i < n; i++) {
            int m = s[i].m;
            if (m && !prev && k) s[k - 1].e = s[i].e;
            else { s[k] = s[i]; s[k].m = 0; k++; }
            prev = m;
        }
        break;
    }
    case SPLIT_MERGED_NEXT: {
        /* fold from the right, then the result is in reverse order */
        int prev = 0;
        size_t w = n;   /* write from the end downwards */
        for (size_t i = n; i-- > 0;) {
            int m = s[i].m;
            if (m && !prev && w < n) s[w].b = s[i].b;
            else { struct tk_span x = s[i]; x.m = 0; s[--w] = x; }
            prev = m;
        }
        memmove(s, s + w, (n - w) * sizeof *s);
        k = n - w;
        break;
    }
    }
    for (size_t i = 0; i < k; i++)
        if (!s[i].m && s[i].e > s[i].b) span_push(out, s[i].b, s[i].e, piece->m && s[i].b == piece->b);
}

/* Regex matches of r in piece as match/non-match spans into mt. */
static void regex_spans(moe_tokenizer *t, tk_regex *r, const struct tk_span *piece)
{
    const char *s = t->work.p + piece->b;
    size_t n = piece->e - piece->b, pos = 0, prev = 0, b, e;
    t->mt.n = 0;
    while (pos <= n && tk_regex_find(r, s, n, pos, &b, &e)) {
        if (prev != b) span_push(&t->mt, piece->b + prev, piece->b + b, 0);
        span_push(&t->mt, piece->b + b, piece->b + e, 1);
        prev = e;
        if (e > b) pos = e;
        else {   /* empty match: advance one character */
            if (b >= n) break;
            pos = b + 1;
            while (pos < n && ((unsigned char)s[pos] & 0xC0) == 0x80) pos++;
        }
    }
    if (prev != n) span_push(&t->mt, piece->b + prev, piece->e, 0);
}

/* Character-predicate matches: each matching char is its own match. */
static void char_spans(moe_tokenizer *t, int (*pred)(int32_t, const void *), const void *arg,
                       const struct tk_span *piece)
{
    const unsigned char *s = (const unsigned char *)t->work.p;
    size_t last = piece->b, i = piece->b;
    t->mt.n = 0;
    while (i < piece->e) {
        int32_t cp;
        int l = tk_utf8_decode(s + i, piece->e - i, &cp);
        if (l < 0) l = 1, cp = 0xFFFD;
        if (pred(cp, arg)) {
            if (last < i) span_push(&t->mt, last, i, 0);
            span_push(&t->mt, i, i + (size_t)l, 1);
            last = i + (size_t)l;
        }
        i += (size_t)l;
    }
    if (last < piece->e) span_push(&t->mt, last, piece->e, 0);
}

static int pred_numeric(int32_t cp, const void *arg) { (void)arg; return tk_is_numeric(cp); }
static int pred_ws(int32_t cp, const void *arg) { (void)arg; return tk_is_whitespace(cp); }
static int pred_eq(int32_t cp, const void *arg) { return cp == *(const int32_t *)arg; }

/* Copy piece content with a prefix into the end of work; returns new span. */
static struct tk_span append_piece(moe_tokenizer *t, const struct tk_span *p, const char *pre, size_t pl,
                                   const char *from, size_t fl, const char *to, size_t tl)
{
    struct tk_span r;
    size_t pb = p->b, pe = p->e;
    tk_buf_reserve(&t->work, pl + (pe - pb) * (tl > fl ? tl : 1) + 8);
    r.b = t->work.n;
    r.m = p->m;
    tk_buf_put(&t->work, pre, pl);
    for (size_t i = pb; i < pe;) {
        if (fl && i + fl <= pe && memcmp(t->work.p + i, from, fl) == 0) {
            tk_buf_put(&t->work, to, tl);
            i += fl;
        } else {
            tk_buf_putc(&t->work, t->work.p[i]);
            i++;
        }
    }
    r.e = t->work.n;
    return r;
}

static void pretok_step(moe_tokenizer *t, tk_pretok *pt, struct tk_span piece, struct tk_spans *out)
{
    switch (pt->type) {
    case PT_SPLIT:
        regex_spans(t, &pt->pat, &piece);
        apply_behavior(&t->mt, &piece, pt->behavior, pt->invert, out);
        return;
    case PT_DIGITS:
        char_spans(t, pred_numeric, NULL, &piece);
        apply_behavior(&t->mt, &piece, pt->individual ? SPLIT_ISOLATED : SPLIT_CONTIGUOUS, 0, out);
        return;
    case PT_WSPLIT:
        char_spans(t, pred_ws, NULL, &piece);
        apply_behavior(&t->mt, &piece, SPLIT_REMOVED, 0, out);
        return;
    case PT_BYTELEVEL:
        if (pt->add_prefix_space && (piece.e == piece.b || t->work.p[piece.b] != ' '))
            piece = append_piece(t, &piece, " ", 1, NULL, 0, NULL, 0);
        if (pt->use_regex) {
            regex_spans(t, &pt->pat, &piece);
            apply_behavior(&t->mt, &piece, SPLIT_ISOLATED, 0, out);
        } else if (piece.e > piece.b) {
            span_push(out, piece.b, piece.e, piece.m);
        }
        return;
    case PT_METASPACE: {
        piece = append_piece(t, &piece, NULL, 0, " ", 1, pt->repl, (size_t)pt->repl_len);
        int starts = (size_t)pt->repl_len <= piece.e - piece.b &&
                     memcmp(t->work.p + piece.b, pt->repl, (size_t)pt->repl_len) == 0;
        if (!starts && (pt->prepend == PREPEND_ALWAYS || (pt->prepend == PREPEND_FIRST && piece.m)))
            piece = append_piece(t, &piece, pt->repl, (size_t)pt->repl_len, NULL, 0, NULL, 0);
        if (pt->split) {
            int32_t cp;
            tk_utf8_decode((const unsigned char *)pt->repl, (size_t)pt->repl_len, &cp);
            char_spans(t, pred_eq, &cp, &piece);
            apply_behavior(&t->mt, &piece, SPLIT_MERGED_NEXT, 0, out);
        } else if (piece.e > piece.b) {
            span_push(out, piece.b, piece.e, piece.m);
        }
        return;
    }
    }
}

/* Pre-tokenize work[off..off+len) and run BPE on every resulting piece.
 * first: the piece starts at offset 0 of the original text. */
int tk_pretokenize(moe_tokenizer *t, size_t off, size_t len, int first)
{
    t->pa.n = 0;
    if (len) span_push(&t->pa, off, off + len, first);
    for (int i = 0; i < t->npre && t->pa.n; i++) {
        t->pb.n = 0;
        for (size_t j = 0; j < t->pa.n; j++) pretok_step(t, &t->pre[i], t->pa.p[j], &t->pb);
        struct tk_spans x = t->pa; t->pa = t->pb; t->pb = x;
    }
    for (size_t j = 0; j < t->pa.n; j++)
        tk_bpe_word(t, t->work.p + t->pa.p[j].b, t->pa.p[j].e - t->pa.p[j].b);
    return 0;
}

/* ---- decoders ------------------------------------------------------------- */

typedef struct { tk_buf s; size_t *off, *len; size_t n, cap; } tk_list;

static void list_add(tk_list *l, const char *p, size_t n)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 64;
        l->off = moe_realloc(l->off, l->cap * sizeof *l->off);
        l->len = moe_realloc(l->len, l->cap * sizeof *l->len);
    }
    l->off[l->n] = l->s.n;
    l->len[l->n] = n;
    tk_buf_put(&l->s, p, n);
    l->n++;
}

static void list_free(tk_list *l) { free(l->s.p); free(l->off); free(l->len); }

static int is_byte_token(const char *p, size_t n, unsigned *byte)
{
    if (n != 6 || p[0] != '<' || p[1] != '0' || p[2] != 'x' || p[5] != '>') return 0;
    unsigned v = 0;
    for (int i = 3; i < 5; i++) {
        char c = p[i];
        int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (d < 0) return 0;
        v = v * 16 + (unsigned)d;
    }
    *byte = v;
    return 1;
}

static void dec_one(const tk_dec *d, tk_list *in, tk_list *out, int raw)
{
    out->n = 0; out->s.n = 0;
    switch (d->type) {
    case DEC_BYTELEVEL: {
        tk_buf b = {0};
        for (size_t i = 0; i < in->n; i++) {
            const char *p = in->s.p + in->off[i];
            size_t n = in->len[i], j = 0, mark = b.n;
            int ok = 1;
            while (j < n) {
                int32_t cp;
                int l = tk_utf8_decode((const unsigned char *)p + j, n - j, &cp);
                int by = l > 0 ? tk_char_byte(cp) : -1;
                if (by < 0) { ok = 0; break; }
                tk_buf_putc(&b, (char)by);
                j += (size_t)l;
            }
            if (!ok) { b.n = mark; tk_buf_put(&b, p, n); }
        }
        list_add(out, b.p ? b.p : "", b.n);
        free(b.p);
        return;
    }
    case DEC_REPLACE:
        for (size_t i = 0; i < in->n; i++) {
            const char *p = in->s.p + in->off[i];
            size_t n = in->len[i];
            tk_buf b = {0};
            for (size_t j = 0; j < n;) {
                if (d->flen && j + d->flen <= n && memcmp(p + j, d->from, d->flen) == 0) {
                    tk_buf_put(&b, d->to, d->tlen);
                    j += d->flen;
                } else tk_buf_putc(&b, p[j++]);
            }
            list_add(out, b.p ? b.p : "", b.n);
            free(b.p);
        }
        return;
    case DEC_BYTEFALLBACK: {
        tk_buf run = {0};
        size_t nrun = 0;
        for (size_t i = 0; i <= in->n; i++) {
            unsigned by;
            if (i < in->n && is_byte_token(in->s.p + in->off[i], in->len[i], &by)) {
                tk_buf_putc(&run, (char)by);
                nrun++;
                continue;
            }
            if (nrun) {
                if (raw || moe_utf8_check(run.p, run.n) == run.n) list_add(out, run.p, run.n);
                else for (size_t k = 0; k < nrun; k++) list_add(out, "\xEF\xBF\xBD", 3);
                run.n = 0; nrun = 0;
            }
            if (i < in->n) list_add(out, in->s.p + in->off[i], in->len[i]);
        }
        free(run.p);
        return;
    }
    case DEC_FUSE: {
        tk_buf b = {0};
        for (size_t i = 0; i < in->n; i++) tk_buf_put(&b, in->s.p + in->off[i], in->len[i]);
        list_add(out, b.p ? b.p : "", b.n);
        free(b.p);
        return;
    }
    case DEC_STRIP:
        for (size_t i = 0; i < in->n; i++) {
            const char *p = in->s.p + in->off[i];
            size_t n = in->len[i], b = 0, e = n, c = d->clen;
            for (int k = 0; k < d->start && c && b + c <= e && memcmp(p + b, d->content, c) == 0; k++) b += c;
            for (int k = 0; k < d->stop && c && e >= b + c && memcmp(p + e - c, d->content, c) == 0; k++) e -= c;
            list_add(out, p + b, e - b);
        }
        return;
    case DEC_METASPACE:
        for (size_t i = 0; i < in->n; i++) {
            const char *p = in->s.p + in->off[i];
            size_t n = in->len[i], rl = (size_t)d->repl_len;
            tk_buf b = {0};
            for (size_t j = 0; j < n;) {
                if (j + rl <= n && memcmp(p + j, d->repl, rl) == 0) {
                    if (!(i == 0 && d->prepend != PREPEND_NEVER)) tk_buf_putc(&b, ' ');
                    j += rl;
                } else tk_buf_putc(&b, p[j++]);
            }
            list_add(out, b.p ? b.p : "", b.n);
            free(b.p);
        }
        return;
    }
}

int tk_decode_chain(const moe_tokenizer *t, char **tok, size_t *tlen, size_t ntok, int raw, tk_buf *out)
{
    tk_list a = {0}, b = {0};
    for (size_t i = 0; i < ntok; i++) list_add(&a, tok[i], tlen[i]);
    out->n = 0;
    if (!t->has_decoder) {
        for (size_t i = 0; i < a.n; i++) {
            if (i) tk_buf_putc(out, ' ');
            tk_buf_put(out, a.s.p + a.off[i], a.len[i]);
        }
    } else {
        for (int k = 0; k < t->ndec; k++) {
            dec_one(&t->dec[k], &a, &b, raw);
            tk_list x = a; a = b; b = x;
        }
        for (size_t i = 0; i < a.n; i++) tk_buf_put(out, a.s.p + a.off[i], a.len[i]);
    }
    list_free(&a);
    list_free(&b);
    if (!raw && out->n && moe_utf8_check(out->p, out->n) != out->n) {
        size_t n;
        char *fixed = moe_utf8_lossy(out->p, out->n, &n);
        out->n = 0;
        tk_buf_put(out, fixed, n);
        free(fixed);
    }
    tk_buf_reserve(out, 0);
    out->p[out->n] = 0;
    return 0;
}
