/* fuzz_checkpoint.c - a model directory (lib/checkpoint.c): config.json
 * checked against the tensors of a real checkpoint (the deepseek-l5
 * fixture), or the sharded layout's model.safetensors.index.json over two
 * shard names of that fixture.  The first input byte chooses: even fuzzes
 * config.json, odd the index.  An opened checkpoint is then read through. */
#include "fuzz.h"

#include "checkpoint.h"

#define FIXTURE "tests/fixtures/search/models/deepseek-l5"
#define MAX_READ_ELEMENTS (1 << 20)

/* two directories made once: single/ (fixture tensors, fuzzed config.json)
 * and sharded/ (fixture config.json, the fixture's tensors as two shard
 * files, fuzzed index) */
static void setup(char *single, char *sharded, size_t size) {
    static int done;
    snprintf(single, size, "%s/single", fuzz_dir());
    snprintf(sharded, size, "%s/sharded", fuzz_dir());
    if (done) return;
    done = 1;
    size_t cl, sl;
    char *config = fuzz_fixture(FIXTURE "/config.json", &cl);
    char *tensors = fuzz_fixture(FIXTURE "/model.safetensors", &sl);
    if (mkdir(single, 0700) < 0 || mkdir(sharded, 0700) < 0) fuzz_die("fuzz: mkdir");
    fuzz_put(single, "model.safetensors", tensors, sl);
    fuzz_put(sharded, "config.json", config, cl);
    fuzz_put(sharded, "model-00001-of-00002.safetensors", tensors, sl);
    fuzz_put(sharded, "model-00002-of-00002.safetensors", tensors, sl);
    free(config);
    free(tensors);
}

static void read_through(const moe_ckpt *m) {
    const moe_config *c = moe_ckpt_config(m);
    (void)moe_ckpt_fingerprint(m);
    for (int i = 0; i < moe_ckpt_n_extra(m); i++) (void)moe_ckpt_extra(m, i);
    int64_t shape[2];
    if (moe_config_tensor_shape(c, -1, MOE_T_EMBED, shape) == 2 && shape[0] * shape[1] <= MAX_READ_ELEMENTS) {
        float *dst = malloc((size_t)(shape[0] * shape[1]) * sizeof *dst);
        if (dst && moe_ckpt_read_f32(m, -1, MOE_T_EMBED, -1, dst) < 0) abort(); /* validated at open */
        free(dst);
    }
    moe_ckpt_release_all(m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char single[1100], sharded[1100];
    setup(single, sharded, sizeof single);
    unsigned sel = fuzz_selector(&data, &size);
    const char *dir = sel & 1 ? sharded : single;
    fuzz_put(dir, sel & 1 ? "model.safetensors.index.json" : "config.json", data, size);
    moe_ckpt *m = moe_ckpt_open(dir);
    if (m) read_through(m);
    moe_ckpt_close(m);
    return 0;
}
