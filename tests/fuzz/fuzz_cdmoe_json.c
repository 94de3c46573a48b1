/* fuzz_cdmoe_json.c - the original CD-MoE code's JSON files as
 * moe-condense reads them (lib/cplan.c moe_cplan_read_cdmoe: dynamic_weight,
 * layer_idx_to_expert_idx, layer_idx_order) for the deepseek-l5 fixture's
 * config, then the condensation chosen from them (moe_cplan_select).
 * Byte 0: bits 0-1 which file the input is (3: all three, split at NUL
 * bytes), bits 2-4 the layers and bits 5-7 the experts to select. */
#include "fuzz.h"

#include "config.h"
#include "cplan.h"

static const moe_config *fixture_config(void) {
    static moe_config *c;
    if (!c) {
        c = moe_config_load(FUZZ_SRCDIR "/tests/fixtures/search/models/deepseek-l5/config.json");
        if (!c) {
            fprintf(stderr, "fuzz: %s\n", moe_error());
            abort();
        }
    }
    return c;
}

/* The next NUL-separated part of the input (the rest when no NUL). */
static const char *next_part(int slot, const uint8_t **data, size_t *size) {
    const uint8_t *nul = memchr(*data, 0, *size);
    size_t len = nul ? (size_t)(nul - *data) : *size;
    const char *path = fuzz_file(slot, *data, len);
    *data += nul ? len + 1 : len;
    *size -= nul ? len + 1 : len;
    return path;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const moe_config *cfg = fixture_config();
    unsigned sel = fuzz_selector(&data, &size);
    const char *files[3] = {NULL, NULL, NULL};
    if ((sel & 3) == 3)
        for (int i = 0; i < 3; i++) files[i] = next_part(i, &data, &size);
    else
        files[sel & 3] = fuzz_file(sel & 3, data, size);
    moe_cplan *p = moe_cplan_new(cfg);
    if (moe_cplan_read_cdmoe(p, cfg, files[0], files[1], files[2]) == 0) {
        int n = 1 + (int)((sel >> 2) & 7), k = 1 + (int)((sel >> 5) & 7);
        int *layers = malloc((size_t)n * sizeof *layers), *experts = malloc((size_t)(n * k) * sizeof *experts);
        float *weights = malloc((size_t)(n * k) * sizeof *weights);
        if (moe_cplan_select(p, n, k, layers, experts, weights) == 0)
            for (int i = 0; i < n; i++)
                if (layers[i] < 0 || layers[i] >= cfg->num_layers) abort(); /* a chosen layer exists */
        free(layers);
        free(experts);
        free(weights);
    }
    moe_cplan_free(p);
    return 0;
}
