/* fuzz_cdmoe_export.c - moe-dump --cdmoe-json (lib/cdmoe_export.c): a
 * stream exported as the original CD-MoE code's weights, experts or order
 * JSON (byte 0 % 3 chooses), written to /dev/null.  Byte 0 bit 7 set: the
 * rest is the file as is; clear: the msgpack, compressed here. */
#include "fuzz.h"

#include "cdmoe_export.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const char *const what[] = {"weights", "experts", "order"};
    static FILE *devnull;
    if (!devnull && !(devnull = fopen("/dev/null", "w"))) fuzz_die("fuzz: /dev/null");
    unsigned sel = fuzz_selector(&data, &size);
    moe_reader *r = moe_reader_open(fuzz_stream_file(0, data, size, sel >> 7));
    if (!r) return 0;
    (void)moe_cdmoe_export(r, what[(sel & 127) % 3], devnull);
    moe_reader_close(r);
    return 0;
}
