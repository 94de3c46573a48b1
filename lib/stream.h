/* stream.h - the moe-stream format: zstd-compressed msgpack (see moe-stream(5)).
 *
 *   header   {"format":"moe-stream","version":1,"kinds":[...],"provenance":[...]}
 *   record*  {"type":"<name>", ...}          typed arrays as {"dtype","shape","data"}
 *   end      {"type":"end","records":N}      N = number of records before it
 *
 * Readers verify the header, every record's shape, the end record and the
 * record count; zstd frame checksums catch damaged bytes.  Every error
 * message names the stream ("-" is shown as "<stdin>") and the record. */
#ifndef MOE_STREAM_H
#define MOE_STREAM_H

#include <msgpack.h>
#include <stdint.h>

#include "dtype.h" /* typed arrays: f32, f64, f16, bf16, i8, u8, i32, u32, i64 */

#define MOE_STREAM_FORMAT "moe-stream"
#define MOE_STREAM_VERSION 1

/* ---- typed arrays ------------------------------------------------------ */

#define MOE_MAX_DIMS 8

/* A view of a typed array inside a record.  `data` points into the record's
 * memory (valid until the next moe_reader_next) and may be unaligned: read it
 * with the copy helpers below, or memcpy. */
typedef struct {
    moe_dtype dtype;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    int64_t count;       /* product of shape */
    const void *data;
    size_t nbytes;
} moe_array;

/* Parse a typed-array object; on failure sets an error prefixed with `what`
 * (e.g. "calib.msgpack.zst: record 4: key 'ids'") and returns -1. */
int moe_array_parse(const msgpack_object *o, moe_array *a, const char *what);
/* Convert to float32 / int32 into `dst` (a->count elements).  Float dtypes
 * convert to float, integer dtypes to int32 (range-checked, -1 on overflow). */
void moe_array_to_f32(const moe_array *a, float *dst);
int moe_array_to_i32(const moe_array *a, int32_t *dst);

/* ---- msgpack object helpers ------------------------------------------ */

const msgpack_object *moe_map_get(const msgpack_object *map, const char *key);
/* 1 if `o` is a string equal to s. */
int moe_obj_streq(const msgpack_object *o, const char *s);
/* Copy a string object into a malloc'd NUL-terminated string (NULL if not str). */
char *moe_obj_strdup(const msgpack_object *o);

/* ---- packing helpers (writers) ---------------------------------------- */

void moe_pack_str(msgpack_packer *pk, const char *s);
void moe_pack_array(msgpack_packer *pk, moe_dtype dt, int ndim, const int64_t *shape,
                    const void *data);
/* key + value in one call, for building maps */
void moe_pack_kv_str(msgpack_packer *pk, const char *key, const char *val);
void moe_pack_kv_int(msgpack_packer *pk, const char *key, int64_t val);
void moe_pack_kv_double(msgpack_packer *pk, const char *key, double val);
void moe_pack_kv_array(msgpack_packer *pk, const char *key, moe_dtype dt, int ndim,
                       const int64_t *shape, const void *data);

/* ---- reading ----------------------------------------------------------- */

typedef struct moe_reader moe_reader;

/* Open `path` ("-" = stdin), read and validate the header.  NULL on error. */
moe_reader *moe_reader_open(const char *path);
const char *moe_reader_name(const moe_reader *r);        /* for messages */
const msgpack_object *moe_reader_header(const moe_reader *r);
/* The most memory one record may declare (MOE_MAX_RECORD_MIB, default 1024
 * MiB): readers refuse larger ones, and writers of large records check
 * against it so that what they write can be read back. */
uint64_t moe_stream_max_record(void);
/* Next record: 1 and *rec set (valid until the next call), 0 at the end
 * record (count verified, nothing after it), -1 on error. */
int moe_reader_next(moe_reader *r, const msgpack_object **rec);
uint64_t moe_reader_index(const moe_reader *r);          /* 0-based index of *rec */
uint64_t moe_reader_count(const moe_reader *r);          /* records read so far */
const char *moe_record_type(const msgpack_object *rec);  /* never NULL for a valid record */
size_t moe_record_type_len(const msgpack_object *rec);
int moe_record_is(const msgpack_object *rec, const char *type);
void moe_reader_close(moe_reader *r);

/* Typed accessors for a record read from r; on a missing or ill-typed key
 * they set an error naming the stream, the record index and the key, and
 * return -1. */
int moe_record_int(moe_reader *r, const msgpack_object *rec, const char *key, int64_t *out);
int moe_record_array(moe_reader *r, const msgpack_object *rec, const char *key, moe_array *out);
/* Returns a pointer into the record (not NUL-terminated) and its length. */
int moe_record_str(moe_reader *r, const msgpack_object *rec, const char *key,
                   const char **s, size_t *len);

/* Header queries. */
int moe_header_has_kind(const msgpack_object *hdr, const char *kind);
/* Require a kind: error "FILE: stream has kinds [a, b]; KIND needed (hint)". */
int moe_reader_require_kind(moe_reader *r, const char *kind, const char *hint);
/* Compare every model fingerprint in the provenance with `fingerprint`.
 * Mismatch: error (or, with force, a warning on stderr and success). */
int moe_reader_check_model(moe_reader *r, const char *fingerprint, int force);

/* ---- writing ----------------------------------------------------------- */

typedef struct moe_writer moe_writer;

/* Who is writing, for the provenance entry appended to the header. */
typedef struct {
    const char *tool;        /* "moe-calib" */
    int argc;                /* the tool's command line, recorded as given */
    char **argv;
    const char *model;       /* model fingerprint, or NULL */
    const char *kind;        /* kind this tool adds, or NULL */
} moe_provenance;

/* Open `path` ("-" = stdout) for writing.  A file is written under a
 * temporary name and renamed by moe_writer_close().  Refuses a terminal.
 * `upstream` (may be NULL) is the input stream's header: its kinds and
 * provenance are carried over and this tool's entry appended.  With
 * no_provenance, only the kinds are written (for byte-stable fixtures). */
moe_writer *moe_writer_open(const char *path, const msgpack_object *upstream,
                            const moe_provenance *prov, int no_provenance);
/* Start a record of `type` with `nkeys` more key/value pairs to follow,
 * packed by the caller into the returned packer. */
msgpack_packer *moe_writer_record(moe_writer *w, const char *type, uint32_t nkeys);
/* Pass a record through unchanged. */
int moe_writer_copy(moe_writer *w, const msgpack_object *rec);
/* Write the end record, finish compression, flush, rename into place.
 * Returns 0, or -1 with an error (and the temporary file removed). */
int moe_writer_close(moe_writer *w);
/* Give up: remove the temporary file, free everything. */
void moe_writer_abort(moe_writer *w);

#endif
