/* jsonout.h - writing JSON text (moe-dump, reports): escaped strings,
 * numbers that round-trip, and msgpack objects with typed arrays summarised. */
#ifndef MOE_JSONOUT_H
#define MOE_JSONOUT_H

#include <msgpack.h>
#include <stdio.h>

/* A JSON string literal; invalid UTF-8 bytes become U+FFFD. */
void moe_json_string(FILE *f, const char *s, size_t len);
/* A number; NaN and infinities, which JSON lacks, as the strings "NaN",
 * "Infinity", "-Infinity".  single: print with float32 precision. */
void moe_json_number(FILE *f, double v, int single);

typedef struct {
    int full;        /* typed arrays: every value instead of a summary */
    int preview;     /* typed arrays: how many leading values in a summary */
} moe_json_opts;

/* A msgpack object as JSON.  Typed arrays ({"dtype","shape","data"}) become
 * {"dtype","shape","first":[...],"min","max","mean"} (or "data":[...] when
 * full); other bin values {"bin":N,"hex":"..."}. */
void moe_json_object(FILE *f, const msgpack_object *o, const moe_json_opts *opts);

#endif
