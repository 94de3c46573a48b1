/* tune_data.h - moe-tune's training data: token sequences with their
 * targets, read from text or token streams, and the order of each epoch.
 *
 * Inputs (the format is found from the content):
 *   - a moe-stream of tokens records (moe-tokenize's output): every token
 *     is trained on;
 *   - the original CD-MoE code's JSON file {"instances": [{"text": ...}, ...]}:
 *     as {"text"} lines;
 *   - JSON Lines, each line one of
 *       {"text": T}                      loss on every token (as the original);
 *       {"prompt": P, "response": R}     loss on R (and the EOS after it) only;
 *       {"turns": [{"role": ROLE, "content": C}, ...]}
 *                                        loss on the assistant turns only;
 *       {"ids": [...]}                   token ids made elsewhere (no special
 *                                        tokens added): loss on every token.
 * Tokenization: a text is tokenized as moe-tokenize does (the tokenizer's
 * special tokens, e.g. BOS, added; truncated to max_length keeping them).
 * A prompt is tokenized with the special tokens, the response without,
 * followed by the model's EOS token (config.json eos_token_id) when it has
 * one.  Turns use this template, one turn after the other:
 *       "ROLE: "       (never trained on)
 *       CONTENT "\n"   (trained on when ROLE is "assistant")
 * the first piece tokenized with the special tokens, every other without,
 * and the model's EOS after the last assistant turn (trained on).  The
 * result is cut to max_length tokens.  Nothing is padded: sequences keep
 * their own lengths.
 *
 * Targets are shifted as lib/train.h wants them: targets[t] is the label of
 * position t+1 (-100 where not trained on, and at the last position).
 *
 * Errors: -1 with moe_error_set(), "FILE: line N: what" / "FILE: record N: what". */
#ifndef MOE_TUNE_DATA_H
#define MOE_TUNE_DATA_H

#include <stdint.h>

#include "tokenizer.h"

typedef struct {
    int32_t *ids;      /* [len] */
    int32_t *targets;  /* [len] */
    int len;
    long ntargets;     /* positions with a target >= 0 */
} moe_tune_seq;

typedef struct {
    int n;
    moe_tune_seq *seqs;
    long ntargets;     /* Σ over the sequences */
} moe_tune_data;

typedef struct {
    moe_tokenizer *tok;     /* NULL: only token streams are accepted */
    const char *model_dir;  /* token streams: their tokenizer fingerprint is checked against it */
    int force;              /* a tokenizer mismatch is a warning */
    int max_length;         /* > 0: cut every sequence to it */
    int vocab;              /* ids must be below it */
    int eos_id;             /* -1: none */
} moe_tune_data_opts;

/* Read every sample of path ("-": standard input, JSON Lines only) into d. */
int moe_tune_data_load(moe_tune_data *d, const char *path, const moe_tune_data_opts *o);
void moe_tune_data_free(moe_tune_data *d);

/* Sequence ids 0..n-1 in the order of epoch `epoch` (from 0): shuffled by
 * a Fisher-Yates shuffle drawn from (seed, epoch) alone, so an epoch's order
 * is known without replaying the ones before (resume); in file order when
 * shuffle is 0. */
void moe_tune_epoch_order(int *order, int n, uint64_t seed, long epoch, int shuffle);

/* Sets target[t] = label[t+1] for t < len-1, -100 at the end; returns the
 * number of targets >= 0.  (label: the ids, or -100 where not trained on.) */
long moe_tune_shift_labels(int32_t *target, const int32_t *label, int len);

#endif
