/* fuzz_safetensors.c - a .safetensors file (lib/safetensors.c): the header
 * length, the JSON header, dtypes, shapes, offsets; then every tensor found
 * valid is looked up by name, shape-printed, read as float32 and released. */
#include "fuzz.h"

#include "safetensors.h"

#define MAX_READ_ELEMENTS (1 << 20) /* one input's memory stays small */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_st_file *f = moe_st_open(fuzz_file(0, data, size));
    if (!f) return 0;
    (void)moe_st_metadata(f, "format");
    for (int i = 0; i < moe_st_count(f); i++) {
        const moe_st_tensor *t = moe_st_tensor_at(f, i);
        if (moe_st_find(f, t->name) != t) abort(); /* the index must find what it lists */
        char shape[160];
        moe_st_shape_str(t->ndim, t->shape, shape, sizeof shape);
        (void)moe_st_check_shape(t, t->ndim, t->shape);
        if (moe_dtype_is_float(t->dtype) && t->numel <= MAX_READ_ELEMENTS) {
            float *dst = malloc((size_t)(t->numel ? t->numel : 1) * sizeof *dst);
            if (dst && moe_st_read_f32(t, dst) < 0) abort(); /* a float tensor must convert */
            free(dst);
        }
        moe_st_release(t);
    }
    moe_st_close(f);
    return 0;
}
