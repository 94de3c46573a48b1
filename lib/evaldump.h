/* evaldump.h - moe-eval --dump: run the forward pass over a token stream and
 * write hidden states / logits as a moe-stream (kind "dump").
 *
 * Input records of type "tokens" ({"index": int, "ids": i32 [T]}) are
 * processed in batches of at most batch_tokens tokens, layer-major (each
 * layer's weights are converted once per batch).  Every input record is
 * passed through unchanged, in order; after each "tokens" record comes its
 *   {"type": "dump", "index": int,
 *    "hidden": f32 [L+1, T, H]   (if wanted: Hugging Face output_hidden_states,
 *                                 embeddings first, the last after the final norm)
 *    "logits": f32 [T, V]}       (if wanted) */
#ifndef MOE_EVALDUMP_H
#define MOE_EVALDUMP_H

#include "model.h"
#include "records.h"
#include "stream.h"

typedef struct {
    int hidden, logits;  /* what to dump */
    int max_length;      /* truncate sequences to this many tokens (0 = no limit) */
    size_t batch_tokens; /* tokens per layer-major batch (0 = 2048) */
    moe_tokens_check *tokenizer; /* the model's tokenizer, which the tokens must come
                                    from (NULL: not checked) */
} moe_dump_opts;

/* Parse "hidden,logits" (any non-empty subset) into o; 0 or -1 with error. */
int moe_dump_parse_what(const char *s, moe_dump_opts *o);

/* Reads r to its end record, writes to w (not closed).  0 or -1. */
int moe_eval_dump(moe_model *m, moe_reader *r, moe_writer *w, const moe_dump_opts *o);

#endif
