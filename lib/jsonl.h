/* jsonl.h - JSON Lines input, as moe-tokenize and moe-eval read it: numbered
 * lines from a file or standard input, the text of one sample, and errors
 * that name the place as "FILE: line N: what".
 *
 *   moe_jsonl *r = moe_jsonl_open(path);          ("-" = standard input)
 *   while ((rc = moe_jsonl_next(r, &line, &len)) > 0) {
 *       if (moe_jsonl_blank(line, len)) continue;
 *       json_t *obj; const char *text; size_t n;
 *       if (moe_jsonl_text(moe_jsonl_name(r), moe_jsonl_lineno(r), line, len,
 *                          "text", 0, &obj, &text, &n) < 0) ...
 *       json_decref(obj);
 *   }
 *   moe_jsonl_close(r);
 *
 * The parsing functions take the name and line number rather than the
 * reader, so that lines copied away can be parsed later (moe-tokenize
 * parses a batch of lines on several threads). */
#ifndef MOE_JSONL_H
#define MOE_JSONL_H

#include "common.h"

#include <jansson.h>

typedef struct moe_jsonl moe_jsonl;

/* NULL with an I/O error naming the file. */
moe_jsonl *moe_jsonl_open(const char *path);
/* The next line without its newline (valid until the next call): 1, or 0
 * at the end, or -1 with an I/O error. */
int moe_jsonl_next(moe_jsonl *r, const char **line, size_t *len);
const char *moe_jsonl_name(const moe_jsonl *r);  /* the path, "<stdin>" for "-" */
uint64_t moe_jsonl_lineno(const moe_jsonl *r);   /* of the last line read, from 1 */
uint64_t moe_jsonl_offset(const moe_jsonl *r);   /* bytes read so far */
uint64_t moe_jsonl_size(const moe_jsonl *r);     /* a regular file's size, else 0 */
void moe_jsonl_close(moe_jsonl *r);

/* Only spaces, tabs and carriage returns: a line without a sample. */
int moe_jsonl_blank(const char *line, size_t len);

/* Set a data error "NAME: line N: message". */
void moe_jsonl_error(const char *name, uint64_t lineno, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Put "NAME: line N: " before the current error (e.g. the tokenizer's). */
void moe_jsonl_error_at(const char *name, uint64_t lineno);

/* The text of a JSON Lines sample: the string in `field` of the object on
 * this line, or, with turns, the first of a "turns" array of strings when
 * there is one (chat samples).  *obj (which *text points into) is the
 * caller's to json_decref, also after an error. */
int moe_jsonl_text(const char *name, uint64_t lineno, const char *line, size_t len, const char *field,
                   int turns, json_t **obj, const char **text, size_t *text_len);

#endif
