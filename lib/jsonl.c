/* jsonl.c - JSON Lines input (see jsonl.h). */
#define _GNU_SOURCE
#include "jsonl.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct moe_jsonl {
    FILE *f;
    char *name;
    char *buf;
    size_t cap;
    uint64_t lineno, offset;
};

moe_jsonl *moe_jsonl_open(const char *path) {
    int is_stdin = strcmp(path, "-") == 0;
    FILE *f = is_stdin ? stdin : fopen(path, "rb");
    if (!f) {
        moe_error_set(MOE_ERR_IO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    moe_jsonl *r = moe_calloc(1, sizeof *r);
    r->f = f;
    r->name = moe_strdup(is_stdin ? "<stdin>" : path);
    return r;
}

int moe_jsonl_next(moe_jsonl *r, const char **line, size_t *len) {
    errno = 0;
    ssize_t n = getline(&r->buf, &r->cap, r->f);
    if (n < 0) {
        if (!ferror(r->f)) return 0;
        moe_error_set(MOE_ERR_IO, "%s: read error: %s", r->name, strerror(errno));
        return -1;
    }
    r->lineno++;
    r->offset += (uint64_t)n;
    if (n && r->buf[n - 1] == '\n') r->buf[--n] = 0;
    *line = r->buf;
    *len = (size_t)n;
    return 1;
}

const char *moe_jsonl_name(const moe_jsonl *r) { return r->name; }
uint64_t moe_jsonl_lineno(const moe_jsonl *r) { return r->lineno; }
uint64_t moe_jsonl_offset(const moe_jsonl *r) { return r->offset; }

uint64_t moe_jsonl_size(const moe_jsonl *r) {
    struct stat st;
    return r->f != stdin && fstat(fileno(r->f), &st) == 0 && S_ISREG(st.st_mode) ? (uint64_t)st.st_size : 0;
}

void moe_jsonl_close(moe_jsonl *r) {
    if (!r) return;
    if (r->f != stdin) fclose(r->f);
    free(r->buf);
    free(r->name);
    free(r);
}

int moe_jsonl_blank(const char *line, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r') return 0;
    return 1;
}

void moe_jsonl_error(const char *name, uint64_t lineno, const char *fmt, ...) {
    char what[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    moe_error_set(MOE_ERR_DATA, "%s: line %llu: %s", name, (unsigned long long)lineno, what);
}

void moe_jsonl_error_at(const char *name, uint64_t lineno) {
    /* a copy first: the message is formatted into the buffer it comes from */
    char *what = moe_strdup(moe_error());
    moe_jsonl_error(name, lineno, "%s", what);
    free(what);
}

/* The first string of a "turns" array, or NULL. */
static json_t *first_turn(json_t *obj) {
    json_t *turns = json_object_get(obj, "turns");
    json_t *first = json_is_array(turns) ? json_array_get(turns, 0) : NULL;
    return json_is_string(first) ? first : NULL;
}

int moe_jsonl_text(const char *name, uint64_t lineno, const char *line, size_t len, const char *field,
                   int turns, json_t **obj, const char **text, size_t *text_len) {
    json_error_t err;
    *obj = json_loadb(line, len, JSON_ALLOW_NUL, &err);
    if (!*obj) {
        moe_jsonl_error(name, lineno, "not JSON: %s", err.text);
        return -1;
    }
    if (!json_is_object(*obj)) {
        moe_jsonl_error(name, lineno, "not a JSON object");
        return -1;
    }
    json_t *v = turns ? first_turn(*obj) : NULL;
    if (!v) v = json_object_get(*obj, field);
    if (!json_is_string(v)) {
        moe_jsonl_error(name, lineno, "%s field '%s'", v ? "not a string:" : "missing", field);
        return -1;
    }
    *text = json_string_value(v);
    *text_len = json_string_length(v);
    return 0;
}
