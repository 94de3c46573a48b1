/* fuzz_stream.c - the moe-stream reader (lib/stream.c): header, records,
 * end record, and every typed array a record holds, converted as the tools
 * convert them (a buffer of count elements, then moe_array_to_i32/_f32).
 * Byte 0: bit 0 set, the rest is the file as is (zstd framing); clear, it
 * is the msgpack, compressed here (see fuzz_stream_file). */
#include "fuzz.h"

#include "stream.h"

/* The tools size their buffers from a->count; so does this, within a cap
 * that keeps one input's memory small (a larger valid array is no finding). */
#define MAX_CONVERT_ELEMENTS (1 << 20)

static void convert(const moe_array *a) {
    /* a parsed array holds exactly count elements: its byte size check must
     * not have wrapped (count * size overflowing 64 bits) */
    if (a->count < 0 || (uint64_t)a->count > a->nbytes / moe_dtype_size(a->dtype)) {
        fprintf(stderr, "array of %lld elements accepted with %zu data bytes\n", (long long)a->count, a->nbytes);
        abort();
    }
    if (a->count > MAX_CONVERT_ELEMENTS) return;
    if (a->count < 0 || a->count > MAX_CONVERT_ELEMENTS) return;
    size_t n = (size_t)a->count ? (size_t)a->count : 1;
    int32_t *i32 = malloc(n * sizeof *i32);
    float *f32 = malloc(n * sizeof *f32);
    if (i32 && f32) {
        moe_array_to_f32(a, f32);
        (void)moe_array_to_i32(a, i32);
    }
    free(i32);
    free(f32);
}

static void visit_record(moe_reader *r, const msgpack_object *rec) {
    (void)moe_record_type(rec);
    if (rec->type != MSGPACK_OBJECT_MAP) return;
    for (uint32_t i = 0; i < rec->via.map.size; i++) {
        const msgpack_object *v = &rec->via.map.ptr[i].val;
        moe_array a;
        if (v->type == MSGPACK_OBJECT_MAP && moe_array_parse(v, &a, "fuzz") == 0) convert(&a);
    }
    int64_t x;
    const char *s;
    size_t sl;
    (void)moe_record_int(r, rec, "layer", &x);
    (void)moe_record_str(r, rec, "text", &s, &sl);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    unsigned sel = fuzz_selector(&data, &size);
    moe_reader *r = moe_reader_open(fuzz_stream_file(0, data, size, sel & 1));
    if (!r) return 0;
    (void)moe_header_has_kind(moe_reader_header(r), "tokens");
    const msgpack_object *rec;
    while (moe_reader_next(r, &rec) == 1) visit_record(r, rec);
    moe_reader_close(r);
    return 0;
}
