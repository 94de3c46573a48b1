/* evaldump.c - see evaldump.h */
#include "evaldump.h"

#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "records.h"

int moe_dump_parse_what(const char *s, moe_dump_opts *o) {
    o->hidden = o->logits = 0;
    const char *p = s;
    while (*p) {
        size_t n = strcspn(p, ",");
        if (n == 6 && !strncmp(p, "hidden", 6))
            o->hidden = 1;
        else if (n == 6 && !strncmp(p, "logits", 6))
            o->logits = 1;
        else {
            moe_error_set(MOE_ERR_DATA, "--dump: unknown item '%.*s' (expected hidden, logits)",
                          (int)n, p);
            return -1;
        }
        p += n;
        if (*p == ',') p++;
    }
    if (!o->hidden && !o->logits) {
        moe_error_set(MOE_ERR_DATA, "--dump: nothing to dump (expected hidden, logits or both)");
        return -1;
    }
    return 0;
}

/* A pending sequence: a deep copy of its tokens record and its ids. */
typedef struct {
    char *rec_bytes; /* packed record */
    size_t rec_len;
    int64_t index;
    int32_t *ids;
    int T;
} pending;

typedef struct {
    pending *p;
    int n, cap;
    size_t tokens;
    uint64_t bytes; /* of the dump arrays the batch will produce */
} batch;

static int flush(moe_model *m, batch *b, moe_writer *w, const moe_dump_opts *o) {
    const moe_config *c = moe_model_config(m);
    int L = c->num_layers, H = c->hidden_size, V = c->vocab_size;
    moe_seq *seqs = moe_calloc((size_t)b->n + 1, sizeof *seqs);
    int rc = 0;
    for (int i = 0; i < b->n; i++) {
        int T = b->p[i].T;
        seqs[i].ids = b->p[i].ids;
        seqs[i].T = T;
        seqs[i].hidden = o->hidden ? moe_malloc(sizeof(float) * (size_t)(L + 1) * T * H) : NULL;
        seqs[i].logits = o->logits ? moe_malloc(sizeof(float) * (size_t)T * V) : NULL;
    }
    if (b->n) rc = moe_model_forward(m, seqs, b->n, 0, NULL, NULL);
    for (int i = 0; i < b->n && rc == 0; i++) {
        /* pass the tokens record through, then its dump */
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        size_t off = 0;
        msgpack_unpack_next(&u, b->p[i].rec_bytes, b->p[i].rec_len, &off);
        rc = moe_writer_copy(w, &u.data);
        msgpack_unpacked_destroy(&u);
        if (rc < 0) break;
        int T = seqs[i].T;
        if ((rc = moe_dump_write(w, b->p[i].index, T, o->hidden ? seqs[i].hidden : NULL, L + 1, H,
                                 o->logits ? seqs[i].logits : NULL, V)) < 0)
            break;
    }
    for (int i = 0; i < b->n; i++) {
        free(seqs[i].hidden);
        free(seqs[i].logits);
        free(b->p[i].rec_bytes);
        free(b->p[i].ids);
    }
    free(seqs);
    b->n = 0;
    b->tokens = 0;
    b->bytes = 0;
    return rc;
}

/* Bytes of one sequence's dump arrays (hidden states, logits), or
 * UINT64_MAX when that does not fit in 64 bits. */
static uint64_t dump_bytes(const moe_config *c, const moe_dump_opts *o, int T) {
    uint64_t hidden = 0, logits = 0, total;
    if (o->hidden && (__builtin_mul_overflow((uint64_t)(c->num_layers + 1) * (uint64_t)T,
                                             (uint64_t)c->hidden_size * sizeof(float), &hidden)))
        return UINT64_MAX;
    if (o->logits &&
        __builtin_mul_overflow((uint64_t)T, (uint64_t)c->vocab_size * sizeof(float), &logits))
        return UINT64_MAX;
    return __builtin_add_overflow(hidden, logits, &total) ? UINT64_MAX : total;
}

int moe_eval_dump(moe_model *m, moe_reader *r, moe_writer *w, const moe_dump_opts *o) {
    size_t limit = o->batch_tokens ? o->batch_tokens : 2048;
    batch b = {0};
    const msgpack_object *rec;
    int rc, nr;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    while ((nr = moe_reader_next(r, &rec)) > 0) {
        if (!moe_record_is(rec, MOE_REC_TOKENS)) {
            /* other records keep their place: flush what comes before them */
            if (flush(m, &b, w, o) < 0 || moe_writer_copy(w, rec) < 0) goto fail;
            continue;
        }
        moe_tokens_check none = {{0}, 0, 0};
        moe_tokens tk;
        if (moe_tokens_read(r, rec, o->tokenizer ? o->tokenizer : &none, &tk) < 0) goto fail;
        if (tk.index < 0 && moe_record_int(r, rec, "index", &tk.index) < 0) { /* says what is missing */
            free(tk.ids);
            goto fail;
        }
        int T = (int)tk.n;
        if (o->max_length > 0 && T > o->max_length) T = o->max_length;
        /* One record per sequence: refuse one that no reader would accept
         * (and that would need that much memory here) before allocating. */
        uint64_t bytes = dump_bytes(moe_model_config(m), o, T);
        if (bytes > moe_stream_max_record()) {
            int gib = bytes >= ((uint64_t)1 << 30);
            moe_error_set(MOE_ERR_DATA,
                          "%s: record %llu: the dump of its %d tokens would be %.1f %s, more than "
                          "the %llu MiB a stream record may hold (use --max-length, or set "
                          "MOE_MAX_RECORD_MIB)",
                          moe_reader_name(r), (unsigned long long)moe_reader_index(r), T,
                          bytes / (gib ? 1073741824.0 : 1048576.0), gib ? "GiB" : "MiB",
                          (unsigned long long)(moe_stream_max_record() >> 20));
            free(tk.ids);
            goto fail;
        }
        pending p = {0};
        p.index = tk.index;
        p.T = T;
        p.ids = tk.ids;
        msgpack_sbuffer_clear(&sb);
        msgpack_packer pk;
        msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
        msgpack_pack_object(&pk, *rec);
        p.rec_bytes = moe_malloc(sb.size);
        memcpy(p.rec_bytes, sb.data, sb.size);
        p.rec_len = sb.size;
        /* a batch's dump arrays stay within one record limit too */
        if (b.n && (b.tokens + (size_t)T > limit || b.bytes + bytes > moe_stream_max_record()) &&
            flush(m, &b, w, o) < 0) {
            free(p.ids);
            free(p.rec_bytes);
            goto fail;
        }
        if (b.n == b.cap) {
            b.cap = b.cap ? 2 * b.cap : 16;
            b.p = moe_realloc(b.p, sizeof *b.p * (size_t)b.cap);
        }
        b.p[b.n++] = p;
        b.tokens += (size_t)T;
        b.bytes += bytes;
    }
    if (nr < 0 || flush(m, &b, w, o) < 0) goto fail;
    rc = 0;
    goto done;
fail:
    for (int i = 0; i < b.n; i++) {
        free(b.p[i].rec_bytes);
        free(b.p[i].ids);
    }
    rc = -1;
done:
    free(b.p);
    msgpack_sbuffer_destroy(&sb);
    return rc;
}
