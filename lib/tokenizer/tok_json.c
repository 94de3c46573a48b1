/* tok_json.c - fast loading of the two big parts of tokenizer.json
 * (model.vocab and model.merges) straight into the tokenizer's maps.
 * Building a jansson tree of 150k vocabulary entries and merges and freeing
 * it costs most of the load time; here the document is only scanned to find
 * the two values, which are then parsed without any tree.  The rest of the
 * file (a few KB) still goes through jansson, with the two values blanked. */
#include <stdlib.h>
#include <string.h>
#include "common.h"
#include "tok_internal.h"

typedef struct { const char *s; size_t n, i; } scan;

static void ws(scan *c)
{
    while (c->i < c->n && (c->s[c->i] == ' ' || c->s[c->i] == '\n' || c->s[c->i] == '\r' || c->s[c->i] == '\t'))
        c->i++;
}

static int hex4(const char *p, unsigned *v)
{
    *v = 0;
    for (int k = 0; k < 4; k++) {
        char h = p[k];
        int d = (h >= '0' && h <= '9') ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10
              : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : -1;
        if (d < 0) return -1;
        *v = *v * 16 + (unsigned)d;
    }
    return 0;
}

/* A string at c->i (the opening quote); unescaped into out when out != NULL. */
static int str(scan *c, tk_buf *out)
{
    if (c->i >= c->n || c->s[c->i] != '"') return -1;
    c->i++;
    if (out) out->n = 0;
    while (c->i < c->n) {
        size_t start = c->i;
        while (c->i < c->n && c->s[c->i] != '"' && c->s[c->i] != '\\') c->i++;
        if (out && c->i > start) tk_buf_put(out, c->s + start, c->i - start);
        if (c->i >= c->n) return -1;
        if (c->s[c->i] == '"') {
            c->i++;
            if (out) tk_buf_reserve(out, 0), out->p[out->n] = 0;
            return 0;
        }
        if (c->i + 1 >= c->n) return -1;   /* backslash */
        char e = c->s[c->i + 1], ch;
        c->i += 2;
        switch (e) {
        case '"': ch = '"'; break;
        case '\\': ch = '\\'; break;
        case '/': ch = '/'; break;
        case 'b': ch = '\b'; break;
        case 'f': ch = '\f'; break;
        case 'n': ch = '\n'; break;
        case 'r': ch = '\r'; break;
        case 't': ch = '\t'; break;
        case 'u': {
            unsigned v, lo;
            if (c->i + 4 > c->n || hex4(c->s + c->i, &v)) return -1;
            c->i += 4;
            if (v >= 0xD800 && v <= 0xDBFF) {   /* surrogate pair */
                if (c->i + 6 > c->n || c->s[c->i] != '\\' || c->s[c->i + 1] != 'u' ||
                    hex4(c->s + c->i + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                    return -1;
                c->i += 6;
                v = 0x10000 + ((v - 0xD800) << 10) + (lo - 0xDC00);
            } else if (v >= 0xDC00 && v <= 0xDFFF) {
                return -1;
            }
            if (out) {
                char u[4];
                tk_buf_put(out, u, (size_t)tk_utf8_encode((int32_t)v, u));
            }
            continue;
        }
        default: return -1;
        }
        if (out) tk_buf_putc(out, ch);
    }
    return -1;
}

static int skip_value(scan *c, int depth)
{
    ws(c);
    if (c->i >= c->n || depth > 200) return -1;
    char ch = c->s[c->i];
    if (ch == '"') return str(c, NULL);
    if (ch == '{' || ch == '[') {
        char close = ch == '{' ? '}' : ']';
        c->i++;
        ws(c);
        if (c->i < c->n && c->s[c->i] == close) { c->i++; return 0; }
        for (;;) {
            if (ch == '{') {
                ws(c);
                if (str(c, NULL) < 0) return -1;
                ws(c);
                if (c->i >= c->n || c->s[c->i] != ':') return -1;
                c->i++;
            }
            if (skip_value(c, depth + 1) < 0) return -1;
            ws(c);
            if (c->i >= c->n) return -1;
            if (c->s[c->i] == ',') { c->i++; continue; }
            if (c->s[c->i] == close) { c->i++; return 0; }
            return -1;
        }
    }
    /* number or literal */
    size_t st = c->i;
    while (c->i < c->n && !strchr(",]} \n\r\t", c->s[c->i])) c->i++;
    return c->i > st ? 0 : -1;
}

/* Find model.vocab and model.merges: their value spans [b, e), or b == e == 0. */
int tk_json_find_model(const char *s, size_t n, size_t span[4])
{
    memset(span, 0, 4 * sizeof *span);
    scan c = {s, n, 0};
    tk_buf key = {0};
    int rc = -1;
    ws(&c);
    if (c.i >= n || s[c.i] != '{') goto out;
    c.i++;
    for (;;) {
        ws(&c);
        if (c.i < n && s[c.i] == '}') { rc = 0; goto out; }
        if (str(&c, &key) < 0) goto out;
        ws(&c);
        if (c.i >= n || s[c.i] != ':') goto out;
        c.i++;
        ws(&c);
        if (key.n == 5 && !memcmp(key.p, "model", 5) && c.i < n && s[c.i] == '{') {
            c.i++;
            for (;;) {
                ws(&c);
                if (c.i < n && s[c.i] == '}') { c.i++; break; }
                if (str(&c, &key) < 0) goto out;
                ws(&c);
                if (c.i >= n || s[c.i] != ':') goto out;
                c.i++;
                ws(&c);
                size_t b = c.i;
                if (skip_value(&c, 1) < 0) goto out;
                if (key.n == 5 && !memcmp(key.p, "vocab", 5)) { span[0] = b; span[1] = c.i; }
                if (key.n == 6 && !memcmp(key.p, "merges", 6)) { span[2] = b; span[3] = c.i; }
                ws(&c);
                if (c.i < n && s[c.i] == ',') c.i++;
            }
        } else if (skip_value(&c, 0) < 0) {
            goto out;
        }
        ws(&c);
        if (c.i < n && s[c.i] == ',') { c.i++; continue; }
        if (c.i < n && s[c.i] == '}') { rc = 0; goto out; }
        goto out;
    }
out:
    free(key.p);
    return rc;
}

/* {"token": id, ...} */
int tk_json_vocab(moe_tokenizer *t, const char *s, size_t b, size_t e,
                  void (*add)(moe_tokenizer *, const char *, size_t, int32_t))
{
    scan c = {s, e, b};
    tk_buf key = {0};
    ws(&c);
    if (c.i >= e || s[c.i] != '{') goto bad;
    c.i++;
    ws(&c);
    if (c.i < e && s[c.i] == '}') { free(key.p); return 0; }
    for (;;) {
        ws(&c);
        if (str(&c, &key) < 0) goto bad;
        ws(&c);
        if (c.i >= e || s[c.i] != ':') goto bad;
        c.i++;
        ws(&c);
        long long v = 0;
        size_t st = c.i;
        while (c.i < e && s[c.i] >= '0' && s[c.i] <= '9' && v <= INT32_MAX) v = v * 10 + (s[c.i++] - '0');
        if (c.i == st || v > INT32_MAX - 1) goto bad;
        add(t, key.p, key.n, (int32_t)v);
        ws(&c);
        if (c.i < e && s[c.i] == ',') { c.i++; continue; }
        if (c.i < e && s[c.i] == '}') break;
        goto bad;
    }
    free(key.p);
    return 0;
bad:
    free(key.p);
    moe_error_set(MOE_ERR_DATA, "%s: model.vocab: bad entry near byte %zu", t->path, c.i);
    return -1;
}

/* ["a b", ...] or [["a", "b"], ...]; add() returns -1 to stop (error set). */
int tk_json_merges(moe_tokenizer *t, const char *s, size_t b, size_t e,
                   int (*add)(moe_tokenizer *, size_t, const char *, size_t, const char *, size_t, int))
{
    scan c = {s, e, b};
    tk_buf x = {0}, y = {0};
    size_t idx = 0;
    ws(&c);
    if (c.i >= e || s[c.i] != '[') goto bad;
    c.i++;
    ws(&c);
    if (c.i < e && s[c.i] == ']') goto done;
    for (;;) {
        ws(&c);
        if (c.i < e && s[c.i] == '"') {
            if (str(&c, &x) < 0) goto bad;
            if (add(t, idx, x.p, x.n, NULL, 0, 1) < 0) goto fail;
        } else if (c.i < e && s[c.i] == '[') {
            c.i++;
            ws(&c);
            if (str(&c, &x) < 0) goto bad;
            ws(&c);
            if (c.i >= e || s[c.i] != ',') goto bad;
            c.i++;
            ws(&c);
            if (str(&c, &y) < 0) goto bad;
            ws(&c);
            if (c.i >= e || s[c.i] != ']') goto bad;
            c.i++;
            if (add(t, idx, x.p, x.n, y.p, y.n, 0) < 0) goto fail;
        } else {
            goto bad;
        }
        idx++;
        ws(&c);
        if (c.i < e && s[c.i] == ',') { c.i++; continue; }
        if (c.i < e && s[c.i] == ']') break;
        goto bad;
    }
done:
    free(x.p); free(y.p);
    return 0;
bad:
    moe_error_set(MOE_ERR_DATA, "%s: merge %zu is neither \"a b\" nor [a, b]", t->path, idx);
fail:
    free(x.p); free(y.p);
    return -1;
}
