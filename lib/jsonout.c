/* jsonout.c - JSON text output. */
#include "jsonout.h"
#include "common.h"
#include "stream.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Length of the valid UTF-8 sequence at s (1..4), or 0 if invalid. */
static size_t utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    unsigned min;
    if (c < 0x80) return 1;
    if ((c & 0xe0) == 0xc0) { len = 2; min = 0x80; c &= 0x1f; }
    else if ((c & 0xf0) == 0xe0) { len = 3; min = 0x800; c &= 0x0f; }
    else if ((c & 0xf8) == 0xf0) { len = 4; min = 0x10000; c &= 0x07; }
    else return 0;
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        c = (c << 6) | (s[i] & 0x3f);
    }
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) return 0;
    return len;
}

void moe_json_string(FILE *f, const char *str, size_t len) {
    const unsigned char *s = (const unsigned char *)str;
    putc('"', f);
    for (size_t i = 0; i < len;) {
        unsigned c = s[i];
        if (c == '"' || c == '\\') { putc('\\', f); putc((int)c, f); i++; }
        else if (c == '\n') { fputs("\\n", f); i++; }
        else if (c == '\t') { fputs("\\t", f); i++; }
        else if (c == '\r') { fputs("\\r", f); i++; }
        else if (c < 0x20 || c == 0x7f) { fprintf(f, "\\u%04x", c); i++; }
        else if (c < 0x80) { putc((int)c, f); i++; }
        else {
            size_t k = utf8_len(s + i, len - i);
            if (k) { fwrite(s + i, 1, k, f); i += k; }
            else { fputs("\\ufffd", f); i++; }
        }
    }
    putc('"', f);
}

void moe_json_number(FILE *f, double v, int single) {
    if (isnan(v)) fputs("\"NaN\"", f);
    else if (isinf(v)) fputs(v > 0 ? "\"Infinity\"" : "\"-Infinity\"", f);
    else if (v == floor(v) && fabs(v) < 1e15) fprintf(f, "%.1f", v);
    else fprintf(f, single ? "%.9g" : "%.17g", v);
}

static void json_int_array(FILE *f, const moe_array *a, int64_t n) {
    int32_t *v = moe_malloc((size_t)a->count * sizeof *v);
    int ok = a->dtype == MOE_DT_I64 ? 0 : moe_array_to_i32(a, v) == 0;
    putc('[', f);
    for (int64_t i = 0; i < n; i++) {
        if (i) putc(',', f);
        if (ok) fprintf(f, "%d", v[i]);
        else { int64_t x; memcpy(&x, (const char *)a->data + 8 * i, 8); fprintf(f, "%lld", (long long)x); }
    }
    putc(']', f);
    free(v);
}

static int is_float_dtype(moe_dtype d) {
    return d == MOE_DT_F32 || d == MOE_DT_F64 || d == MOE_DT_F16 || d == MOE_DT_BF16;
}

/* Element i as a double (any dtype). */
static double element(const moe_array *a, int64_t i) {
    const unsigned char *p = a->data;
    switch (a->dtype) {
    case MOE_DT_F64: { double d; memcpy(&d, p + 8 * i, 8); return d; }
    case MOE_DT_I64: { int64_t v; memcpy(&v, p + 8 * i, 8); return (double)v; }
    default: {
        moe_array one = *a;
        one.count = 1;
        one.data = p + moe_dtype_size(a->dtype) * i;
        float x;
        moe_array_to_f32(&one, &x);
        return x;
    }
    }
}

static void json_typed_array(FILE *f, const moe_array *a, const moe_json_opts *o) {
    fprintf(f, "{\"dtype\":\"%s\",\"shape\":[", moe_dtype_name(a->dtype));
    for (int i = 0; i < a->ndim; i++) fprintf(f, "%s%lld", i ? "," : "", (long long)a->shape[i]);
    fputs("],", f);
    int64_t n = o->full ? a->count : (a->count < o->preview ? a->count : o->preview);
    fputs(o->full ? "\"data\":" : "\"first\":", f);
    int single = a->dtype != MOE_DT_F64;
    if (is_float_dtype(a->dtype)) {
        putc('[', f);
        for (int64_t i = 0; i < n; i++) {
            if (i) putc(',', f);
            moe_json_number(f, element(a, i), single);
        }
        putc(']', f);
    } else {
        json_int_array(f, a, n);
    }
    if (!o->full && a->count > 0) {
        double mn = INFINITY, mx = -INFINITY, sum = 0;
        for (int64_t i = 0; i < a->count; i++) {
            double x = element(a, i);
            if (x < mn) mn = x;
            if (x > mx) mx = x;
            sum += x;
        }
        fputs(",\"min\":", f);
        moe_json_number(f, mn, single);
        fputs(",\"max\":", f);
        moe_json_number(f, mx, single);
        fputs(",\"mean\":", f);
        moe_json_number(f, sum / a->count, 0);
    }
    putc('}', f);
}

void moe_json_object(FILE *f, const msgpack_object *o, const moe_json_opts *opts) {
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: fputs("null", f); break;
    case MSGPACK_OBJECT_BOOLEAN: fputs(o->via.boolean ? "true" : "false", f); break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: fprintf(f, "%llu", (unsigned long long)o->via.u64); break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: fprintf(f, "%lld", (long long)o->via.i64); break;
    case MSGPACK_OBJECT_FLOAT32: moe_json_number(f, o->via.f64, 1); break;
    case MSGPACK_OBJECT_FLOAT64: moe_json_number(f, o->via.f64, 0); break;
    case MSGPACK_OBJECT_STR: moe_json_string(f, o->via.str.ptr, o->via.str.size); break;
    case MSGPACK_OBJECT_BIN:
    case MSGPACK_OBJECT_EXT: {
        size_t n = o->type == MSGPACK_OBJECT_BIN ? o->via.bin.size : o->via.ext.size;
        const unsigned char *p = (const unsigned char *)(o->type == MSGPACK_OBJECT_BIN ? o->via.bin.ptr : o->via.ext.ptr);
        if (o->type == MSGPACK_OBJECT_EXT) fprintf(f, "{\"ext\":%d,\"bytes\":%zu,\"hex\":\"", o->via.ext.type, n);
        else fprintf(f, "{\"bin\":%zu,\"hex\":\"", n);
        size_t show = opts->full ? n : (n < 32 ? n : 32);
        for (size_t i = 0; i < show; i++) fprintf(f, "%02x", p[i]);
        fputs(show < n ? "...\"}" : "\"}", f);
        break;
    }
    case MSGPACK_OBJECT_ARRAY:
        putc('[', f);
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            if (i) putc(',', f);
            moe_json_object(f, &o->via.array.ptr[i], opts);
        }
        putc(']', f);
        break;
    case MSGPACK_OBJECT_MAP: {
        moe_array a;
        if (moe_map_get(o, "dtype") && moe_map_get(o, "data") && moe_array_parse(o, &a, "") == 0) {
            json_typed_array(f, &a, opts);
            break;
        }
        putc('{', f);
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object *k = &o->via.map.ptr[i].key;
            if (i) putc(',', f);
            if (k->type == MSGPACK_OBJECT_STR) moe_json_string(f, k->via.str.ptr, k->via.str.size);
            else if (k->type == MSGPACK_OBJECT_POSITIVE_INTEGER) fprintf(f, "\"%llu\"", (unsigned long long)k->via.u64);
            else if (k->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) fprintf(f, "\"%lld\"", (long long)k->via.i64);
            else fputs("\"?\"", f);
            putc(':', f);
            moe_json_object(f, &o->via.map.ptr[i].val, opts);
        }
        putc('}', f);
        break;
    }
    default: fputs("null", f);
    }
}
