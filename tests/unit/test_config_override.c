/* test_config_override.c - moe-init's size overrides (moe_config_override in
 * lib/config.c): derived sizes follow, condensed layers survive. */
#include "config.h"
#include "common.h"
#include "testutil.h"

static moe_config *tiny(const char *arch) {
    moe_config *c = moe_config_new(moe_arch_find(arch));
    assert_non_null(c);
    assert_int_equal(moe_config_finish(c), 0);
    return c;
}

static void test_keep_all(void **state) {
    (void)state;
    moe_config *c = tiny("qwen2_moe"), *ref = tiny("qwen2_moe");
    moe_config_overrides o;
    moe_config_overrides_init(&o);
    assert_int_equal(moe_config_override(c, &o), 0);
    char *a = moe_config_to_json(c, "bfloat16"), *b = moe_config_to_json(ref, "bfloat16");
    assert_string_equal(a, b);
    free(a);
    free(b);
    moe_config_free(c);
    moe_config_free(ref);
}

static void test_derived_sizes(void **state) {
    (void)state;
    moe_config *c = tiny("qwen2_moe"); /* hidden 64, 4 heads of 16, 2 kv heads */
    moe_config_overrides o;
    moe_config_overrides_init(&o);
    o.hidden_size = 96;
    o.num_heads = 1;
    o.shared_experts = 3; /* qwen2_moe: 3 x moe_intermediate_size */
    o.moe_intermediate_size = 8;
    assert_int_equal(moe_config_override(c, &o), 0);
    assert_int_equal(c->head_dim, 96);
    assert_int_equal(c->num_kv_heads, 1); /* capped at the heads */
    assert_int_equal(c->shared_intermediate_size, 24);
    moe_config_free(c);

    c = tiny("olmoe"); /* the experts are as wide as the dense MLP */
    moe_config_overrides_init(&o);
    o.intermediate_size = 40;
    assert_int_equal(moe_config_override(c, &o), 0);
    assert_int_equal(c->moe_intermediate_size, 40);
    moe_config_free(c);

    c = tiny("mixtral");
    moe_config_overrides_init(&o);
    o.hidden_size = 66; /* 4 heads */
    assert_int_equal(moe_config_override(c, &o), MOE_CONFIG_BAD_SIZES);
    moe_config_free(c);
}

/* Regression: moe-init kept the condensed layers of --config as shallow
 * copies, whose arrays moe_config_finish freed before they were used. */
static void test_condensed_layers_kept(void **state) {
    (void)state;
    moe_config *c = tiny("deepseek"); /* layer 0 dense, layer 1 MoE */
    const int experts[2] = {5, 3};
    const float weights[2] = {0.5f, 0.25f};
    assert_int_equal(moe_config_condense(c, 1, 2, experts, weights), 0);
    moe_config_overrides o;
    moe_config_overrides_init(&o);
    o.num_layers = 3;
    o.vocab_size = 300;
    assert_int_equal(moe_config_override(c, &o), 0);
    assert_int_equal(c->n_condensed, 1);
    assert_int_equal(c->layers[1].kind, MOE_MLP_CONDENSED);
    assert_int_equal(c->layers[1].n_kept, 2);
    assert_int_equal(c->layers[1].experts[0], 5);
    assert_int_equal(c->layers[1].experts[1], 3);
    assert_true(c->layers[1].weights[1] == 0.25f);
    assert_int_equal(c->layers[2].kind, MOE_MLP_MOE);
    o.num_layers = 1; /* the condensed layer is gone */
    assert_int_equal(moe_config_override(c, &o), 0);
    assert_int_equal(c->n_condensed, 0);
    moe_config_free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keep_all),
        cmocka_unit_test(test_derived_sizes),
        cmocka_unit_test(test_condensed_layers_kept),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
