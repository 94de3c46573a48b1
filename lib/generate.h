/* generate.h - text generation (moe-generate) on top of lib/model.h: greedy
 * or sampled continuation of token sequences with a key/value cache, and the
 * streaming of the generated text (UTF-8 kept whole, stop strings).
 *
 * ---- Decoding (moe_generate) -------------------------------------------------
 * Sequences run in batches of at most max_batch, layer-major: each step runs
 * every live sequence's new tokens through the decoder layers at once (the
 * prompts at the first step, one token each after), each layer loaded once
 * per step (kept loaded across steps when the model fits, moe_model_fits),
 * the attention per sequence over its own cache (moe_layer_attention_kv, the
 * cache moe-eval's prefix sharing uses; one K and one V buffer per layer per
 * sequence, prompt + max_new_tokens rows).  The final norm and lm_head run on
 * each sequence's last row only.  On the CPU the logits are bit-identical to
 * a whole-sequence forward (moe-eval --dump logits) on prompt + generated
 * tokens (kernels.h, attention_kv), whatever the batch and thread count.
 *
 * Choosing a token from logits z[0..V-1]:
 *   temperature <= 0: greedy, the first index of the maximum;
 *   else, in double: z/temperature; top_k > 0 keeps the top_k largest
 *   logits (ties: the lower id first); p_v = exp(z_v - max) over those; top_p
 *   < 1 keeps, in that order (probability descending, ties by id), the
 *   shortest prefix whose mass reaches top_p of the total; then u =
 *   uniform[0,1) x kept mass picks the first token (in that order; id order
 *   when neither filter is on) whose cumulative mass exceeds u.
 * Non-finite logits are an error (nothing sensible can be sampled).
 *
 * Random numbers (portable, documented in moe-generate(1)): each sequence has
 * its own SplitMix64 generator, state = seed + mix(stream + 1) (mix: the
 * SplitMix64 output function; stream = the sequence's index given by the
 * caller), u = (next() >> 11) x 2^-53.  Only integer arithmetic and IEEE
 * double operations in a fixed order: the same seed gives the same tokens on
 * any machine, thread count or batch size.
 *
 * Library rules: nothing printed; -1 with moe_error_set(). */
#ifndef MOE_GENERATE_H
#define MOE_GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "tokenizer.h"

typedef struct {
    int max_new_tokens;   /* per sequence, >= 0 */
    double temperature;   /* <= 0: greedy */
    int top_k;            /* 0: no top-k filter */
    double top_p;         /* in (0, 1]; 1: no nucleus filter */
    uint64_t seed;
    const int32_t *stop_ids; /* tokens that end a sequence (EOS); kept in ids */
    int n_stop_ids;
    int max_batch;        /* sequences decoded together; 0 = 8 */
    int max_positions;    /* total length limit; 0 = max_position_embeddings */
} moe_gen_opts;

enum { MOE_GEN_LENGTH = 0, MOE_GEN_EOS = 1, MOE_GEN_STOP = 2 };

/* One sequence to continue. */
typedef struct {
    const int32_t *prompt; /* [n_prompt], n_prompt >= 1 */
    int n_prompt;
    uint64_t stream;       /* its random stream (e.g. its index in the run) */
    int32_t *ids;          /* out: prompt + generated tokens (malloc'd; free it) */
    int n;                 /* out: length of ids */
    int finish;            /* out: MOE_GEN_LENGTH, MOE_GEN_EOS or MOE_GEN_STOP */
} moe_gen_seq;

/* Called for each new token of sequence s (an index into the seqs passed),
 * in sequence order within a step, after it is appended to seqs[s].ids; last
 * = 1 when s ends with it (length, or a stop id: finish is MOE_GEN_EOS
 * already).  Return 0 to go on, 1 to end s here (finish becomes
 * MOE_GEN_STOP: a stop string), -1 to abort (error set). */
typedef int (*moe_gen_token_fn)(void *ctx, int s, int32_t id, int last);

typedef struct {
    int64_t prompt_tokens, new_tokens;
    double load_s;              /* loading the weights of a model that stays loaded */
    double prefill_s, decode_s; /* time of the first step of each batch, of the others */
} moe_gen_stats;

/* Continue seqs[0..n-1]; cb may be NULL; st (may be NULL) accumulates.  0 or -1. */
int moe_generate(moe_model *m, moe_gen_seq *seqs, int n, const moe_gen_opts *o,
                 moe_gen_token_fn cb, void *ctx, moe_gen_stats *st);

/* One token from logits z[0..V-1] as described above; rng: the sequence's
 * generator state (advanced once when sampling, untouched when greedy).
 * The id, or -1 (non-finite logits, error set). */
int32_t moe_gen_pick(const float *z, int V, const moe_gen_opts *o, uint64_t *rng);
uint64_t moe_gen_rng_init(uint64_t seed, uint64_t stream);
double moe_gen_uniform(uint64_t *rng); /* [0, 1) */

/* The ids that end a generation by default: eos_token_id of the model's
 * config.json and generation_config.json (a number or a list; Hugging Face's
 * generate stops on any of them), distinct, in that order.  *ids malloc'd
 * (may be empty).  Returns their number, or -1 (a file that is not JSON, an
 * id that is not one). */
int moe_gen_eos_ids(const char *model_dir, int32_t **ids);

/* ---- Text as it is produced (moe_detok) ----------------------------------------
 * Decodes the generated ids (special tokens left out) and hands out the new
 * text after each token: bytes of a UTF-8 character that a byte-level token
 * split are held back until the character is whole (invalid sequences
 * become U+FFFD, as the tokenizer's decode does), and so is any tail that
 * could be the start of a stop string.  When a stop string appears, the text
 * before its first occurrence is the last handed out, and the stop string
 * itself is not (as OpenAI's and vLLM's "stop").  Ids past the tokenizer's
 * vocabulary (models pad theirs) have no text, as in tokenizers' decode. */
typedef struct {
    const moe_tokenizer *tok;
    const char *const *stops;
    int n_stops;
    int32_t *ids;
    size_t n, cap;
    char *text;     /* decoded so far (valid UTF-8) */
    size_t len;
    size_t emitted; /* bytes of text handed out */
    int stopped;    /* a stop string was seen: text ends before it */
} moe_detok;

void moe_detok_init(moe_detok *d, const moe_tokenizer *tok, const char *const *stops, int n_stops);
void moe_detok_free(moe_detok *d);
/* Add a token: *out, *len = the text that became final (points into d,
 * valid until the next call).  1 when a stop string ended the text, 0
 * otherwise, -1 on a decoding error. */
int moe_detok_push(moe_detok *d, int32_t id, const char **out, size_t *len);
/* The sequence ended: what is still held back (an incomplete character as
 * U+FFFD, a partial stop string as text).  0 or -1. */
int moe_detok_finish(moe_detok *d, const char **out, size_t *len);

#endif
