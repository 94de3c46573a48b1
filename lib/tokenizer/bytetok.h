/* bytetok.h - write a small GPT-2 style byte-level BPE tokenizer for random
 * checkpoints (moe-init): tokenizer.json + tokenizer_config.json.
 *
 * Vocabulary: ids 0..255 are the 256 bytes (id = byte value, token string =
 * the GPT-2 byte->char mapping, e.g. space = "Ġ"); then merges built from a
 * fixed list of frequent English words (each word merged left to right,
 * e.g. "Ġ t", "Ġt h", "Ġth e"), as many as fit; then one special token
 * "<|endoftext|>" (bos = eos).  Pre-tokenizer / decoder / post-processor:
 * ByteLevel (GPT-2 regex, no prefix space).  Any byte string round-trips.
 * Loads with the Python `tokenizers` library and transformers'
 * PreTrainedTokenizerFast.  Deterministic. */
#ifndef MOE_BYTETOK_H
#define MOE_BYTETOK_H

/* Number of tokens the writer would produce for vocab_size (<= vocab_size),
 * and the id of "<|endoftext|>" (= that number - 1).  -1 if vocab_size < 257. */
int moe_bytetok_size(int vocab_size);

/* Write DIR/tokenizer.json and DIR/tokenizer_config.json using at most
 * vocab_size ids.  model_max_length goes into tokenizer_config.json.
 * 0, or -1 with an error. */
int moe_bytetok_write(const char *dir, int vocab_size, int model_max_length);

#endif
