/* safetensors.c - validated mmap reader and deterministic writer (see safetensors.h). */
#include "safetensors.h"
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>


/* ---- page cache --------------------------------------------------------------
 * Released tensors always leave this process's resident set (MADV_DONTNEED).
 * Their clean page-cache copies are dropped as well only for files bigger than
 * an eighth of physical memory (shards of a model that cannot stay cached):
 * dropping a small model's pages made every later pass over it (the search
 * tools run many) read the file from disk again, a third of a forward's time
 * in bench/forward.sh.  Page cache is not part of the resident set. */
static int drop_cache_for(uint64_t size)
{
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || psz <= 0) return 1;
    return size > (uint64_t)pages * (uint64_t)psz / 8;
}

void moe_st_shape_str(int ndim, const int64_t *shape, char *buf, size_t size)
{
    size_t o = 0;
    if (!size) return;
    buf[0] = 0;
    o += (size_t)snprintf(buf + o, o < size ? size - o : 0, "[");
    for (int i = 0; i < ndim; i++)
        o += (size_t)snprintf(buf + o, o < size ? size - o : 0, "%s%lld", i ? ", " : "",
                              (long long)shape[i]);
    if (o < size) snprintf(buf + o, size - o, "]");
}

/* ---- reader --------------------------------------------------------------- */

struct moe_st_file {
    char *path;
    int fd;
    unsigned char *map;
    uint64_t size;
    int drop_cache; /* release() also drops the page cache (big files only) */
    uint64_t header_len;
    int n;
    moe_st_tensor *t; /* sorted by name */
    char **names;
    int nmeta;
    char **meta_keys, **meta_vals;
};

static int cmp_name(const void *a, const void *b)
{
    return strcmp(((const moe_st_tensor *)a)->name, ((const moe_st_tensor *)b)->name);
}

static int cmp_offset_ptr(const void *a, const void *b)
{
    const moe_st_tensor *x = *(const moe_st_tensor *const *)a, *y = *(const moe_st_tensor *const *)b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Integer from a JSON value that must be a non-negative integer. */
static int json_u64(const json_t *v, uint64_t *out)
{
    if (!json_is_integer(v)) return -1;
    json_int_t i = json_integer_value(v);
    if (i < 0) return -1;
    *out = (uint64_t)i;
    return 0;
}

/* __metadata__: a map of strings, kept as they are */
static int parse_metadata(moe_st_file *f, json_t *v) {
    if (json_is_null(v)) return 0;
    if (!json_is_object(v)) {
        moe_error_set(MOE_ERR_DATA, "%s: __metadata__ is not an object", f->path);
        return -1;
    }
    size_t nm = json_object_size(v);
    f->meta_keys = moe_calloc(nm ? nm : 1, sizeof(char *));
    f->meta_vals = moe_calloc(nm ? nm : 1, sizeof(char *));
    const char *mk;
    json_t *mv;
    json_object_foreach(v, mk, mv) {
        if (!json_is_string(mv)) {
            moe_error_set(MOE_ERR_DATA, "%s: __metadata__ value of '%s' is not a string", f->path, mk);
            return -1;
        }
        f->meta_keys[f->nmeta] = moe_strdup(mk);
        f->meta_vals[f->nmeta++] = moe_strdup(json_string_value(mv));
    }
    return 0;
}

/* A tensor's dtype and shape; its size in bits (*bits) without overflow:
 * each dimension is at most 2^48 and the product of the bits at most 2^62. */
static int parse_dtype_shape(const moe_st_file *f, moe_st_tensor *t, json_t *jd, json_t *js,
                             uint64_t *nbytes) {
    const char *P = f->path, *key = t->name;
    if (!json_is_string(jd)) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: missing or non-string dtype", P, key);
        return -1;
    }
    int dt = moe_dtype_from_st_name(json_string_value(jd));
    if (dt < 0) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: unknown dtype '%s'", P, key, json_string_value(jd));
        return -1;
    }
    t->dtype = dt;
    if (!json_is_array(js)) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: missing or non-array shape", P, key);
        return -1;
    }
    if (json_array_size(js) > MOE_ST_MAX_DIMS) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: %zu dimensions (at most %d supported)", P, key,
                      json_array_size(js), MOE_ST_MAX_DIMS);
        return -1;
    }
    t->ndim = (int)json_array_size(js);
    unsigned __int128 bits = (unsigned __int128)moe_dtype_bits(t->dtype);
    uint64_t numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        uint64_t s;
        if (json_u64(json_array_get(js, d), &s) || s > (1ULL << 48)) {
            moe_error_set(MOE_ERR_DATA, "%s: tensor %s: shape entry %d is not a valid size", P, key, d);
            return -1;
        }
        t->shape[d] = (int64_t)s;
        numel *= s; /* each <= 2^48 but the product may overflow: check via bits */
        bits *= s;
        if (bits > ((unsigned __int128)1 << 62)) {
            moe_error_set(MOE_ERR_DATA, "%s: tensor %s: shape too large", P, key);
            return -1;
        }
    }
    t->numel = (int64_t)numel;
    if (bits % 8) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: %s shape is not a whole number of bytes", P, key,
                      moe_dtype_st_name(t->dtype));
        return -1;
    }
    *nbytes = (uint64_t)(bits / 8);
    return 0;
}

/* data_offsets [BEGIN, END]: inside the data area and exactly the bytes the
 * dtype and shape need */
static int parse_offsets(const moe_st_file *f, moe_st_tensor *t, json_t *jo, uint64_t want,
                         uint64_t data_len) {
    const char *P = f->path, *key = t->name;
    uint64_t b0, b1;
    if (!json_is_array(jo) || json_array_size(jo) != 2 || json_u64(json_array_get(jo, 0), &b0) ||
        json_u64(json_array_get(jo, 1), &b1)) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: data_offsets is not [BEGIN, END]", P, key);
        return -1;
    }
    if (b1 < b0) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: data_offsets [%llu, %llu] end before begin", P, key,
                      (unsigned long long)b0, (unsigned long long)b1);
        return -1;
    }
    if (b1 > data_len) {
        moe_error_set(MOE_ERR_DATA,
                      "%s: tensor %s: data_offsets [%llu, %llu] outside the data area "
                      "(%llu bytes; file truncated?)",
                      P, key, (unsigned long long)b0, (unsigned long long)b1, (unsigned long long)data_len);
        return -1;
    }
    if (b1 - b0 != want) {
        char sh[160];
        moe_st_shape_str(t->ndim, t->shape, sh, sizeof sh);
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: data_offsets span %llu bytes but %s %s needs %llu", P,
                      key, (unsigned long long)(b1 - b0), moe_dtype_st_name(t->dtype), sh,
                      (unsigned long long)want);
        return -1;
    }
    t->offset = 8 + f->header_len + b0;
    t->nbytes = want;
    return 0;
}

/* One header entry: tensor key -> {dtype, shape, data_offsets}. */
static int parse_tensor(moe_st_file *f, const char *key, json_t *v, uint64_t data_len) {
    moe_st_tensor *t = &f->t[f->n];
    f->names[f->n] = moe_strdup(key);
    t->name = f->names[f->n];
    t->file = f;
    f->n++;
    if (!json_is_object(v)) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: entry is not an object", f->path, key);
        return -1;
    }
    uint64_t want;
    if (parse_dtype_shape(f, t, json_object_get(v, "dtype"), json_object_get(v, "shape"), &want) < 0)
        return -1;
    return parse_offsets(f, t, json_object_get(v, "data_offsets"), want, data_len);
}

/* The tensors tile the data area: sorted by offset, contiguous from 0,
 * ending at EOF (no overlap, no gap, no trailing bytes). */
static int check_tiling(const moe_st_file *f, uint64_t data_len) {
    const char *P = f->path;
    moe_st_tensor **by = moe_malloc((f->n ? f->n : 1) * sizeof *by);
    for (int i = 0; i < f->n; i++) by[i] = &f->t[i];
    qsort(by, f->n, sizeof *by, cmp_offset_ptr);
    uint64_t pos = 8 + f->header_len;
    int rc = 0;
    for (int i = 0; i < f->n && rc == 0; i++) {
        if (by[i]->offset < pos) {
            moe_error_set(MOE_ERR_DATA, "%s: tensor %s: data overlaps tensor %s", P, by[i]->name,
                          by[i - 1]->name);
            rc = -1;
        } else if (by[i]->offset > pos) {
            moe_error_set(MOE_ERR_DATA, "%s: tensor %s: gap of %llu bytes before its data", P, by[i]->name,
                          (unsigned long long)(by[i]->offset - pos));
            rc = -1;
        }
        pos += by[i]->nbytes;
    }
    free(by);
    if (rc == 0 && pos != f->size) {
        moe_error_set(MOE_ERR_DATA, "%s: data area is %llu bytes but the tensors cover %llu (trailing bytes)",
                      P, (unsigned long long)data_len, (unsigned long long)(pos - 8 - f->header_len));
        rc = -1;
    }
    return rc;
}

static int parse_header(moe_st_file *f, const char *json, size_t len)
{
    const char *P = f->path;
    json_error_t je;
    if (len == 0 || json[0] != '{') {
        moe_error_set(MOE_ERR_DATA, "%s: safetensors header does not start with '{'", P);
        return -1;
    }
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        moe_error_set(MOE_ERR_DATA, "%s: safetensors header is not valid JSON (%s at byte %d)", P,
                      je.text, je.position);
        return -1;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        moe_error_set(MOE_ERR_DATA, "%s: safetensors header is not a JSON object", P);
        return -1;
    }
    size_t cap = json_object_size(root);
    f->t = moe_calloc(cap ? cap : 1, sizeof *f->t);
    f->names = moe_calloc(cap ? cap : 1, sizeof *f->names);
    uint64_t data_len = f->size - 8 - f->header_len;
    const char *key;
    json_t *v;
    int rc = 0;
    json_object_foreach(root, key, v) {
        rc = !strcmp(key, "__metadata__") ? parse_metadata(f, v) : parse_tensor(f, key, v, data_len);
        if (rc < 0) break;
    }
    if (rc == 0) rc = check_tiling(f, data_len);
    if (rc == 0) {
        qsort(f->t, f->n, sizeof *f->t, cmp_name);
        for (int i = 0; i < f->n; i++) f->t[i].data = f->map + f->t[i].offset;
    }
    json_decref(root);
    return rc;
}

moe_st_file *moe_st_open(const char *path)
{
    moe_st_file *f = moe_calloc(1, sizeof *f);
    f->path = moe_strdup(path);
    f->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (f->fd < 0) {
        moe_error_set(MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(f->fd, &st) < 0) {
        moe_error_set(MOE_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        moe_error_set(MOE_ERR_IO, "%s: not a regular file", path);
        goto fail;
    }
    f->size = (uint64_t)st.st_size;
    if (f->size < 8) {
        moe_error_set(MOE_ERR_DATA, "%s: %llu bytes, too short for a safetensors file", path,
                      (unsigned long long)f->size);
        goto fail;
    }
    f->drop_cache = drop_cache_for(f->size);
    f->map = mmap(NULL, f->size, PROT_READ, MAP_SHARED, f->fd, 0);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        moe_error_set(MOE_ERR_IO, "%s: cannot map: %s", path, strerror(errno));
        goto fail;
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | f->map[i];
    if (n > MOE_ST_MAX_HEADER) {
        moe_error_set(MOE_ERR_DATA, "%s: header length %llu exceeds the %llu-byte limit", path,
                      (unsigned long long)n, (unsigned long long)MOE_ST_MAX_HEADER);
        goto fail;
    }
    if (n > f->size - 8) {
        moe_error_set(MOE_ERR_DATA, "%s: header length %llu beyond the end of the file (%llu bytes)",
                      path, (unsigned long long)n, (unsigned long long)f->size);
        goto fail;
    }
    f->header_len = n;
    if (parse_header(f, (const char *)f->map + 8, n) < 0) goto fail;
    return f;
fail:
    moe_st_close(f);
    return NULL;
}

void moe_st_close(moe_st_file *f)
{
    if (!f) return;
    if (f->map) munmap(f->map, f->size);
    if (f->fd >= 0) close(f->fd);
    for (int i = 0; i < f->n; i++) free(f->names[i]);
    for (int i = 0; i < f->nmeta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_vals[i]);
    }
    free(f->meta_keys);
    free(f->meta_vals);
    free(f->names);
    free(f->t);
    free(f->path);
    free(f);
}

const char *moe_st_path(const moe_st_file *f) { return f->path; }
int moe_st_count(const moe_st_file *f) { return f->n; }

const moe_st_tensor *moe_st_tensor_at(const moe_st_file *f, int i)
{
    return i >= 0 && i < f->n ? &f->t[i] : NULL;
}

const moe_st_tensor *moe_st_find(const moe_st_file *f, const char *name)
{
    int lo = 0, hi = f->n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2, c = strcmp(name, f->t[mid].name);
        if (!c) return &f->t[mid];
        if (c < 0) hi = mid - 1;
        else lo = mid + 1;
    }
    return NULL;
}

const char *moe_st_metadata(const moe_st_file *f, const char *key)
{
    for (int i = 0; i < f->nmeta; i++)
        if (!strcmp(f->meta_keys[i], key)) return f->meta_vals[i];
    return NULL;
}

int moe_st_read_f32(const moe_st_tensor *t, float *dst)
{
    if (moe_dtype_to_f32(t->dtype, t->data, dst, (size_t)t->numel) < 0) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: dtype %s is not a float type", t->file->path,
                      t->name, moe_dtype_st_name(t->dtype));
        return -1;
    }
    return 0;
}

int moe_st_check_shape(const moe_st_tensor *t, int ndim, const int64_t *shape)
{
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    if (ok) return 0;
    char a[160], b[160];
    moe_st_shape_str(t->ndim, t->shape, a, sizeof a);
    moe_st_shape_str(ndim, shape, b, sizeof b);
    moe_error_set(MOE_ERR_DATA, "%s: tensor %s: shape %s, expected %s", t->file->path, t->name, a, b);
    return -1;
}

static void page_range(const moe_st_tensor *t, uint64_t *off, uint64_t *len)
{
    uint64_t pg = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t a = t->offset / pg * pg, b = (t->offset + t->nbytes + pg - 1) / pg * pg;
    if (b > t->file->size) b = t->file->size;
    *off = a;
    *len = b > a ? b - a : 0;
}

void moe_st_prefetch(const moe_st_tensor *t)
{
    uint64_t off, len;
    if (!t || !t->nbytes) return;
    page_range(t, &off, &len);
    if (len) madvise(t->file->map + off, len, MADV_WILLNEED);
}

void moe_st_populate(const moe_st_tensor *t)
{
    uint64_t off, len;
    if (!t || !t->nbytes) return;
    page_range(t, &off, &len);
    if (!len) return;
#ifdef MADV_POPULATE_READ
    if (madvise(t->file->map + off, len, MADV_POPULATE_READ) == 0) return;
#endif
    /* older kernels: touch one byte per page */
    uint64_t pg = (uint64_t)sysconf(_SC_PAGESIZE);
    const volatile unsigned char *p = (const volatile unsigned char *)t->file->map + off;
    for (uint64_t i = 0; i < len; i += pg) (void)p[i];
}

void moe_st_release(const moe_st_tensor *t)
{
    uint64_t off, len;
    if (!t || !t->nbytes) return;
    page_range(t, &off, &len);
    if (!len) return;
    madvise(t->file->map + off, len, MADV_DONTNEED);
    if (t->file->drop_cache) posix_fadvise(t->file->fd, (off_t)off, (off_t)len, POSIX_FADV_DONTNEED);
}

/* ---- writer ----------------------------------------------------------------- */

typedef struct {
    char *name;
    moe_dtype dtype;
    int ndim;
    int64_t shape[MOE_ST_MAX_DIMS];
    uint64_t nbytes, begin;
    const void *data;
    moe_st_fill_fn fill;
    void *ctx;
} wtensor;

struct moe_st_writer {
    char *path, *tmp;
    int n, cap;
    wtensor *t;
    int nmeta;
    char **mk, **mv;
    uint64_t bytes;
};

moe_st_writer *moe_st_writer_open(const char *path)
{
    moe_st_writer *w = moe_calloc(1, sizeof *w);
    w->path = moe_strdup(path);
    return w;
}

uint64_t moe_st_writer_bytes(const moe_st_writer *w) { return w->bytes; }

int moe_st_writer_add(moe_st_writer *w, const char *name, moe_dtype dt, int ndim,
                      const int64_t *shape, const void *data, moe_st_fill_fn fill, void *ctx)
{
    if ((unsigned)dt >= MOE_DT_COUNT || ndim < 0 || ndim > MOE_ST_MAX_DIMS ||
        (!data && !fill) || !strcmp(name, "__metadata__")) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: bad tensor declaration", w->path, name);
        return -1;
    }
    for (int i = 0; i < w->n; i++)
        if (!strcmp(w->t[i].name, name)) {
            moe_error_set(MOE_ERR_DATA, "%s: tensor %s declared twice", w->path, name);
            return -1;
        }
    if (fill && moe_dtype_bits(dt) % 8) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: a fill callback needs a whole-byte dtype",
                      w->path, name);
        return -1;
    }
    unsigned __int128 bits = (unsigned)moe_dtype_bits(dt);
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) {
            moe_error_set(MOE_ERR_DATA, "%s: tensor %s: negative dimension", w->path, name);
            return -1;
        }
        bits *= (uint64_t)shape[d];
        if (bits > ((unsigned __int128)1 << 62)) {
            moe_error_set(MOE_ERR_DATA, "%s: tensor %s: too large", w->path, name);
            return -1;
        }
    }
    if (bits % 8) {
        moe_error_set(MOE_ERR_DATA, "%s: tensor %s: not a whole number of bytes", w->path, name);
        return -1;
    }
    if (w->n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 64;
        w->t = moe_realloc(w->t, (size_t)w->cap * sizeof *w->t);
    }
    wtensor *t = &w->t[w->n++];
    memset(t, 0, sizeof *t);
    t->name = moe_strdup(name);
    t->dtype = dt;
    t->ndim = ndim;
    for (int d = 0; d < ndim; d++) t->shape[d] = shape[d];
    t->nbytes = (uint64_t)(bits / 8);
    t->data = data;
    t->fill = fill;
    t->ctx = ctx;
    w->bytes += t->nbytes;
    return 0;
}

int moe_st_writer_meta(moe_st_writer *w, const char *key, const char *value)
{
    if (!strcmp(key, "format")) return 0;
    w->mk = moe_realloc(w->mk, (size_t)(w->nmeta + 1) * sizeof(char *));
    w->mv = moe_realloc(w->mv, (size_t)(w->nmeta + 1) * sizeof(char *));
    w->mk[w->nmeta] = moe_strdup(key);
    w->mv[w->nmeta++] = moe_strdup(value);
    return 0;
}

/* reference writer order: dtype descending, then name */
static int cmp_wt(const void *a, const void *b)
{
    const wtensor *x = a, *y = b;
    if (x->dtype != y->dtype) return x->dtype > y->dtype ? -1 : 1;
    return strcmp(x->name, y->name);
}

typedef struct {
    char *s;
    size_t n, cap;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->s = moe_realloc(b->s, b->cap);
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = 0;
}

static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_json_str(sbuf *b, const char *s)
{
    sb_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char e[8];
        if (*p == '"' || *p == '\\') {
            e[0] = '\\';
            e[1] = (char)*p;
            sb_put(b, e, 2);
        } else if (*p < 0x20) {
            snprintf(e, sizeof e, "\\u%04x", *p);
            sb_put(b, e, 6);
        } else {
            sb_put(b, (const char *)p, 1);
        }
    }
    sb_put(b, "\"", 1);
}

static void sb_printf(sbuf *b, const char *fmt, unsigned long long v)
{
    char tmp[32];
    int k = snprintf(tmp, sizeof tmp, fmt, v);
    sb_put(b, tmp, (size_t)k);
}

static int write_all(FILE *fp, const void *p, size_t n, const char *path)
{
    if (n && fwrite(p, 1, n, fp) != n) {
        moe_error_set(MOE_ERR_IO, "%s: write failed: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

static void writer_free(moe_st_writer *w)
{
    for (int i = 0; i < w->n; i++) free(w->t[i].name);
    for (int i = 0; i < w->nmeta; i++) {
        free(w->mk[i]);
        free(w->mv[i]);
    }
    free(w->mk);
    free(w->mv);
    free(w->t);
    free(w->tmp);
    free(w->path);
    free(w);
}

void moe_st_writer_abort(moe_st_writer *w)
{
    if (!w) return;
    if (w->tmp) moe_tmp_discard(w->tmp);
    writer_free(w);
}

#define FILL_CHUNK (4u << 20)

int moe_st_writer_close(moe_st_writer *w)
{
    qsort(w->t, w->n, sizeof *w->t, cmp_wt);
    sbuf h = {0};
    sb_str(&h, "{\"__metadata__\":{\"format\":\"pt\"");
    for (int i = 0; i < w->nmeta; i++) {
        sb_str(&h, ",");
        sb_json_str(&h, w->mk[i]);
        sb_str(&h, ":");
        sb_json_str(&h, w->mv[i]);
    }
    sb_str(&h, "}");
    uint64_t pos = 0;
    for (int i = 0; i < w->n; i++) {
        wtensor *t = &w->t[i];
        t->begin = pos;
        sb_str(&h, ",");
        sb_json_str(&h, t->name);
        sb_str(&h, ":{\"dtype\":\"");
        sb_str(&h, moe_dtype_st_name(t->dtype));
        sb_str(&h, "\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++) sb_printf(&h, d ? ",%llu" : "%llu", (unsigned long long)t->shape[d]);
        sb_str(&h, "],\"data_offsets\":[");
        sb_printf(&h, "%llu,", (unsigned long long)pos);
        pos += t->nbytes;
        sb_printf(&h, "%llu]}", (unsigned long long)pos);
    }
    sb_str(&h, "}");
    while (h.n % 8) sb_put(&h, " ", 1);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)h.n >> (8 * i));

    w->tmp = moe_tmp_path(w->path);
    moe_tmp_register(w->tmp);
    FILE *fp = fopen(w->tmp, "wb");
    void *buf = NULL;
    if (!fp) {
        moe_error_set(MOE_ERR_IO, "%s: cannot create: %s", w->tmp, strerror(errno));
        goto fail;
    }
    setvbuf(fp, NULL, _IOFBF, 1 << 20);
    if (write_all(fp, len8, 8, w->path) || write_all(fp, h.s, h.n, w->path)) goto fail;
    for (int i = 0; i < w->n; i++) {
        wtensor *t = &w->t[i];
        if (t->data) {
            if (write_all(fp, t->data, t->nbytes, w->path)) goto fail;
            continue;
        }
        size_t es = (size_t)moe_dtype_bits(t->dtype) / 8;
        uint64_t numel = es ? t->nbytes / es : 0, per = FILL_CHUNK / (es ? es : 1);
        if (!buf) buf = moe_malloc(FILL_CHUNK);
        for (uint64_t s = 0; s < numel; s += per) {
            uint64_t k = numel - s < per ? numel - s : per;
            if (t->fill(t->ctx, t->name, s, k, buf) < 0) goto fail;
            if (write_all(fp, buf, k * es, w->path)) goto fail;
        }
    }
    if (fflush(fp) || ferror(fp)) {
        moe_error_set(MOE_ERR_IO, "%s: write failed: %s", w->path, strerror(errno));
        goto fail;
    }
    int rc = fclose(fp);
    fp = NULL;
    if (rc) {
        moe_error_set(MOE_ERR_IO, "%s: write failed: %s", w->path, strerror(errno));
        goto fail;
    }
    if (moe_tmp_commit(w->tmp, w->path) < 0) goto fail;
    free(w->tmp);
    w->tmp = NULL;
    free(buf);
    free(h.s);
    writer_free(w);
    return 0;
fail:
    if (fp) fclose(fp);
    free(buf);
    free(h.s);
    moe_st_writer_abort(w);
    return -1;
}
