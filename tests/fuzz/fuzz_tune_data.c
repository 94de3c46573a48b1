/* fuzz_tune_data.c - moe-tune's training data reader (lib/tune_data.c): JSON
 * Lines of {"text"}, {"prompt","response"}, {"turns"} and {"ids"}, the
 * original's {"instances"} file, and token streams, with the eval fixture
 * model's tokenizer.  Byte 0: bit 0 a token stream (the rest is its
 * msgpack, compressed here), else a text file; bits 1-3 max_length (0 =
 * none).  Every error must name the file. */
#include "fuzz.h"
#include "tokenizer.h"
#include "tune_data.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static moe_tokenizer *tok;
    if (!tok && !(tok = moe_tokenizer_open(FUZZ_SRCDIR "/tests/fixtures/eval/model"))) {
        fprintf(stderr, "fuzz: %s\n", moe_error());
        abort();
    }
    unsigned sel = fuzz_selector(&data, &size);
    const char *path = sel & 1 ? fuzz_stream_file(0, data, size, 0) : fuzz_file(0, data, size);
    moe_tune_data_opts o = {.tok = tok, .model_dir = FUZZ_SRCDIR "/tests/fixtures/eval/model",
                            .max_length = (int)((sel >> 1) & 7), .vocab = 317, .eos_id = 316};
    moe_tune_data d;
    moe_error_clear();
    if (moe_tune_data_load(&d, path, &o) == 0) {
        for (int i = 0; i < d.n; i++) /* what the trainer relies on */
            if (d.seqs[i].len < 1 || (o.max_length && d.seqs[i].len > o.max_length)) abort();
        moe_tune_data_free(&d);
    } else if (strncmp(moe_error(), path, strlen(path)) != 0) {
        fprintf(stderr, "an error that does not name the file: %s\n", moe_error());
        abort();
    }
    return 0;
}
