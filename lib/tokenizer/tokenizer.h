/* tokenizer.h - Hugging Face tokenizer.json (byte-level / byte-fallback BPE)
 * in C, token for token identical with the `tokenizers` library.
 *
 * Pipeline (as tokenizers' encode_single_sequence):
 *   1. added tokens with normalized=false are cut out of the raw text
 *      (leftmost-longest; lstrip/rstrip/single_word honoured);
 *   2. the normalizer runs on the other pieces, then added tokens with
 *      normalized=true are cut out of the normalized pieces;
 *   3. the pre-tokenizer splits each remaining piece (Split, ByteLevel,
 *      Digits, Metaspace, Sequence), regexes through Oniguruma;
 *   4. BPE (merge ranks, byte_fallback, unk) on every pre-token;
 *   5. the post-processor adds BOS/EOS when add_special is set.
 * tokenizer_config.json, when present, decides BOS/EOS the way the
 * transformers 4.x Llama/Gemma/GPT-NeoX fast tokenizers do (add_bos_token,
 * add_eos_token rebuild the template); otherwise tokenizer.json's
 * post_processor is used.
 *
 * Invalid UTF-8 in the text: for byte-level tokenizers every byte that is
 * not part of a valid UTF-8 sequence becomes its own pre-token (so any byte
 * string round-trips); for other tokenizers it is an error.
 *
 * A tokenizer caches the BPE of words it has seen: one moe_tokenizer must
 * not be used by two threads at once (give each thread a moe_tokenizer_clone). */
#ifndef MOE_TOKENIZER_H
#define MOE_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

typedef struct moe_tokenizer moe_tokenizer;

/* Open `path`: a model directory holding tokenizer.json (and optionally
 * tokenizer_config.json), or the path of a tokenizer.json file.  NULL and
 * moe_error() on failure (unknown component types are named). */
moe_tokenizer *moe_tokenizer_open(const char *path);
/* Another handle on the same tokenizer, for another thread: it shares the
 * read-only model with t (t must stay open until the clone is closed) and
 * has its own cache and scratch space. */
moe_tokenizer *moe_tokenizer_clone(const moe_tokenizer *t);
void moe_tokenizer_close(moe_tokenizer *t);

/* Encode `len` bytes of `text`.  *ids is malloc'd (free it), *n its length.
 * add_special: apply the post-processor (BOS/EOS).  max_length > 0:
 * truncate like transformers' truncation=True, max_length=N (the special
 * tokens count toward N and are kept).  Returns 0, or -1 with an error. */
int moe_tokenizer_encode(moe_tokenizer *t, const char *text, size_t len, int add_special,
                         int32_t **ids, size_t *n);
int moe_tokenizer_encode_trunc(moe_tokenizer *t, const char *text, size_t len,
                               int add_special, size_t max_length, int32_t **ids, size_t *n);

/* Decode ids to text.  *text is malloc'd and NUL-terminated (free it).
 * Flags: MOE_TOK_SKIP_SPECIAL drops special added tokens (tokenizers'
 * skip_special_tokens); MOE_TOK_RAW keeps the bytes that byte-level
 * decoding yields even where they are not valid UTF-8 (the default, like
 * tokenizers, replaces invalid sequences with U+FFFD). */
enum { MOE_TOK_SKIP_SPECIAL = 1, MOE_TOK_RAW = 2 };
int moe_tokenizer_decode(const moe_tokenizer *t, const int32_t *ids, size_t n, int flags,
                         char **text, size_t *len);

/* Number of ids (largest id + 1, added tokens included). */
size_t moe_tokenizer_vocab_size(const moe_tokenizer *t);
/* Id of a token string (vocabulary or added token), -1 if none. */
int32_t moe_tokenizer_token_id(const moe_tokenizer *t, const char *token);
/* How many ids the post-processor adds to one sequence (0 if add_special=0). */
size_t moe_tokenizer_num_special(const moe_tokenizer *t, int add_special);

/* UTF-8 helpers.  moe_utf8_check returns len if s is valid UTF-8, else the
 * offset of the first invalid byte.  moe_utf8_lossy copies s replacing each
 * maximal invalid subsequence by U+FFFD (as Rust's from_utf8_lossy and
 * Python's errors="replace"); result malloc'd and NUL-terminated. */
size_t moe_utf8_check(const char *s, size_t len);
char *moe_utf8_lossy(const char *s, size_t len, size_t *outlen);

#endif
