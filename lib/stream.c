/* stream.c - reading and writing moe-streams (zstd-compressed msgpack).
 * The format is specified in man/man5/moe-stream.5; keep the two in step. */
#define _GNU_SOURCE
#include "stream.h"
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "moe-stream typed arrays are little-endian; this host is not"
#endif


/* ---- msgpack object helpers --------------------------------------------- */

static int key_is(const msgpack_object *k, const char *key) {
    size_t n = strlen(key);
    return k->type == MSGPACK_OBJECT_STR && k->via.str.size == n && memcmp(k->via.str.ptr, key, n) == 0;
}

const msgpack_object *moe_map_get(const msgpack_object *map, const char *key) {
    if (!map || map->type != MSGPACK_OBJECT_MAP) return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++)
        if (key_is(&map->via.map.ptr[i].key, key)) return &map->via.map.ptr[i].val;
    return NULL;
}

int moe_obj_streq(const msgpack_object *o, const char *s) { return o && key_is(o, s); }

char *moe_obj_strdup(const msgpack_object *o) {
    if (!o || o->type != MSGPACK_OBJECT_STR) return NULL;
    char *s = moe_malloc(o->via.str.size + 1);
    memcpy(s, o->via.str.ptr, o->via.str.size);
    s[o->via.str.size] = 0;
    return s;
}

static int obj_int(const msgpack_object *o, int64_t *out) {
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
        if (o->via.u64 > INT64_MAX) return -1;
        *out = (int64_t)o->via.u64;
        return 0;
    }
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) { *out = o->via.i64; return 0; }
    return -1;
}

/* ---- typed arrays --------------------------------------------------------- */

int moe_array_parse(const msgpack_object *o, moe_array *a, const char *what) {
    if (!o || o->type != MSGPACK_OBJECT_MAP) {
        moe_error_set(MOE_ERR_DATA, "%s: not a typed array (expected a map with dtype, shape, data)", what);
        return -1;
    }
    const msgpack_object *dt = moe_map_get(o, "dtype"), *shape = moe_map_get(o, "shape"),
                         *data = moe_map_get(o, "data");
    if (!dt || dt->type != MSGPACK_OBJECT_STR) {
        moe_error_set(MOE_ERR_DATA, "%s: typed array without a 'dtype' string", what);
        return -1;
    }
    int d = moe_dtype_from_name(dt->via.str.ptr, dt->via.str.size);
    if (d < 0) {
        moe_error_set(MOE_ERR_DATA, "%s: unknown dtype '%.*s'", what, (int)dt->via.str.size, dt->via.str.ptr);
        return -1;
    }
    if (!shape || shape->type != MSGPACK_OBJECT_ARRAY || shape->via.array.size > MOE_MAX_DIMS) {
        moe_error_set(MOE_ERR_DATA, "%s: typed array without a 'shape' list of at most %d sizes", what, MOE_MAX_DIMS);
        return -1;
    }
    if (!data || data->type != MSGPACK_OBJECT_BIN) {
        moe_error_set(MOE_ERR_DATA, "%s: typed array without 'data' bytes (msgpack bin)", what);
        return -1;
    }
    a->dtype = (moe_dtype)d;
    a->ndim = (int)shape->via.array.size;
    a->count = 1;
    for (int i = 0; i < a->ndim; i++) {
        int64_t v;
        if (obj_int(&shape->via.array.ptr[i], &v) || v < 0 || v > ((int64_t)1 << 40)) {
            moe_error_set(MOE_ERR_DATA, "%s: shape entry %d is not a size", what, i);
            return -1;
        }
        a->shape[i] = v;
        if (__builtin_mul_overflow(a->count, v, &a->count)) {
            moe_error_set(MOE_ERR_DATA, "%s: shape too large", what);
            return -1;
        }
    }
    /* Readers index elements with int: a typed array holds at most 2^31-1
     * elements (checked before the byte size is computed). */
    if (a->count > INT32_MAX) {
        moe_error_set(MOE_ERR_DATA, "%s: shape too large (%lld elements; at most 2^31-1)", what,
                      (long long)a->count);
        return -1;
    }
    /* With at most 2^31-1 elements of at most 8 bytes the byte size cannot
     * wrap (it once did: shape [2^40, 2^22] of i32 is 2^64 bytes, taken for 0,
     * and every conversion then wrote past its buffer). */
    size_t need = (size_t)a->count * moe_dtype_size(d);
    if (data->via.bin.size != need) {
        char shp[160] = "";
        size_t n = 0;
        for (int i = 0; i < a->ndim && n < sizeof shp - 24; i++)
            n += snprintf(shp + n, sizeof shp - n, "%s%lld", i ? "," : "", (long long)a->shape[i]);
        moe_error_set(MOE_ERR_DATA, "%s: data is %u bytes but shape [%s] of %s needs %zu",
                      what, data->via.bin.size, shp, moe_dtype_name(d), need);
        return -1;
    }
    a->data = data->via.bin.ptr;
    a->nbytes = need;
    return 0;
}

void moe_array_to_f32(const moe_array *a, float *dst) {
    const unsigned char *p = a->data;
    for (int64_t i = 0; i < a->count; i++) {
        switch (a->dtype) {
        case MOE_DT_F32: memcpy(&dst[i], p + 4 * i, 4); break;
        case MOE_DT_F64: { double d; memcpy(&d, p + 8 * i, 8); dst[i] = (float)d; break; }
        case MOE_DT_F16: { uint16_t h; memcpy(&h, p + 2 * i, 2); dst[i] = moe_f16_to_f32(h); break; }
        case MOE_DT_BF16: { uint16_t h; memcpy(&h, p + 2 * i, 2); dst[i] = moe_bf16_to_f32(h); break; }
        case MOE_DT_I8: dst[i] = (float)(int8_t)p[i]; break;
        case MOE_DT_U8: dst[i] = (float)p[i]; break;
        case MOE_DT_I32: { int32_t v; memcpy(&v, p + 4 * i, 4); dst[i] = (float)v; break; }
        case MOE_DT_U32: { uint32_t v; memcpy(&v, p + 4 * i, 4); dst[i] = (float)v; break; }
        case MOE_DT_I64: { int64_t v; memcpy(&v, p + 8 * i, 8); dst[i] = (float)v; break; }
        default: dst[i] = NAN;
        }
    }
}

int moe_array_to_i32(const moe_array *a, int32_t *dst) {
    const unsigned char *p = a->data;
    for (int64_t i = 0; i < a->count; i++) {
        int64_t v;
        switch (a->dtype) {
        case MOE_DT_I8: v = (int8_t)p[i]; break;
        case MOE_DT_U8: v = p[i]; break;
        case MOE_DT_I32: { int32_t x; memcpy(&x, p + 4 * i, 4); v = x; break; }
        case MOE_DT_U32: { uint32_t x; memcpy(&x, p + 4 * i, 4); v = x; break; }
        case MOE_DT_I64: memcpy(&v, p + 8 * i, 8); break;
        default:
            moe_error_set(MOE_ERR_DATA, "typed array of %s where integers are expected", moe_dtype_name(a->dtype));
            return -1;
        }
        if (v < INT32_MIN || v > INT32_MAX) {
            moe_error_set(MOE_ERR_DATA, "typed array value %lld does not fit in int32", (long long)v);
            return -1;
        }
        dst[i] = (int32_t)v;
    }
    return 0;
}

/* ---- packing -------------------------------------------------------------- */

void moe_pack_str(msgpack_packer *pk, const char *s) {
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

void moe_pack_array(msgpack_packer *pk, moe_dtype dt, int ndim, const int64_t *shape, const void *data) {
    size_t count = 1;
    msgpack_pack_map(pk, 3);
    moe_pack_str(pk, "dtype");
    moe_pack_str(pk, moe_dtype_name(dt));
    moe_pack_str(pk, "shape");
    msgpack_pack_array(pk, ndim);
    for (int i = 0; i < ndim; i++) {
        msgpack_pack_int64(pk, shape[i]);
        count *= (size_t)shape[i];
    }
    moe_pack_str(pk, "data");
    size_t n = count * moe_dtype_size(dt);
    msgpack_pack_bin(pk, n);
    msgpack_pack_bin_body(pk, data, n);
}

void moe_pack_kv_str(msgpack_packer *pk, const char *key, const char *val) {
    moe_pack_str(pk, key);
    moe_pack_str(pk, val);
}
void moe_pack_kv_int(msgpack_packer *pk, const char *key, int64_t val) {
    moe_pack_str(pk, key);
    msgpack_pack_int64(pk, val);
}
void moe_pack_kv_double(msgpack_packer *pk, const char *key, double val) {
    moe_pack_str(pk, key);
    msgpack_pack_double(pk, val);
}
void moe_pack_kv_array(msgpack_packer *pk, const char *key, moe_dtype dt, int ndim,
                       const int64_t *shape, const void *data) {
    moe_pack_str(pk, key);
    moe_pack_array(pk, dt, ndim, shape, data);
}

/* ---- reading -------------------------------------------------------------- */

#define IN_CHUNK (1 << 17)
#define OUT_CHUNK (1 << 18)

/* ---- record size guard ----------------------------------------------------- *
 * msgpack-c buffers a whole top-level object (a record) before returning it,
 * and allocates an array's or map's element table as soon as it reads the
 * size in its header.  A few kilobytes of zstd can declare gigabytes either
 * way (a bin of a gigabyte of zeros, an array of 2^30 elements), so the
 * reader scans the decompressed bytes before msgpack-c sees them and refuses
 * an object whose declared memory (payload bytes, plus one msgpack_object per
 * declared element) exceeds the record limit.  The scan keeps only counters:
 * items still owed to the current top-level object, and the progress through
 * a length field or a payload. */
#define DEFAULT_MAX_RECORD_MIB 1024

typedef struct {
    uint64_t remaining;  /* items the current top-level object still owes */
    uint64_t skip;       /* payload bytes to pass over */
    uint64_t len;        /* length field being assembled */
    int len_need;        /* its bytes still to come (0: none pending) */
    int len_kind;        /* what the length counts: 'p' payload, 'a' array, 'm' map, 'e' ext */
    int in_object;
    uint64_t cost;       /* declared memory of the current object */
    uint64_t objects;    /* complete top-level objects so far (0 = the header) */
} size_guard;

uint64_t moe_stream_max_record(void) {
    static uint64_t cached;
    if (!cached) {
        const char *e = getenv("MOE_MAX_RECORD_MIB");
        char *end;
        unsigned long long mib = e ? strtoull(e, &end, 10) : 0;
        if (!e || end == e || *end || mib == 0 || mib > (1ull << 24)) mib = DEFAULT_MAX_RECORD_MIB;
        cached = (uint64_t)mib << 20;
    }
    return cached;
}

/* A length field (big-endian, `n` bytes) counting `kind` follows. */
static void guard_expect_len(size_guard *g, int n, int kind) {
    g->len_need = n;
    g->len = 0;
    g->len_kind = kind;
}

static void guard_apply_len(size_guard *g) {
    uint64_t n = g->len;
    switch (g->len_kind) {
    case 'p': g->skip = n; g->cost += n; break;
    case 'e': g->skip = n + 1; g->cost += n + 1; break; /* ext: a type byte, then the payload */
    case 'a': g->remaining += n; g->cost += n * sizeof(msgpack_object); break;
    case 'm': g->remaining += 2 * n; g->cost += n * sizeof(msgpack_object_kv); break;
    }
}

/* The header byte of one msgpack value. */
static void guard_value(size_guard *g, unsigned c) {
    static const unsigned char fixed_size[16] = {/* 0xc0..0xcf */ 0, 0, 0, 0, 0, 0, 0, 0,
                                                 0, 0, 4, 8, 1, 2, 4, 8};
    if (c <= 0x7f || c >= 0xe0) return;                         /* fixint */
    if (c <= 0x8f) { guard_expect_len(g, 0, 'm'); g->len = c & 0x0f; guard_apply_len(g); return; }
    if (c <= 0x9f) { guard_expect_len(g, 0, 'a'); g->len = c & 0x0f; guard_apply_len(g); return; }
    if (c <= 0xbf) { g->skip = c & 0x1f; g->cost += g->skip; return; } /* fixstr */
    switch (c) {
    case 0xc4: case 0xd9: guard_expect_len(g, 1, 'p'); return;  /* bin8, str8 */
    case 0xc5: case 0xda: guard_expect_len(g, 2, 'p'); return;
    case 0xc6: case 0xdb: guard_expect_len(g, 4, 'p'); return;
    case 0xc7: guard_expect_len(g, 1, 'e'); return;
    case 0xc8: guard_expect_len(g, 2, 'e'); return;
    case 0xc9: guard_expect_len(g, 4, 'e'); return;
    case 0xd0: g->skip = 1; return;
    case 0xd1: g->skip = 2; return;
    case 0xd2: g->skip = 4; return;
    case 0xd3: g->skip = 8; return;
    case 0xd4: g->skip = 2; return;                              /* fixext: type + 1..16 */
    case 0xd5: g->skip = 3; return;
    case 0xd6: g->skip = 5; return;
    case 0xd7: g->skip = 9; return;
    case 0xd8: g->skip = 17; return;
    case 0xdc: guard_expect_len(g, 2, 'a'); return;
    case 0xdd: guard_expect_len(g, 4, 'a'); return;
    case 0xde: guard_expect_len(g, 2, 'm'); return;
    case 0xdf: guard_expect_len(g, 4, 'm'); return;
    default: g->skip = c <= 0xcf ? fixed_size[c - 0xc0] : 0; /* nil, bool, float, uint; 0xc1 is
                                                                 msgpack-c's to reject */
    }
}

/* Scan decompressed bytes; -1 (error set) when an object grows too large. */
static int guard_scan(size_guard *g, const unsigned char *p, size_t n, const char *name) {
    size_t i = 0;
    while (i < n) {
        if (g->skip) {
            size_t k = g->skip < n - i ? (size_t)g->skip : n - i;
            g->skip -= k;
            i += k;
        } else if (g->len_need) {
            g->len = g->len << 8 | p[i++];
            if (--g->len_need == 0) guard_apply_len(g);
        } else {
            if (!g->in_object) {
                g->in_object = 1;
                g->remaining = 1;
                g->cost = sizeof(msgpack_object);
            }
            g->remaining--;
            guard_value(g, p[i++]);
        }
        if (g->cost > moe_stream_max_record()) {
            char what[48];
            if (g->objects) snprintf(what, sizeof what, "record %llu", (unsigned long long)g->objects - 1);
            else snprintf(what, sizeof what, "the header");
            moe_error_set(MOE_ERR_DATA,
                          "%s: %s needs more than %llu MiB of memory (the limit for one record; "
                          "MOE_MAX_RECORD_MIB raises it)",
                          name, what, (unsigned long long)(moe_stream_max_record() >> 20));
            return -1;
        }
        if (g->in_object && !g->remaining && !g->skip && !g->len_need) {
            g->in_object = 0;
            g->objects++;
        }
    }
    return 0;
}

struct moe_reader {
    char *name;          /* as shown in messages */
    size_guard guard;
    int fd, owns_fd;
    ZSTD_DCtx *dctx;
    unsigned char *in;
    ZSTD_inBuffer inb;
    size_t frame_left;   /* last ZSTD_decompressStream result: 0 = at a frame boundary */
    int eof;
    msgpack_unpacker up;
    msgpack_unpacked header, rec;
    uint64_t nrecords;   /* records returned so far */
    int finished;        /* end record seen and verified */
};

const char *moe_reader_name(const moe_reader *r) { return r->name; }
const msgpack_object *moe_reader_header(const moe_reader *r) { return &r->header.data; }
uint64_t moe_reader_index(const moe_reader *r) { return r->nrecords ? r->nrecords - 1 : 0; }
uint64_t moe_reader_count(const moe_reader *r) { return r->nrecords; }

/* Read more compressed bytes; 1 got some, 0 end of file, -1 error. */
static int fill_input(moe_reader *r) {
    if (r->eof) return 0;
    ssize_t n;
    do n = read(r->fd, r->in, IN_CHUNK); while (n < 0 && errno == EINTR);
    if (n < 0) {
        moe_error_set(MOE_ERR_IO, "%s: read error: %s", r->name, strerror(errno));
        return -1;
    }
    if (n == 0) { r->eof = 1; return 0; }
    r->inb.src = r->in;
    r->inb.size = (size_t)n;
    r->inb.pos = 0;
    return 1;
}

/* Decompress more bytes into the msgpack buffer: 1 produced some, 0 clean
 * end of input (all frames complete), -1 error. */
static int decompress_more(moe_reader *r) {
    for (;;) {
        if (r->inb.pos == r->inb.size) {
            int f = fill_input(r);
            if (f < 0) return -1;
            if (f == 0) {
                if (r->frame_left != 0) {
                    moe_error_set(MOE_ERR_DATA, "%s: truncated stream (zstd frame ends early)", r->name);
                    return -1;
                }
                return 0;
            }
        }
        if (!msgpack_unpacker_reserve_buffer(&r->up, OUT_CHUNK)) {
            moe_error_set(MOE_ERR_DATA, "%s: out of memory while decoding", r->name);
            return -1;
        }
        ZSTD_outBuffer out = {msgpack_unpacker_buffer(&r->up), msgpack_unpacker_buffer_capacity(&r->up), 0};
        size_t ret = ZSTD_decompressStream(r->dctx, &out, &r->inb);
        if (ZSTD_isError(ret)) {
            moe_error_set(MOE_ERR_DATA, "%s: corrupt stream (zstd: %s)", r->name, ZSTD_getErrorName(ret));
            return -1;
        }
        r->frame_left = ret;
        if (guard_scan(&r->guard, out.dst, out.pos, r->name) < 0) return -1;
        msgpack_unpacker_buffer_consumed(&r->up, out.pos);
        if (out.pos > 0) return 1;
    }
}

/* Next msgpack object into `u`: 1 ok, 0 clean end of data, -1 error. */
static int next_object(moe_reader *r, msgpack_unpacked *u) {
    for (;;) {
        msgpack_unpack_return ret = msgpack_unpacker_next(&r->up, u);
        if (ret == MSGPACK_UNPACK_SUCCESS) return 1;
        if (ret == MSGPACK_UNPACK_PARSE_ERROR) {
            moe_error_set(MOE_ERR_DATA, "%s: corrupt stream (not valid msgpack after %llu records)",
                          r->name, (unsigned long long)r->nrecords);
            return -1;
        }
        if (ret == MSGPACK_UNPACK_NOMEM_ERROR) {
            moe_error_set(MOE_ERR_DATA, "%s: out of memory while decoding", r->name);
            return -1;
        }
        int d = decompress_more(r);
        if (d < 0) return -1;
        if (d == 0) {
            if (r->up.used > r->up.off) {
                moe_error_set(MOE_ERR_DATA, "%s: truncated stream (incomplete record at end)", r->name);
                return -1;
            }
            return 0;
        }
    }
}

static int check_header(moe_reader *r) {
    const msgpack_object *h = &r->header.data;
    if (h->type != MSGPACK_OBJECT_MAP) {
        moe_error_set(MOE_ERR_DATA, "%s: not a moe-stream (first object is not a header map)", r->name);
        return -1;
    }
    const msgpack_object *fmt = moe_map_get(h, "format"), *ver = moe_map_get(h, "version");
    if (!moe_obj_streq(fmt, MOE_STREAM_FORMAT)) {
        if (fmt && fmt->type == MSGPACK_OBJECT_STR)
            moe_error_set(MOE_ERR_DATA, "%s: not a moe-stream (format '%.*s')", r->name,
                          (int)fmt->via.str.size, fmt->via.str.ptr);
        else
            moe_error_set(MOE_ERR_DATA, "%s: not a moe-stream (header has no format name)", r->name);
        return -1;
    }
    int64_t v;
    if (!ver || obj_int(ver, &v)) {
        moe_error_set(MOE_ERR_DATA, "%s: header has no version", r->name);
        return -1;
    }
    if (v > MOE_STREAM_VERSION || v < 1) {
        moe_error_set(MOE_ERR_DATA, "%s: stream version %lld is not supported (this tool reads version %d%s)",
                      r->name, (long long)v, MOE_STREAM_VERSION, v > MOE_STREAM_VERSION ? "; upgrade cdmoe" : "");
        return -1;
    }
    const msgpack_object *kinds = moe_map_get(h, "kinds"), *prov = moe_map_get(h, "provenance");
    if (!kinds || kinds->type != MSGPACK_OBJECT_ARRAY || (prov && prov->type != MSGPACK_OBJECT_ARRAY)) {
        moe_error_set(MOE_ERR_DATA, "%s: malformed header (kinds must be a list%s)", r->name,
                      prov ? ", provenance a list" : "");
        return -1;
    }
    return 0;
}

moe_reader *moe_reader_open(const char *path) {
    moe_reader *r = moe_calloc(1, sizeof *r);
    int is_stdin = strcmp(path, "-") == 0;
    r->name = moe_strdup(is_stdin ? "<stdin>" : path);
    if (is_stdin) r->fd = 0;
    else {
        r->fd = open(path, O_RDONLY | O_CLOEXEC);
        if (r->fd < 0) {
            moe_error_set(MOE_ERR_IO, "%s: %s", path, strerror(errno));
            free(r->name);
            free(r);
            return NULL;
        }
        r->owns_fd = 1;
    }
    r->in = moe_malloc(IN_CHUNK);
    r->dctx = ZSTD_createDCtx();
    msgpack_unpacker_init(&r->up, OUT_CHUNK);
    msgpack_unpacked_init(&r->header);
    msgpack_unpacked_init(&r->rec);

    /* Look at the first bytes for a clear message on empty / non-zstd input. */
    int f = fill_input(r);
    if (f < 0) goto fail;
    if (f == 0) {
        moe_error_set(MOE_ERR_DATA, "%s: empty input (expected a moe-stream)", r->name);
        goto fail;
    }
    static const unsigned char magic[4] = {0x28, 0xb5, 0x2f, 0xfd};
    if (r->inb.size < 4 || memcmp(r->in, magic, 4) != 0) {
        moe_error_set(MOE_ERR_DATA, "%s: not a moe-stream (not zstd-compressed)", r->name);
        goto fail;
    }
    int n = next_object(r, &r->header);
    if (n < 0) goto fail;
    if (n == 0) {
        moe_error_set(MOE_ERR_DATA, "%s: empty stream (no header)", r->name);
        goto fail;
    }
    if (check_header(r) < 0) goto fail;
    return r;
fail:
    moe_reader_close(r);
    return NULL;
}

const char *moe_record_type(const msgpack_object *rec) {
    const msgpack_object *t = moe_map_get(rec, "type");
    return t && t->type == MSGPACK_OBJECT_STR ? t->via.str.ptr : "";
}

size_t moe_record_type_len(const msgpack_object *rec) {
    const msgpack_object *t = moe_map_get(rec, "type");
    return t && t->type == MSGPACK_OBJECT_STR ? t->via.str.size : 0;
}

int moe_record_is(const msgpack_object *rec, const char *type) {
    return moe_obj_streq(moe_map_get(rec, "type"), type);
}

/* After the end record: nothing may follow, and every frame must complete
 * (which also verifies the last frame's checksum). */
static int verify_tail(moe_reader *r) {
    msgpack_unpacked extra;
    msgpack_unpacked_init(&extra);
    int n = next_object(r, &extra);
    msgpack_unpacked_destroy(&extra);
    if (n < 0) return -1;
    if (n > 0) {
        moe_error_set(MOE_ERR_DATA, "%s: data after the end record", r->name);
        return -1;
    }
    return 0;
}

/* Every typed array in a record (found by its "dtype" key, up to a few
 * levels deep) must be consistent, so that no tool passes a damaged array on. */
static int check_arrays(moe_reader *r, const msgpack_object *o, int depth) {
    if (depth > 4) return 0;
    if (o->type == MSGPACK_OBJECT_MAP) {
        if (depth > 0 && moe_map_get(o, "dtype")) {
            moe_array a;
            char what[200];
            snprintf(what, sizeof what, "%s: record %llu", r->name, (unsigned long long)r->nrecords);
            return moe_array_parse(o, &a, what);
        }
        for (uint32_t i = 0; i < o->via.map.size; i++)
            if (check_arrays(r, &o->via.map.ptr[i].val, depth + 1) < 0) return -1;
    } else if (o->type == MSGPACK_OBJECT_ARRAY) {
        for (uint32_t i = 0; i < o->via.array.size; i++)
            if (check_arrays(r, &o->via.array.ptr[i], depth + 1) < 0) return -1;
    }
    return 0;
}

int moe_reader_next(moe_reader *r, const msgpack_object **rec) {
    if (r->finished) return 0;
    int n = next_object(r, &r->rec);
    if (n < 0) return -1;
    if (n == 0) {
        moe_error_set(MOE_ERR_DATA, "%s: truncated stream (no end record after %llu records)", r->name,
                      (unsigned long long)r->nrecords);
        return -1;
    }
    const msgpack_object *o = &r->rec.data;
    const msgpack_object *type = moe_map_get(o, "type");
    if (o->type != MSGPACK_OBJECT_MAP || !type || type->type != MSGPACK_OBJECT_STR) {
        moe_error_set(MOE_ERR_DATA, "%s: record %llu: not a map with a 'type' string", r->name,
                      (unsigned long long)r->nrecords);
        return -1;
    }
    if (moe_obj_streq(type, "end")) {
        int64_t count;
        const msgpack_object *c = moe_map_get(o, "records");
        if (!c || obj_int(c, &count)) {
            moe_error_set(MOE_ERR_DATA, "%s: end record without a record count", r->name);
            return -1;
        }
        if ((uint64_t)count != r->nrecords) {
            moe_error_set(MOE_ERR_DATA, "%s: end record counts %lld records but %llu were read", r->name,
                          (long long)count, (unsigned long long)r->nrecords);
            return -1;
        }
        if (verify_tail(r) < 0) return -1;
        r->finished = 1;
        return 0;
    }
    if (check_arrays(r, o, 0) < 0) return -1;
    r->nrecords++;
    *rec = o;
    return 1;
}

void moe_reader_close(moe_reader *r) {
    if (!r) return;
    msgpack_unpacked_destroy(&r->rec);
    msgpack_unpacked_destroy(&r->header);
    msgpack_unpacker_destroy(&r->up);
    ZSTD_freeDCtx(r->dctx);
    if (r->owns_fd) close(r->fd);
    free(r->in);
    free(r->name);
    free(r);
}

/* Accessors name the stream, the record and the key in their errors. */
static const msgpack_object *record_key(moe_reader *r, const msgpack_object *rec, const char *key) {
    const msgpack_object *v = moe_map_get(rec, key);
    if (!v)
        moe_error_set(MOE_ERR_DATA, "%s: record %llu (%.*s): missing key '%s'", r->name,
                      (unsigned long long)moe_reader_index(r), (int)moe_record_type_len(rec),
                      moe_record_type(rec), key);
    return v;
}

static int bad_key(moe_reader *r, const msgpack_object *rec, const char *key, const char *want) {
    moe_error_set(MOE_ERR_DATA, "%s: record %llu (%.*s): key '%s' is not %s", r->name,
                  (unsigned long long)moe_reader_index(r), (int)moe_record_type_len(rec),
                  moe_record_type(rec), key, want);
    return -1;
}

int moe_record_int(moe_reader *r, const msgpack_object *rec, const char *key, int64_t *out) {
    const msgpack_object *v = record_key(r, rec, key);
    if (!v) return -1;
    if (obj_int(v, out)) return bad_key(r, rec, key, "an integer");
    return 0;
}

int moe_record_str(moe_reader *r, const msgpack_object *rec, const char *key, const char **s, size_t *len) {
    const msgpack_object *v = record_key(r, rec, key);
    if (!v) return -1;
    if (v->type != MSGPACK_OBJECT_STR) return bad_key(r, rec, key, "a string");
    *s = v->via.str.ptr;
    *len = v->via.str.size;
    return 0;
}

int moe_record_array(moe_reader *r, const msgpack_object *rec, const char *key, moe_array *out) {
    const msgpack_object *v = record_key(r, rec, key);
    if (!v) return -1;
    char what[256];
    snprintf(what, sizeof what, "%s: record %llu (%.*s): key '%s'", r->name,
             (unsigned long long)moe_reader_index(r), (int)moe_record_type_len(rec), moe_record_type(rec), key);
    return moe_array_parse(v, out, what);
}

/* ---- header queries -------------------------------------------------------- */

int moe_header_has_kind(const msgpack_object *hdr, const char *kind) {
    const msgpack_object *kinds = moe_map_get(hdr, "kinds");
    if (!kinds || kinds->type != MSGPACK_OBJECT_ARRAY) return 0;
    for (uint32_t i = 0; i < kinds->via.array.size; i++)
        if (moe_obj_streq(&kinds->via.array.ptr[i], kind)) return 1;
    return 0;
}

int moe_reader_require_kind(moe_reader *r, const char *kind, const char *hint) {
    const msgpack_object *hdr = &r->header.data;
    if (moe_header_has_kind(hdr, kind)) return 0;
    char list[256] = "";
    size_t n = 0;
    const msgpack_object *kinds = moe_map_get(hdr, "kinds");
    for (uint32_t i = 0; kinds && i < kinds->via.array.size && n < sizeof list - 40; i++) {
        const msgpack_object *k = &kinds->via.array.ptr[i];
        if (k->type == MSGPACK_OBJECT_STR)
            n += snprintf(list + n, sizeof list - n, "%s%.*s", n ? ", " : "", (int)k->via.str.size, k->via.str.ptr);
    }
    moe_error_set(MOE_ERR_DATA, "%s: stream has kinds [%s] but '%s' is needed%s%s%s", r->name, list, kind,
                  hint ? " (" : "", hint ? hint : "", hint ? ")" : "");
    return -1;
}

int moe_reader_check_model(moe_reader *r, const char *fingerprint, int force) {
    const msgpack_object *prov = moe_map_get(&r->header.data, "provenance");
    if (!prov || prov->type != MSGPACK_OBJECT_ARRAY) return 0;
    for (uint32_t i = 0; i < prov->via.array.size; i++) {
        const msgpack_object *e = &prov->via.array.ptr[i];
        const msgpack_object *m = moe_map_get(e, "model"), *tool = moe_map_get(e, "tool");
        if (!m || m->type != MSGPACK_OBJECT_STR) continue;
        if (m->via.str.size == strlen(fingerprint) && memcmp(m->via.str.ptr, fingerprint, m->via.str.size) == 0)
            continue;
        int tl = tool && tool->type == MSGPACK_OBJECT_STR ? (int)tool->via.str.size : 1;
        const char *tp = tool && tool->type == MSGPACK_OBJECT_STR ? tool->via.str.ptr : "?";
        char msg[512];
        snprintf(msg, sizeof msg, "%s: stream was made by %.*s with model %.*s, but this model is %s", r->name,
                 tl, tp, (int)m->via.str.size, m->via.str.ptr, fingerprint);
        if (force) {
            moe_warn("%s (continuing: --force)", msg);
            return 0;
        }
        moe_error_set(MOE_ERR_DATA, "%s; use --force to override", msg);
        return -1;
    }
    return 0;
}

/* ---- writing -------------------------------------------------------------- */

#define PACK_BUF (1 << 16)

struct moe_writer {
    moe_output out_file;      /* fd, name, and the temporary it is written under */
    ZSTD_CCtx *cctx;
    unsigned char *pending;   /* packed msgpack bytes waiting for compression */
    size_t npending;
    unsigned char *out;
    size_t out_cap;
    msgpack_packer pk;
    uint64_t count;
    int failed;
};

static int write_all(moe_writer *w, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t k = write(w->out_file.fd, p, n);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) {
            if (!w->failed) moe_error_set(MOE_ERR_IO, "%s: write error: %s", w->out_file.name, strerror(errno));
            w->failed = 1;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int compress_pending(moe_writer *w, ZSTD_EndDirective mode) {
    ZSTD_inBuffer in = {w->pending, w->npending, 0};
    for (;;) {
        ZSTD_outBuffer out = {w->out, w->out_cap, 0};
        size_t left = ZSTD_compressStream2(w->cctx, &out, &in, mode);
        if (ZSTD_isError(left)) {
            if (!w->failed) moe_error_set(MOE_ERR_DATA, "%s: zstd: %s", w->out_file.name, ZSTD_getErrorName(left));
            w->failed = 1;
            return -1;
        }
        if (out.pos && write_all(w, w->out, out.pos) < 0) return -1;
        if (mode == ZSTD_e_continue ? in.pos == in.size : left == 0) break;
    }
    w->npending = 0;
    return 0;
}

/* msgpack packer sink: collect into a buffer, compress when it fills. */
static int writer_sink(void *data, const char *buf, size_t len) {
    moe_writer *w = data;
    if (w->failed) return -1;
    while (len) {
        size_t room = PACK_BUF - w->npending, n = len < room ? len : room;
        memcpy(w->pending + w->npending, buf, n);
        w->npending += n;
        buf += n;
        len -= n;
        if (w->npending == PACK_BUF && compress_pending(w, ZSTD_e_continue) < 0) return -1;
    }
    return 0;
}

static void pack_header(moe_writer *w, const msgpack_object *up, const moe_provenance *prov, int no_prov) {
    msgpack_packer *pk = &w->pk;
    const msgpack_object *kinds = moe_map_get(up, "kinds"), *pv = moe_map_get(up, "provenance");
    uint32_t nk = kinds && kinds->type == MSGPACK_OBJECT_ARRAY ? kinds->via.array.size : 0;
    uint32_t np = pv && pv->type == MSGPACK_OBJECT_ARRAY ? pv->via.array.size : 0;
    int add_kind = prov && prov->kind && !moe_header_has_kind(up, prov->kind);
    int add_prov = prov && !no_prov;

    msgpack_pack_map(pk, 4);
    moe_pack_kv_str(pk, "format", MOE_STREAM_FORMAT);
    moe_pack_kv_int(pk, "version", MOE_STREAM_VERSION);
    moe_pack_str(pk, "kinds");
    msgpack_pack_array(pk, nk + add_kind);
    for (uint32_t i = 0; i < nk; i++) msgpack_pack_object(pk, kinds->via.array.ptr[i]);
    if (add_kind) moe_pack_str(pk, prov->kind);
    moe_pack_str(pk, "provenance");
    msgpack_pack_array(pk, np + add_prov);
    for (uint32_t i = 0; i < np; i++) msgpack_pack_object(pk, pv->via.array.ptr[i]);
    if (add_prov) {
        msgpack_pack_map(pk, 4);
        moe_pack_kv_str(pk, "tool", prov->tool);
        moe_pack_kv_str(pk, "version", MOE_VERSION);
        moe_pack_str(pk, "args");
        int nargs = prov->argc > 0 ? prov->argc - 1 : 0;
        msgpack_pack_array(pk, nargs);
        for (int i = 0; i < nargs; i++) moe_pack_str(pk, prov->argv[i + 1]);
        moe_pack_str(pk, "model");
        if (prov->model) moe_pack_str(pk, prov->model);
        else msgpack_pack_nil(pk);
    }
}

moe_writer *moe_writer_open(const char *path, const msgpack_object *upstream, const moe_provenance *prov,
                            int no_provenance) {
    if (strcmp(path, "-") == 0 && isatty(1)) {
        moe_error_set(MOE_ERR_IO, "<stdout>: refusing to write a binary stream to a terminal "
                                  "(redirect it to a file or a pipe)");
        return NULL;
    }
    moe_writer *w = moe_calloc(1, sizeof *w);
    if (moe_output_open(&w->out_file, path) < 0) {
        free(w);
        return NULL;
    }
    if (isatty(w->out_file.fd)) { /* -o /dev/tty: written directly, so refused here */
        moe_error_set(MOE_ERR_IO, "%s: refusing to write a binary stream to a terminal", path);
        moe_output_close(&w->out_file, 0);
        free(w);
        return NULL;
    }
    w->cctx = ZSTD_createCCtx();
    ZSTD_CCtx_setParameter(w->cctx, ZSTD_c_compressionLevel, 3);
    ZSTD_CCtx_setParameter(w->cctx, ZSTD_c_checksumFlag, 1);
    w->pending = moe_malloc(PACK_BUF);
    w->out_cap = ZSTD_CStreamOutSize();
    w->out = moe_malloc(w->out_cap);
    msgpack_packer_init(&w->pk, w, writer_sink);
    pack_header(w, upstream, prov, no_provenance);
    return w;
}

msgpack_packer *moe_writer_record(moe_writer *w, const char *type, uint32_t nkeys) {
    msgpack_pack_map(&w->pk, nkeys + 1);
    moe_pack_kv_str(&w->pk, "type", type);
    w->count++;
    return &w->pk;
}

int moe_writer_copy(moe_writer *w, const msgpack_object *rec) {
    msgpack_pack_object(&w->pk, *rec);
    w->count++;
    return w->failed ? -1 : 0;
}

static void writer_free(moe_writer *w) {
    ZSTD_freeCCtx(w->cctx);
    free(w->pending);
    free(w->out);
    free(w);
}

int moe_writer_close(moe_writer *w) {
    msgpack_pack_map(&w->pk, 2);
    moe_pack_kv_str(&w->pk, "type", "end");
    moe_pack_kv_int(&w->pk, "records", (int64_t)w->count);
    int rc = w->failed ? -1 : compress_pending(w, ZSTD_e_end);
    rc = moe_output_close(&w->out_file, rc == 0);
    writer_free(w);
    return rc;
}

void moe_writer_abort(moe_writer *w) {
    if (!w) return;
    moe_output_close(&w->out_file, 0);
    writer_free(w);
}
