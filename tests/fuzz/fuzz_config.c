/* fuzz_config.c - config.json (lib/config.c) as a checkpoint of 4096
 * tensors would bound it: parse, then everything derived from a config
 * (the implied tensor list with names and shapes, the config written back
 * and parsed again). */
#include "fuzz.h"

#include "config.h"

#define CHECKPOINT_TENSORS 4096

static void derive(const moe_config *c) {
    moe_tensor_ref *refs = NULL;
    int n = moe_config_tensor_list(c, &refs);
    if (n > 4 * CHECKPOINT_TENSORS + 64) abort(); /* the bound did not hold */
    free(refs);
    for (int l = 0; l < c->num_layers; l++)
        (void)moe_config_has_expert(c, l, c->n_routed_experts - 1);
    char *json = moe_config_to_json(c, "float32");
    moe_config *again = moe_config_parse_bounded(json, strlen(json), "written config.json", CHECKPOINT_TENSORS);
    if (!again) {
        fprintf(stderr, "a written config does not parse back: %s\n%s\n", moe_error(), json);
        abort();
    }
    moe_config_free(again);
    free(json);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_config *c = moe_config_parse_bounded((const char *)data, size, "config.json", CHECKPOINT_TENSORS);
    if (!c) return 0;
    derive(c);
    moe_config_free(c);
    return 0;
}
