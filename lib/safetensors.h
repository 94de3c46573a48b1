/* safetensors.h - read (mmap, fully validated) and write .safetensors files.
 *
 * File layout (huggingface/safetensors, "Format"):
 *   u64 little-endian N | N bytes of JSON header (UTF-8, may be right-padded
 *   with spaces) | data buffer.
 * The header is an object; every key except "__metadata__" names a tensor:
 *   {"dtype":"BF16","shape":[4096,2048],"data_offsets":[BEGIN,END]}
 * with offsets relative to the data buffer, END one past the last byte.
 *
 * moe_st_open() checks everything the reference reader checks:
 *   - the file is at least 8 bytes, 8 + N <= file size, N <= 100,000,000;
 *   - the header is well-formed JSON, an object, no duplicate keys;
 *   - each tensor entry has exactly a known dtype, an array shape of
 *     non-negative integers, and two integer data_offsets BEGIN <= END;
 *   - END - BEGIN == prod(shape) * bits(dtype) / 8 (whole bytes);
 *   - sorted by offset, the tensors tile the data buffer from 0 with no gap
 *     and no overlap, and 8 + N + last END == file size (so a truncated or
 *     extended file is rejected);
 *   - "__metadata__", if present, is a flat object of strings.
 * Every error is one line "FILE: problem" naming the tensor when there is one
 * (kind MOE_ERR_DATA; MOE_ERR_IO for open/stat/mmap failures).
 *
 * Tensor data are exposed as pointers into a read-only shared mapping; they
 * may be unaligned (other writers do not align).  moe_st_release() tells the
 * kernel that a tensor's pages may be dropped (MADV_DONTNEED on the mapping;
 * POSIX_FADV_DONTNEED on the file too when the file is bigger than an eighth
 * of physical memory), so streaming through a model larger than RAM keeps the
 * resident set near what is in use, and a small model stays in the page cache
 * between passes.
 *
 * The writer produces files the reference library and transformers load:
 * "__metadata__":{"format":"pt"}, header padded with spaces to a multiple of
 * 8 bytes, tensors laid out in the reference writer's order (dtype by
 * descending element size, then name), so every tensor starts at a multiple
 * of its element size.  Output is byte-identical for identical input.  The
 * file is written under a temporary name (moe_tmp_*) and renamed on close. */
#ifndef MOE_SAFETENSORS_H
#define MOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

#define MOE_ST_MAX_DIMS 8
#define MOE_ST_MAX_HEADER 100000000ULL

struct moe_st_file;

/* One tensor of an open file.  Valid until moe_st_close(file). */
typedef struct moe_st_tensor {
    const char *name;
    moe_dtype dtype;
    int ndim;                        /* 0 = scalar */
    int64_t shape[MOE_ST_MAX_DIMS];
    int64_t numel;                   /* product of shape (1 for a scalar) */
    uint64_t offset;                 /* absolute file offset of the data */
    uint64_t nbytes;
    const void *data;                /* into the mapping; maybe unaligned */
    const struct moe_st_file *file;  /* the file it lives in */
} moe_st_tensor;

typedef struct moe_st_file moe_st_file;

/* Open, map and validate.  NULL with an error on failure. */
moe_st_file *moe_st_open(const char *path);
void moe_st_close(moe_st_file *f);
const char *moe_st_path(const moe_st_file *f);
/* Tensors, sorted by name. */
int moe_st_count(const moe_st_file *f);
const moe_st_tensor *moe_st_tensor_at(const moe_st_file *f, int i);
/* By name (binary search); NULL without setting an error if absent. */
const moe_st_tensor *moe_st_find(const moe_st_file *f, const char *name);
/* A "__metadata__" value, NULL if absent. */
const char *moe_st_metadata(const moe_st_file *f, const char *key);

/* Read a whole tensor as float32 into `dst` (t->numel floats).
 * Error "FILE: tensor NAME: dtype I32 is not a float type" otherwise. */
int moe_st_read_f32(const moe_st_tensor *t, float *dst);
/* Check a tensor's shape; error "FILE: tensor NAME: shape [a, b], expected
 * [c, d]" on mismatch. */
int moe_st_check_shape(const moe_st_tensor *t, int ndim, const int64_t *shape);
/* Format a shape as "[a, b]" into buf (always NUL-terminated). */
void moe_st_shape_str(int ndim, const int64_t *shape, char *buf, size_t size);

/* Advise the kernel: pages of this tensor will be needed soon / are no longer
 * needed (drops them from this process's resident set and, for files bigger
 * than an eighth of physical memory, when clean and unmapped elsewhere, from
 * the page cache).  Never fails. */
void moe_st_prefetch(const moe_st_tensor *t);
void moe_st_release(const moe_st_tensor *t);
/* Map this tensor's pages now (MADV_POPULATE_READ: one call instead of a page
 * fault per page when the data are read; reads them from disk if needed). */
void moe_st_populate(const moe_st_tensor *t);

/* ---- writing ----------------------------------------------------------- */

/* Produce elements [start, start+n) of a tensor, in its dtype, into `out`.
 * The writer calls it in increasing `start` order, chunk by chunk (chunks of
 * at most a few MB), exactly once per element.  Return 0, or -1 after
 * setting an error. */
typedef int (*moe_st_fill_fn)(void *ctx, const char *name, uint64_t start, uint64_t n,
                              void *out);

typedef struct moe_st_writer moe_st_writer;

/* Start a file: nothing is written until moe_st_writer_close().  `path` is
 * the final name; the data goes to moe_tmp_path(path) first. */
moe_st_writer *moe_st_writer_open(const char *path);
/* Declare a tensor.  Either `data` (the bytes, prod(shape)*size, which must
 * stay valid until close) or `fill` + `ctx` (called during close).  The name
 * and shape are copied.  Duplicate names and sub-byte dtypes with `fill` are
 * errors.  Returns 0 or -1. */
int moe_st_writer_add(moe_st_writer *w, const char *name, moe_dtype dt, int ndim,
                      const int64_t *shape, const void *data, moe_st_fill_fn fill, void *ctx);
/* Add a "__metadata__" entry ("format":"pt" is always written). */
int moe_st_writer_meta(moe_st_writer *w, const char *key, const char *value);
/* Sum of tensor payload bytes declared so far. */
uint64_t moe_st_writer_bytes(const moe_st_writer *w);
/* Write header + data to the temporary file, flush, rename to the final
 * path.  Frees w in every case.  Returns 0, or -1 with an error (the
 * temporary file removed). */
int moe_st_writer_close(moe_st_writer *w);
/* Give up: remove the temporary file, free everything. */
void moe_st_writer_abort(moe_st_writer *w);

#endif
