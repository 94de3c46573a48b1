/* tok_internal.h - internals of the tokenizer (tokenizer.c, tok_*.c). */
#ifndef MOE_TOK_INTERNAL_H
#define MOE_TOK_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <oniguruma.h>
#include "tokenizer.h"

/* ---- byte buffers ------------------------------------------------------ */
typedef struct { char *p; size_t n, cap; } tk_buf;
void tk_buf_reserve(tk_buf *b, size_t extra);
void tk_buf_put(tk_buf *b, const void *s, size_t n);
static inline void tk_buf_putc(tk_buf *b, char c) { tk_buf_put(b, &c, 1); }

typedef struct { int32_t *p; size_t n, cap; } tk_ids;
void tk_ids_push(tk_ids *v, int32_t x);
void tk_ids_append(tk_ids *v, const int32_t *x, size_t n);

/* ---- string -> int32 hash map (keys copied into a pool) ---------------- */
typedef struct {
    tk_buf pool;
    struct tk_ent { uint32_t hash, len; size_t off; int32_t val; } *ent;
    size_t n, ent_cap;
    uint32_t *slot;   /* index+1 into ent, 0 = empty */
    size_t nslot;     /* power of two */
} tk_strmap;
uint32_t tk_hash(const void *s, size_t n);
/* Insert or overwrite; returns the entry index. */
size_t tk_strmap_put(tk_strmap *m, const char *s, size_t n, int32_t val);
/* Value, or -1 if absent (values are >= 0 by convention). */
int32_t tk_strmap_get(const tk_strmap *m, const char *s, size_t n);
void tk_strmap_clear(tk_strmap *m);
void tk_strmap_free(tk_strmap *m);

/* ---- merges: (left id, right id) -> (rank, merged id) ------------------ */
typedef struct { uint64_t key; int32_t rank, id; } tk_merge;
typedef struct { tk_merge *t; size_t cap, n; } tk_mergemap;
void tk_merge_put(tk_mergemap *m, int32_t a, int32_t b, int32_t rank, int32_t id);
const tk_merge *tk_merge_get(const tk_mergemap *m, int32_t a, int32_t b);

/* ---- regex patterns ---------------------------------------------------- */
typedef struct { OnigRegex re; OnigRegion *region; } tk_regex;
/* Compile a regex (is_literal: the string is matched literally). */
int tk_regex_compile(tk_regex *r, const char *pat, size_t len, int is_literal, const char *what);
void tk_regex_free(tk_regex *r);
/* Next match in s[0..n) at or after `from`: 1 and [*b,*e), or 0. */
int tk_regex_find(tk_regex *r, const char *s, size_t n, size_t from, size_t *b, size_t *e);

/* ---- UTF-8 --------------------------------------------------------------- */
/* Decode one code point at s (n > 0 bytes available); returns its length,
 * or -1 if invalid.  */
int tk_utf8_decode(const unsigned char *s, size_t n, int32_t *cp);
int tk_utf8_encode(int32_t cp, char *out);
int tk_is_numeric(int32_t cp);      /* Rust char::is_numeric: Nd, Nl, No */
int tk_is_whitespace(int32_t cp);   /* Rust char::is_whitespace */
int tk_is_alnum(int32_t cp);        /* Rust char::is_alphanumeric */

/* ---- normalizers, pre-tokenizers, decoders --------------------------- */
enum { NRM_NFC, NRM_NFD, NRM_NFKC, NRM_NFKD, NRM_LOWER, NRM_PREPEND, NRM_REPLACE, NRM_STRIP };
typedef struct {
    int type;
    char *str; size_t slen;       /* Prepend / Replace content */
    tk_regex pat;                 /* Replace pattern */
    int left, right;              /* Strip */
} tk_norm;

enum { SPLIT_ISOLATED, SPLIT_REMOVED, SPLIT_MERGED_PREV, SPLIT_MERGED_NEXT, SPLIT_CONTIGUOUS };
enum { PT_SPLIT, PT_BYTELEVEL, PT_DIGITS, PT_METASPACE, PT_WSPLIT };
enum { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER };
typedef struct {
    int type;
    tk_regex pat;                 /* Split (and ByteLevel's GPT-2 regex) */
    int behavior, invert;
    int add_prefix_space, use_regex;  /* ByteLevel */
    int individual;                   /* Digits */
    char repl[8]; int repl_len;       /* Metaspace */
    int prepend, split;               /* Metaspace */
} tk_pretok;

enum { DEC_BYTELEVEL, DEC_REPLACE, DEC_BYTEFALLBACK, DEC_FUSE, DEC_STRIP, DEC_METASPACE };
typedef struct {
    int type;
    char *from, *to; size_t flen, tlen;   /* Replace */
    char *content; size_t clen; int start, stop;  /* Strip */
    char repl[8]; int repl_len; int prepend;      /* Metaspace */
} tk_dec;

/* ---- added tokens ---------------------------------------------------- */
typedef struct {
    char *content; size_t len;    /* normalized form for normalized tokens */
    char *orig; size_t olen;      /* content as written in tokenizer.json */
    int32_t id;
    int special, normalized, lstrip, rstrip, single_word;
} tk_added;

typedef struct {
    tk_added *tok; size_t n;      /* sorted by first byte, then length descending */
    uint32_t first[257];          /* tok[first[c]..first[c+1]) start with byte c */
} tk_addset;

/* ---- the tokenizer ------------------------------------------------------ */
struct moe_tokenizer {
    char *path;                   /* tokenizer.json, for messages */
    int is_clone;                 /* shares everything but the state below, norm and pre */
    /* model */
    tk_strmap vocab;              /* token -> id (model vocabulary) */
    tk_mergemap merges;
    int32_t merge_rank;           /* merges loaded so far */
    char **id_str; uint32_t *id_len; size_t nids;  /* id -> token (model + added) */
    unsigned char *is_special;    /* per id: special added token */
    int32_t unk_id;               /* -1 if none */
    int fuse_unk, byte_fallback, ignore_merges;
    char *cont_prefix, *eow_suffix; size_t cp_len, eow_len;
    int32_t byte_id[256];         /* byte-level: id of each byte's char, -1 if absent */
    int byte_fast;                /* all 256 present and no prefix/suffix */
    /* pipeline */
    tk_norm *norm; int nnorm;
    tk_pretok *pre; int npre;
    int byte_level;               /* a ByteLevel pre-tokenizer is present (last step) */
    tk_dec *dec; int ndec; int has_decoder;
    tk_addset added_raw, added_norm;
    int32_t *prefix, *suffix; size_t nprefix, nsuffix;  /* post-processor */
    /* scratch and cache (encode is not reentrant) */
    tk_strmap cache; tk_ids cache_ids;
    tk_buf work, nbuf, mbuf;
    tk_ids out;
    struct tk_sym { int32_t id, prev, next, len; } *sym; size_t sym_cap;
    struct tk_heap { int32_t rank, pos, id; } *heap; size_t heap_cap;
    struct tk_spans { struct tk_span { size_t b, e; int m; } *p; size_t n, cap; } pa, pb, mt;
};

/* tok_pipeline.c */
int tk_normalize(const moe_tokenizer *t, const char *s, size_t n, tk_buf *out);
int tk_pretokenize(moe_tokenizer *t, size_t off, size_t len, int first);
int tk_decode_chain(const moe_tokenizer *t, char **tok, size_t *tlen, size_t ntok, int raw,
                    tk_buf *out);
/* tok_json.c: fast path for model.vocab / model.merges */
int tk_json_find_model(const char *s, size_t n, size_t span[4]);
int tk_json_vocab(moe_tokenizer *t, const char *s, size_t b, size_t e,
                  void (*add)(moe_tokenizer *, const char *, size_t, int32_t));
int tk_json_merges(moe_tokenizer *t, const char *s, size_t b, size_t e,
                   int (*add)(moe_tokenizer *, size_t, const char *, size_t, const char *, size_t, int));
/* tok_bpe.c */
void tk_bpe_word(moe_tokenizer *t, const char *s, size_t n);
extern const int32_t tk_byte_char[256];   /* byte -> code point (GPT-2 table) */
int tk_char_byte(int32_t cp);             /* inverse, -1 if not in the table */

#endif
