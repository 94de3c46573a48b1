/* fuzz_encode.c - the encoder and decoder on fixture tokenizers (three
 * synthetic ones of tests/fixtures/tokenizer and the eval model's): any
 * bytes as text, encoded with or without special tokens and truncation, the
 * ids decoded back; and the bytes as int32 ids, decoded (out-of-range ids
 * must be refused, not read).  Byte 0 chooses the tokenizer and options. */
#include "fuzz.h"

#include "tokenizer.h"

static const char *const fixtures[] = {
    "tests/fixtures/tokenizer/synth-llama/tokenizer.json",
    "tests/fixtures/tokenizer/synth-meta/tokenizer.json",
    "tests/fixtures/tokenizer/synth-split/tokenizer.json",
    "tests/fixtures/eval/model/tokenizer.json",
};
#define N_FIXTURES (sizeof fixtures / sizeof *fixtures)

static moe_tokenizer *fixture(unsigned i) {
    static moe_tokenizer *open[N_FIXTURES];
    if (!open[i]) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", FUZZ_SRCDIR, fixtures[i]);
        open[i] = moe_tokenizer_open(path);
        if (!open[i]) {
            fprintf(stderr, "fuzz: %s\n", moe_error());
            abort();
        }
    }
    return open[i];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    unsigned sel = fuzz_selector(&data, &size);
    moe_tokenizer *t = fixture(sel % N_FIXTURES);
    int add_special = (sel >> 2) & 1, flags = (sel >> 3) & 3;
    size_t max_length = (sel >> 5) & 7; /* 0: no truncation */
    int32_t *ids = NULL;
    size_t n = 0;
    if (moe_tokenizer_encode_trunc(t, (const char *)data, size, add_special, max_length, &ids, &n) == 0) {
        if (max_length && n > max_length) abort(); /* truncation must hold */
        char *text = NULL;
        size_t len;
        if (moe_tokenizer_decode(t, ids, n, flags, &text, &len) == 0) free(text);
    }
    free(ids);
    /* the bytes as ids */
    size_t k = size / sizeof(int32_t);
    int32_t *raw = malloc((k ? k : 1) * sizeof *raw);
    if (k) memcpy(raw, data, k * sizeof *raw);
    char *text = NULL;
    size_t len;
    if (moe_tokenizer_decode(t, raw, k, flags, &text, &len) == 0) free(text);
    free(raw);
    return 0;
}
