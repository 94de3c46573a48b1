/* fuzz_tokenizer.c - tokenizer.json (lib/tok*.c, lib/tokenizer.c): the
 * model, vocabulary, merges, added tokens, normalizers, pre-tokenizers,
 * post-processor and decoder; a tokenizer that opens then encodes a few
 * texts, decodes them back and decodes every id it declares (up to 512). */
#include "fuzz.h"

#include "tokenizer.h"

static const char *const texts[] = {
    "Hello world", " the cat's 123 sat\n\n  on\tthe mat.", "na\xc3\xafve caf\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87",
    "<s></s><unk><|endoftext|>", "\xf0\x9f\x98\x80 emoji", "",
};

static void round_trip(moe_tokenizer *t, const char *text, int add_special) {
    int32_t *ids = NULL;
    size_t n = 0;
    if (moe_tokenizer_encode(t, text, strlen(text), add_special, &ids, &n) == 0) {
        char *back = NULL;
        size_t len;
        if (moe_tokenizer_decode(t, ids, n, add_special ? MOE_TOK_SKIP_SPECIAL : 0, &back, &len) == 0) free(back);
    }
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_tokenizer *t = moe_tokenizer_open(fuzz_file(0, data, size));
    if (!t) return 0;
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) round_trip(t, texts[i], (int)(i & 1));
    size_t vocab = moe_tokenizer_vocab_size(t);
    for (int32_t id = 0; id < (int32_t)vocab && id < 512; id++) {
        size_t len;
        char *text = NULL;
        if (moe_tokenizer_decode(t, &id, 1, MOE_TOK_RAW, &text, &len) == 0) free(text);
    }
    (void)moe_tokenizer_token_id(t, "the");
    (void)moe_tokenizer_num_special(t, 1);
    moe_tokenizer_close(t);
    return 0;
}
