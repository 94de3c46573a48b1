/* fuzz_jsonl.c - moe-tokenize's input readers (tools/moe-tokenize.c,
 * process(): JSON Lines text in a field, --ids lines, --lines plain text),
 * line by line as the tool hands them over, with the eval fixture model's
 * tokenizer.  Byte 0: bits 0-1 the mode (text, ids, lines), bit 2
 * --no-special, bits 3-5 --max-length (0 = none), bit 6 --field "t".
 * The tool is compiled in whole (its main renamed) so that the fuzzed code
 * is the tool's own. */
#include "fuzz.h"

#define main moe_tokenize_main
#include "../../tools/moe-tokenize.c"
#undef main

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static moe_tokenizer *tok;
    if (!tok) {
        tok = moe_tokenizer_open(FUZZ_SRCDIR "/tests/fixtures/eval/model/tokenizer.json");
        if (!tok) {
            fprintf(stderr, "fuzz: %s\n", moe_error());
            abort();
        }
    }
    unsigned sel = fuzz_selector(&data, &size);
    opts_t o = {.field = sel & 64 ? "t" : "text", .max_length = (long)((sel >> 3) & 7),
                .no_special = (sel >> 2) & 1, .ids = (sel & 3) == 1, .lines = (sel & 3) == 2};
    size_t vocab = moe_tokenizer_vocab_size(tok);
    uint64_t lineno = 0;
    for (size_t off = 0; off < size;) {
        const uint8_t *nl = memchr(data + off, '\n', size - off);
        size_t len = nl ? (size_t)(nl - (data + off)) : size - off;
        item it = {.line = malloc(len + 1), .len = len, .lineno = ++lineno};
        memcpy(it.line, data + off, len);
        it.line[len] = 0; /* getline's lines end in NUL too */
        process(&o, tok, "input.jsonl", vocab, &it);
        if (it.err && strncmp(it.err, "input.jsonl:", 12)) {
            fprintf(stderr, "an error that does not name the file: %s\n", it.err);
            abort();
        }
        free(it.line);
        free(it.ids);
        free(it.err);
        off += len + 1;
    }
    return 0;
}
