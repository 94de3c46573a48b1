/* test_checkpoint.c - model directories: write (single + sharded), open and
 * validate (missing tensor, wrong shape, bad index, pickle-only), read,
 * fingerprint, condensed configs over full checkpoints, --force semantics. */
#include <sys/stat.h>

#include "checkpoint.h"
#include "common.h"
#include "testutil.h"

/* value of element i of tensor number t */
static float val(int t, uint64_t i) { return (float)((int)((t * 131 + i * 7) % 97) - 48) / 64.0f; }

static int fill_val(void *ctx, const char *name, uint64_t start, uint64_t n, void *out)
{
    (void)name;
    int t = (int)(intptr_t)ctx;
    float *o = out;
    for (uint64_t i = 0; i < n; i++) o[i] = val(t, start + i);
    return 0;
}

static moe_config *tiny(moe_arch_id a)
{
    moe_config *c = moe_config_new(moe_arch_get(a));
    c->num_layers = 3;
    c->hidden_size = 32;
    c->head_dim = 8;
    c->n_routed_experts = 4;
    if (moe_config_finish(c) < 0) fail_msg("%s", moe_error());
    return c;
}

/* Write config c's checkpoint to DIR/name; skip tensor `skip`, or give
 * tensor `bad` a wrong shape, or add an extra tensor. */
static char *write_model(const moe_config *c, const char *name, uint64_t shard, const char *skip, const char *bad,
                         int extra, int force)
{
    static char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", tu_dir, name);
    moe_ckpt_writer *w = moe_ckpt_writer_open(dir, shard, force);
    if (!w) return NULL;
    moe_tensor_ref *r;
    int n = moe_config_tensor_list(c, &r);
    assert_true(n > 0);
    for (int i = 0; i < n; i++) {
        if (skip && !strcmp(r[i].name, skip)) continue;
        int64_t sh[2] = {r[i].shape[0], r[i].shape[1]};
        if (bad && !strcmp(r[i].name, bad)) sh[0] += 1;
        assert_int_equal(moe_ckpt_writer_add(w, r[i].name, MOE_DT_F32, r[i].ndim, sh, NULL, fill_val,
                                             (void *)(intptr_t)i), 0);
    }
    if (extra) {
        int64_t s[1] = {4};
        moe_ckpt_writer_add(w, "model.rotary_emb.inv_freq", MOE_DT_F32, 1, s, NULL, fill_val, (void *)1);
    }
    free(r);
    char *js = moe_config_to_json(c, "float32");
    assert_int_equal(moe_ckpt_writer_text(w, "config.json", js), 0);
    free(js);
    if (moe_ckpt_writer_close(w) < 0) fail_msg("%s", moe_error());
    return dir;
}

static void test_roundtrip(void **state)
{
    (void)state;
    for (int a = 0; a < MOE_ARCH_COUNT; a++) {
        moe_config *c = tiny(a);
        char name[64];
        snprintf(name, sizeof name, "rt%d", a);
        char *dir = write_model(c, name, a % 2 ? 20000 : 0, NULL, NULL, 0, 0);
        char idx[600];
        snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", dir);
        struct stat st;
        assert_int_equal(stat(idx, &st) == 0, a % 2); /* sharded ones have an index */
        moe_ckpt *m = moe_ckpt_open(dir);
        if (!m) fail_msg("%s", moe_error());
        const moe_config *mc = moe_ckpt_config(m);
        assert_int_equal(mc->arch->id, a);
        assert_int_equal(moe_ckpt_dtype(m), MOE_DT_F32);
        assert_int_equal(moe_ckpt_n_extra(m), 0);
        assert_int_equal(strlen(moe_ckpt_fingerprint(m)), 64);
        moe_tensor_ref *r;
        int n = moe_config_tensor_list(mc, &r);
        for (int i = 0; i < n; i++) {
            int64_t numel = r[i].ndim == 2 ? r[i].shape[0] * r[i].shape[1] : r[i].shape[0];
            float *buf = malloc((size_t)numel * sizeof(float));
            if (moe_ckpt_read_f32(m, r[i].layer, r[i].kind, r[i].expert, buf) < 0) fail_msg("%s", moe_error());
            for (int64_t j = 0; j < numel; j += 13)
                if (buf[j] != val(i, (uint64_t)j)) fail_msg("%s[%lld] wrong", r[i].name, (long long)j);
            assert_int_equal(moe_ckpt_read_named_f32(m, r[i].name, r[i].ndim, r[i].shape, buf), 0);
            free(buf);
        }
        free(r);
        for (int l = -1; l < mc->num_layers; l++) {
            moe_ckpt_prefetch_layer(m, l);
            moe_ckpt_release_layer(m, l);
        }
        moe_ckpt_release_all(m);
        /* shape check of a by-name read */
        int64_t wrong[2] = {1, 1};
        float x;
        assert_int_equal(moe_ckpt_read_named_f32(m, "model.norm.weight", 2, wrong, &x), -1);
        assert_non_null(strstr(moe_error(), "tensor model.norm.weight: shape [32], expected [1, 1]"));
        assert_null(moe_ckpt_find(m, "nope"));
        moe_ckpt_close(m);
        moe_config_free(c);
    }
}

static void expect_open_fails(const char *dir, const char *want1, const char *want2)
{
    moe_error_clear();
    moe_ckpt *m = moe_ckpt_open(dir);
    if (m) {
        moe_ckpt_close(m);
        fail_msg("%s opened; expected '%s'", dir, want1);
    }
    const char *e = moe_error();
    if (!strstr(e, dir) || !strstr(e, want1) || (want2 && !strstr(e, want2)) || strchr(e, '\n'))
        fail_msg("error '%s' lacks '%s' / '%s' / the directory", e, want1, want2 ? want2 : "");
}

static void test_validation(void **state)
{
    (void)state;
    moe_config *c = tiny(MOE_ARCH_QWEN2_MOE);
    char *dir = write_model(c, "missing", 0, "model.layers.1.mlp.experts.2.up_proj.weight", NULL, 0, 0);
    expect_open_fails(dir, "tensor model.layers.1.mlp.experts.2.up_proj.weight missing", NULL);
    dir = write_model(c, "shape", 0, NULL, "model.layers.2.self_attn.k_proj.weight", 0, 0);
    expect_open_fails(dir, "model.safetensors: tensor model.layers.2.self_attn.k_proj.weight: shape [17, 32], "
                      "expected [16, 32]", "hidden_size 32");
    dir = write_model(c, "sharded_shape", 30000, NULL, "model.layers.2.mlp.gate.weight", 0, 0);
    expect_open_fails(dir, "-of-000", "tensor model.layers.2.mlp.gate.weight: shape [5, 32], expected [4, 32]");

    /* extras are counted, not fatal */
    dir = write_model(c, "extra", 0, NULL, NULL, 1, 0);
    moe_ckpt *m = moe_ckpt_open(dir);
    if (!m) fail_msg("%s", moe_error());
    assert_int_equal(moe_ckpt_n_extra(m), 1);
    assert_string_equal(moe_ckpt_extra(m, 0), "model.rotary_emb.inv_freq");
    char fp_extra[65];
    strcpy(fp_extra, moe_ckpt_fingerprint(m));
    moe_ckpt_close(m);

    /* bad config.json: error names it */
    tu_write_text(tu_join(dir, "config.json"), "{\"model_type\": \"gpt2\", \"hidden_size\": 4}\n");
    expect_open_fails(dir, "config.json: model_type 'gpt2' is not supported", NULL);

    /* index naming a tensor its shard lacks */
    dir = write_model(c, "badindex", 30000, NULL, NULL, 0, 0);
    tu_write_text(tu_join(dir, "model.safetensors.index.json"),
                  "{\"metadata\":{},\"weight_map\":{\"model.norm.weight\":\"model-00001-of-00009.safetensors\"}}");
    expect_open_fails(dir, "model-00001-of-00009.safetensors: cannot open", NULL);
    /* map model.norm.weight to the shard holding the embedding instead */
    dir = write_model(c, "badindex2", 30000, NULL, NULL, 0, 0);
    moe_ckpt *mm = moe_ckpt_open(dir);
    assert_non_null(mm);
    const char *sp = moe_st_path(moe_ckpt_find(mm, "model.embed_tokens.weight")->file);
    char text[300];
    snprintf(text, sizeof text, "{\"metadata\":{},\"weight_map\":{\"model.norm.weight\":\"%s\"}}",
             strrchr(sp, '/') + 1);
    moe_ckpt_close(mm);
    char p[600];
    snprintf(p, sizeof p, "%s", tu_join(dir, "model.safetensors.index.json"));
    tu_write_text(p, text);
    expect_open_fails(dir, "tensor model.norm.weight is listed in", NULL);
    tu_write_text(p, "{\"metadata\":{},\"weight_map\":{\"x\":\"../etc/passwd\"}}");
    expect_open_fails(dir, "bad shard name", NULL);
    tu_write_text(p, "{\"weight_map\": 3");
    expect_open_fails(dir, "not valid JSON", NULL);

    /* pickle-only and empty directories */
    snprintf(p, sizeof p, "%s", tu_path("pickle"));
    mkdir(p, 0777);
    char *js = moe_config_to_json(c, "float32");
    tu_write_text(tu_join(p, "config.json"), js);
    free(js);
    expect_open_fails(p, "no model.safetensors", NULL);
    tu_write_text(tu_join(p, "pytorch_model.bin"), "x");
    expect_open_fails(p, "pickle", NULL);
    expect_open_fails("/nonexistent-model-dir", "cannot open", NULL);
    moe_config_free(c);
    (void)fp_extra;
}

/* Rewrite one integer of DIR/config.json ("key": N) */
static void set_config_int(const char *dir, const char *key, long long v)
{
    char path[600], pat[80];
    snprintf(path, sizeof path, "%s/config.json", dir);
    size_t len;
    char *js = moe_read_file(path, &len);
    assert_non_null(js);
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    char *at = strstr(js, pat);
    assert_non_null(at);
    char *num = at + strlen(pat), *end = num;
    while (*end >= '0' && *end <= '9') end++;
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "%.*s%lld%s", (int)(num - js), js, v, end);
    assert_int_equal(fclose(f), 0);
    free(js);
}

/* config.json sizes far beyond the checkpoint's tensors are refused before
 * anything is allocated per layer or expert (num_hidden_layers 2^30 aborted
 * on an allocation failure; 2^24 layers or 2^30 experts took gigabytes):
 * an error naming config.json, quickly, and a plain mismatch still gets the
 * message naming the first missing tensor. */
static void test_absurd_sizes(void **state)
{
    (void)state;
    moe_config *c = tiny(MOE_ARCH_QWEN2_MOE);
    char *dir = write_model(c, "absurd", 0, NULL, NULL, 0, 0);
    static const struct { const char *key; long long v; const char *want; } cases[] = {
        {"num_hidden_layers", 1LL << 30, "config.json: num_hidden_layers 1073741824 implies at least"},
        {"num_hidden_layers", 1LL << 24, "config.json: num_hidden_layers 16777216 implies at least"},
        {"num_experts", 1LL << 30, "1073741824 routed experts) imply"},
        {"num_experts", 1LL << 24, "16777216 routed experts) imply"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        double t0 = moe_now();
        set_config_int(dir, cases[i].key, cases[i].v);
        expect_open_fails(dir, cases[i].want, "but the checkpoint's safetensors hold only");
        assert_int_equal(moe_error_kind(), MOE_ERR_DATA);
        assert_true(moe_now() - t0 < 2.0); /* counted, not allocated and walked */
        set_config_int(dir, cases[i].key, i < 2 ? 3 : 4);
    }
    /* one layer more than the checkpoint has: the tensor is named */
    set_config_int(dir, "num_hidden_layers", 4);
    expect_open_fails(dir, "tensor model.layers.3.", "missing");
    set_config_int(dir, "num_hidden_layers", 3);
    moe_ckpt *m = moe_ckpt_open(dir);
    if (!m) fail_msg("%s", moe_error());
    moe_ckpt_close(m);
    moe_config_free(c);
}

static void test_fingerprint_condensed(void **state)
{
    (void)state;
    moe_config *c = tiny(MOE_ARCH_DEEPSEEK);
    char *dir = write_model(c, "fp", 0, NULL, NULL, 0, 0);
    moe_ckpt *m = moe_ckpt_open(dir);
    if (!m) fail_msg("%s", moe_error());
    char fp1[65];
    strcpy(fp1, moe_ckpt_fingerprint(m));
    moe_ckpt_close(m);
    m = moe_ckpt_open(dir);
    assert_string_equal(moe_ckpt_fingerprint(m), fp1); /* stable */
    moe_ckpt_close(m);
    /* condense layer 1 (MoE) by editing config.json: router and unused experts become extras */
    int ids[2] = {3, 1};
    float w[2] = {0.5f, 0.25f};
    assert_int_equal(moe_config_condense(c, 1, 2, ids, w), 0);
    char *js = moe_config_to_json(c, "float32");
    tu_write_text(tu_join(dir, "config.json"), js);
    free(js);
    m = moe_ckpt_open(dir);
    if (!m) fail_msg("%s", moe_error());
    assert_string_not_equal(moe_ckpt_fingerprint(m), fp1); /* config changed */
    assert_int_equal(moe_ckpt_config(m)->layers[1].kind, MOE_MLP_CONDENSED);
    assert_int_equal(moe_ckpt_n_extra(m), 1 + 2 * 3); /* router + experts 0 and 2 */
    assert_non_null(moe_ckpt_get(m, 1, MOE_T_EXPERT_DOWN, 3));
    assert_null(moe_ckpt_get(m, 1, MOE_T_EXPERT_DOWN, 2));
    assert_null(moe_ckpt_get(m, 1, MOE_T_ROUTER, -1));
    assert_non_null(moe_ckpt_get(m, 1, MOE_T_SHARED_DOWN, -1));
    moe_ckpt_close(m);
    moe_config_free(c);
}

static void test_force(void **state)
{
    (void)state;
    moe_config *c = tiny(MOE_ARCH_OLMOE);
    char *dir = write_model(c, "forced", 0, NULL, NULL, 0, 0);
    char keep[600];
    snprintf(keep, sizeof keep, "%s", tu_join(dir, "oldfile"));
    tu_write_text(keep, "");
    /* refused without force, I/O error naming the directory */
    assert_null(moe_ckpt_writer_open(dir, 0, 0));
    assert_non_null(strstr(moe_error(), "exists"));
    assert_int_equal(moe_error_kind(), MOE_ERR_IO);
    /* replaced with force: the old file is gone */
    write_model(c, "forced", 0, NULL, NULL, 0, 1);
    struct stat st;
    assert_int_not_equal(stat(keep, &st), 0);
    moe_ckpt *m = moe_ckpt_open(dir);
    assert_non_null(m);
    moe_ckpt_close(m);
    /* an aborted writer leaves nothing */
    const char *d2 = tu_path("aborted");
    moe_ckpt_writer *w = moe_ckpt_writer_open(d2, 0, 0);
    moe_ckpt_writer_abort(w);
    assert_int_not_equal(stat(d2, &st), 0);
    assert_false(tu_dir_has("tmp"));
    moe_config_free(c);
}


/* Checkpoints written by transformers' save_pretrained (tests/ref/hf_save_tiny.py)
 * open, validate, and read back the same values (sum per tensor).  Skipped
 * when python3 with torch + transformers is not available. */
static void test_hf_saved(void **state)
{
    (void)state;
    if (system("python3 -c 'import torch, transformers, safetensors' >/dev/null 2>&1") != 0) {
        printf("SKIP: python3 with torch + transformers absent\n");
        skip();
    }
    char cmd[700], hf[600];
    snprintf(hf, sizeof hf, "%s", tu_path("hf"));
    snprintf(cmd, sizeof cmd, "python3 tests/ref/hf_save_tiny.py '%s' >/dev/null 2>&1", hf);
    assert_int_equal(system(cmd), 0);
    const char *names[] = {"qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "qwen3_moe_bf16"};
    for (int i = 0; i < 5; i++) {
        char dir[700], sums[800];
        snprintf(dir, sizeof dir, "%s/%s", hf, names[i]);
        moe_ckpt *m = moe_ckpt_open(dir);
        if (!m) fail_msg("%s", moe_error());
        assert_int_equal(moe_ckpt_n_extra(m), 0);
        assert_int_equal(moe_ckpt_dtype(m), i == 4 ? MOE_DT_BF16 : MOE_DT_F32);
        snprintf(sums, sizeof sums, "%s/sums.txt", dir);
        FILE *fp = fopen(sums, "r");
        assert_non_null(fp);
        char name[256];
        double want;
        int n = 0;
        while (fscanf(fp, "%255s %lf", name, &want) == 2) {
            const moe_st_tensor *t = moe_ckpt_find(m, name);
            if (!t) fail_msg("%s: %s not found", dir, name);
            float *buf = malloc((size_t)t->numel * sizeof(float) + 1);
            assert_int_equal(moe_st_read_f32(t, buf), 0);
            double sum = 0;
            for (int64_t j = 0; j < t->numel; j++) sum += buf[j];
            free(buf);
            if (fabs(sum - want) > 1e-9 * (1 + fabs(want))) fail_msg("%s: %s sum %.17g, want %.17g", dir, name, sum, want);
            n++;
        }
        fclose(fp);
        assert_true(n > 10);
        if (i == 0) { /* qwen2_moe with mlp_only_layers [1]: layer 1 dense */
            assert_int_equal(moe_ckpt_config(m)->layers[1].kind, MOE_MLP_DENSE);
            assert_int_equal(moe_ckpt_config(m)->layers[0].kind, MOE_MLP_MOE);
        }
        moe_ckpt_close(m);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_validation),
        cmocka_unit_test(test_absurd_sizes),
        cmocka_unit_test(test_fingerprint_condensed),
        cmocka_unit_test(test_force),
        cmocka_unit_test(test_hf_saved),
    };
    return cmocka_run_group_tests(tests, tu_setup_dir, tu_teardown_dir);
}
