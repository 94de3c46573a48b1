/* test_config.c - config.json parsing per architecture, layer descriptors,
 * condensed_layers, tensor names/shapes, and errors naming the file. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "config.h"

#define BASE "\"hidden_size\":64,\"num_hidden_layers\":4,\"num_attention_heads\":4,\"vocab_size\":300,"

static moe_config *parse(const char *json)
{
    moe_error_clear();
    return moe_config_parse(json, strlen(json), "dir/config.json");
}

static moe_config *parse_ok(const char *json)
{
    moe_config *c = parse(json);
    if (!c) fail_msg("parse failed: %s", moe_error());
    return c;
}

static void expect_err(const char *json, const char *want)
{
    moe_config *c = parse(json);
    if (c) {
        moe_config_free(c);
        fail_msg("parsed, expected an error with '%s'", want);
    }
    const char *e = moe_error();
    if (strncmp(e, "dir/config.json: ", 17) || !strstr(e, want) || strchr(e, '\n'))
        fail_msg("error '%s' lacks 'dir/config.json: ...%s'", e, want);
}

static void name_is(const moe_config *c, int l, moe_tensor_kind k, int e, const char *want, int d0, int d1)
{
    char buf[MOE_TENSOR_NAME_MAX];
    if (moe_config_tensor_name(c, l, k, e, buf, sizeof buf) < 0) fail_msg("%s", moe_error());
    assert_string_equal(buf, want);
    int64_t s[2];
    int nd = moe_config_tensor_shape(c, l, k, s);
    assert_int_equal(nd, d1 ? 2 : 1);
    assert_int_equal(s[0], d0);
    if (d1) assert_int_equal(s[1], d1);
}

static void test_deepseek(void **state)
{
    (void)state;
    moe_config *c = parse_ok("{\"model_type\":\"deepseek\"," BASE "\"intermediate_size\":128,"
                             "\"moe_intermediate_size\":16,\"n_routed_experts\":8,\"n_shared_experts\":2,"
                             "\"num_experts_per_tok\":3,\"first_k_dense_replace\":1,\"moe_layer_freq\":2,"
                             "\"norm_topk_prob\":false,\"scoring_func\":\"softmax\",\"rope_theta\":10000,"
                             "\"rms_norm_eps\":1e-6,\"rope_scaling\":null,\"bos_token_id\":1,\"eos_token_id\":[2,3]}");
    assert_int_equal(c->arch->id, MOE_ARCH_DEEPSEEK);
    assert_int_equal(c->num_kv_heads, 4); /* defaults to heads */
    assert_int_equal(c->head_dim, 16);
    assert_int_equal(c->shared_intermediate_size, 32);
    assert_int_equal(c->shared_gate, 0);
    assert_int_equal(c->eos_token_id, 2);
    /* layer l is MoE iff l >= 1 and l % 2 == 0 */
    assert_int_equal(c->layers[0].kind, MOE_MLP_DENSE);
    assert_int_equal(c->layers[1].kind, MOE_MLP_DENSE);
    assert_int_equal(c->layers[2].kind, MOE_MLP_MOE);
    assert_int_equal(c->layers[3].kind, MOE_MLP_DENSE);
    assert_true(c->norm_topk_eps == 1e-20);
    name_is(c, 0, MOE_T_MLP_GATE, -1, "model.layers.0.mlp.gate_proj.weight", 128, 64);
    name_is(c, 2, MOE_T_ROUTER, -1, "model.layers.2.mlp.gate.weight", 8, 64);
    name_is(c, 2, MOE_T_EXPERT_DOWN, 7, "model.layers.2.mlp.experts.7.down_proj.weight", 64, 16);
    name_is(c, 2, MOE_T_SHARED_UP, -1, "model.layers.2.mlp.shared_experts.up_proj.weight", 32, 64);
    name_is(c, -1, MOE_T_LM_HEAD, -1, "lm_head.weight", 300, 64);
    char buf[128];
    assert_int_equal(moe_config_tensor_name(c, 1, MOE_T_ROUTER, -1, buf, sizeof buf), -1);
    assert_int_equal(moe_config_tensor_name(c, 2, MOE_T_SHARED_EXPERT_GATE, -1, buf, sizeof buf), -1);
    assert_int_equal(moe_config_tensor_name(c, 2, MOE_T_EXPERT_GATE, 8, buf, sizeof buf), -1);
    assert_int_equal(moe_config_tensor_name(c, 2, MOE_T_Q_BIAS, -1, buf, sizeof buf), -1);
    moe_tensor_ref *r;
    int n = moe_config_tensor_list(c, &r);
    /* embed + 4*(2 norms + 4 attn) + 3 dense*3 + (router + 8*3 + 3 shared) + norm + lm_head */
    assert_int_equal(n, 1 + 4 * 6 + 3 * 3 + (1 + 24 + 3) + 2);
    assert_string_equal(r[0].name, "model.embed_tokens.weight");
    assert_string_equal(r[n - 1].name, "lm_head.weight");
    free(r);
    moe_config_free(c);
}

static void test_qwen2(void **state)
{
    (void)state;
    moe_config *c = parse_ok("{\"model_type\":\"qwen2_moe\"," BASE "\"num_key_value_heads\":2,"
                             "\"intermediate_size\":128,\"moe_intermediate_size\":16,\"num_experts\":6,"
                             "\"shared_expert_intermediate_size\":48,\"num_experts_per_tok\":2,"
                             "\"decoder_sparse_step\":2,\"mlp_only_layers\":[3],"
                             "\"rope_parameters\":{\"rope_theta\":1000000.0,\"rope_type\":\"default\"}}");
    assert_true(c->rope_theta == 1e6);
    assert_int_equal(c->qkv_bias, 1); /* absent -> true */
    assert_int_equal(c->shared_gate, 1);
    assert_int_equal(c->n_shared_experts, 1);
    /* (l+1) % 2 == 0 and l not in [3]: only layer 1 */
    assert_int_equal(c->layers[0].kind, MOE_MLP_DENSE);
    assert_int_equal(c->layers[1].kind, MOE_MLP_MOE);
    assert_int_equal(c->layers[2].kind, MOE_MLP_DENSE);
    assert_int_equal(c->layers[3].kind, MOE_MLP_DENSE);
    name_is(c, 0, MOE_T_K_BIAS, -1, "model.layers.0.self_attn.k_proj.bias", 32, 0);
    name_is(c, 1, MOE_T_SHARED_EXPERT_GATE, -1, "model.layers.1.mlp.shared_expert_gate.weight", 1, 64);
    name_is(c, 1, MOE_T_SHARED_DOWN, -1, "model.layers.1.mlp.shared_expert.down_proj.weight", 64, 48);
    moe_config_free(c);
    c = parse_ok("{\"model_type\":\"qwen2_moe\"," BASE "\"intermediate_size\":128,\"moe_intermediate_size\":16,"
                 "\"num_experts\":6,\"shared_expert_intermediate_size\":0,\"num_experts_per_tok\":2,\"qkv_bias\":false}");
    assert_int_equal(c->qkv_bias, 0);
    assert_int_equal(c->shared_gate, 0);
    assert_int_equal(moe_config_has_tensor(c, 0, MOE_T_SHARED_GATE), 0);
    moe_config_free(c);
}

static void test_qwen3_olmoe_mixtral(void **state)
{
    (void)state;
    /* qwen3 as transformers 5 writes it: num_local_experts, explicit head_dim */
    moe_config *c = parse_ok("{\"model_type\":\"qwen3_moe\"," BASE "\"num_key_value_heads\":2,\"head_dim\":32,"
                             "\"intermediate_size\":128,\"moe_intermediate_size\":16,\"num_local_experts\":4,"
                             "\"num_experts_per_tok\":2,\"norm_topk_prob\":true}");
    assert_int_equal(c->n_routed_experts, 4);
    assert_int_equal(c->qk_norm, MOE_QK_NORM_HEAD);
    assert_int_equal(c->norm_topk_prob, 1);
    name_is(c, 0, MOE_T_Q_PROJ, -1, "model.layers.0.self_attn.q_proj.weight", 128, 64);
    name_is(c, 0, MOE_T_O_PROJ, -1, "model.layers.0.self_attn.o_proj.weight", 64, 128);
    name_is(c, 0, MOE_T_K_PROJ, -1, "model.layers.0.self_attn.k_proj.weight", 64, 64);
    name_is(c, 0, MOE_T_Q_NORM, -1, "model.layers.0.self_attn.q_norm.weight", 32, 0);
    name_is(c, 0, MOE_T_K_NORM, -1, "model.layers.0.self_attn.k_norm.weight", 32, 0);
    moe_config_free(c);
    c = parse_ok("{\"model_type\":\"olmoe\"," BASE "\"num_key_value_heads\":2,\"intermediate_size\":24,"
                 "\"num_experts\":4,\"num_experts_per_tok\":2,\"clip_qkv\":null}");
    assert_int_equal(c->qk_norm, MOE_QK_NORM_FULL);
    assert_int_equal(c->moe_intermediate_size, 24);
    assert_true(c->rms_norm_eps == 1e-5);
    for (int l = 0; l < 4; l++) assert_int_equal(c->layers[l].kind, MOE_MLP_MOE);
    name_is(c, 0, MOE_T_Q_NORM, -1, "model.layers.0.self_attn.q_norm.weight", 64, 0);
    name_is(c, 0, MOE_T_K_NORM, -1, "model.layers.0.self_attn.k_norm.weight", 32, 0);
    name_is(c, 3, MOE_T_EXPERT_GATE, 3, "model.layers.3.mlp.experts.3.gate_proj.weight", 24, 64);
    moe_config_free(c);
    c = parse_ok("{\"model_type\":\"mixtral\"," BASE "\"num_key_value_heads\":2,\"intermediate_size\":24,"
                 "\"num_local_experts\":4,\"num_experts_per_tok\":2,\"head_dim\":null,\"sliding_window\":null,"
                 "\"tie_word_embeddings\":true}");
    assert_int_equal(c->router, MOE_ROUTER_TOPK_SOFTMAX);
    assert_int_equal(c->norm_topk_prob, 1);
    assert_int_equal(c->head_dim, 16);
    name_is(c, 1, MOE_T_EXPERT_GATE, 2, "model.layers.1.block_sparse_moe.experts.2.w1.weight", 24, 64);
    name_is(c, 1, MOE_T_EXPERT_UP, 2, "model.layers.1.block_sparse_moe.experts.2.w3.weight", 24, 64);
    name_is(c, 1, MOE_T_EXPERT_DOWN, 2, "model.layers.1.block_sparse_moe.experts.2.w2.weight", 64, 24);
    name_is(c, 1, MOE_T_ROUTER, -1, "model.layers.1.block_sparse_moe.gate.weight", 4, 64);
    name_is(c, -1, MOE_T_LM_HEAD, -1, "model.embed_tokens.weight", 300, 64); /* tied */
    moe_tensor_ref *r;
    int n = moe_config_tensor_list(c, &r);
    assert_string_equal(r[n - 1].name, "model.norm.weight"); /* no lm_head when tied */
    free(r);
    moe_config_free(c);
}

static void test_condensed(void **state)
{
    (void)state;
    const char *head = "{\"model_type\":\"qwen2_moe\"," BASE "\"intermediate_size\":128,\"moe_intermediate_size\":16,"
                       "\"num_experts\":6,\"shared_expert_intermediate_size\":48,\"num_experts_per_tok\":2,";
    char buf[2048];
    snprintf(buf, sizeof buf, "%s\"condensed_layers\":{\"2\":{\"experts\":[5,0],\"weights\":[0.25,0.5]},"
             "\"3\":{\"experts\":[],\"weights\":[]}}}", head);
    moe_config *c = parse_ok(buf);
    assert_int_equal(c->n_condensed, 2);
    const moe_layer_mlp *m = &c->layers[2];
    assert_int_equal(m->kind, MOE_MLP_CONDENSED);
    assert_int_equal(m->n_kept, 2);
    assert_int_equal(m->experts[0], 5);
    assert_true(m->weights[1] == 0.5f);
    assert_int_equal(m->has_shared, 1);
    assert_int_equal(moe_config_has_tensor(c, 2, MOE_T_ROUTER), 0);
    assert_int_equal(moe_config_has_tensor(c, 2, MOE_T_SHARED_EXPERT_GATE), 1);
    assert_int_equal(moe_config_has_expert(c, 2, 5), 1);
    assert_int_equal(moe_config_has_expert(c, 2, 1), 0);
    assert_int_equal(moe_config_has_expert(c, 1, 1), 1);
    moe_tensor_ref *r;
    int n = moe_config_tensor_list(c, &r);
    int experts2 = 0, experts3 = 0;
    for (int i = 0; i < n; i++) {
        if (r[i].layer == 2 && r[i].kind == MOE_T_EXPERT_GATE) {
            assert_true(r[i].expert == 0 || r[i].expert == 5);
            experts2++;
        }
        if (r[i].layer == 3 && r[i].kind >= MOE_T_ROUTER && r[i].kind <= MOE_T_EXPERT_DOWN) experts3++;
    }
    assert_int_equal(experts2, 2);
    assert_int_equal(experts3, 0);
    free(r);
    /* the JSON writer keeps them */
    char *js = moe_config_to_json(c, "bfloat16");
    moe_config *c2 = parse_ok(js);
    assert_int_equal(c2->n_condensed, 2);
    assert_int_equal(c2->layers[2].experts[0], 5);
    assert_int_equal(c2->layers[3].n_kept, 0);
    assert_int_equal(c2->shared_intermediate_size, 48);
    moe_config_free(c2);
    free(js);
    moe_config_free(c);

    snprintf(buf, sizeof buf, "%s\"condensed_layers\":{\"2\":{\"experts\":[6],\"weights\":[1]}}}", head);
    expect_err(buf, "expert 6 out of range");
    snprintf(buf, sizeof buf, "%s\"condensed_layers\":{\"2\":{\"experts\":[1,1],\"weights\":[1,1]}}}", head);
    expect_err(buf, "listed twice");
    snprintf(buf, sizeof buf, "%s\"condensed_layers\":{\"9\":{\"experts\":[1],\"weights\":[1]}}}", head);
    expect_err(buf, "not a layer index");
    snprintf(buf, sizeof buf, "%s\"condensed_layers\":{\"1\":{\"experts\":[1,2],\"weights\":[1]}}}", head);
    expect_err(buf, "same length");
    snprintf(buf, sizeof buf, "%s\"mlp_only_layers\":[1],\"condensed_layers\":{\"1\":{\"experts\":[1],\"weights\":[1]}}}",
             head);
    expect_err(buf, "dense layer");
}

/* dropped_layers: LayerDrop keeps the attention only, BlockDrop nothing;
 * written back by the JSON writer; bad entries refused */
static void test_dropped(void **state)
{
    (void)state;
    const char *head = "{\"model_type\":\"qwen2_moe\"," BASE "\"intermediate_size\":128,\"moe_intermediate_size\":16,"
                       "\"num_experts\":6,\"shared_expert_intermediate_size\":48,\"num_experts_per_tok\":2,";
    char buf[2048];
    snprintf(buf, sizeof buf, "%s\"dropped_layers\":{\"1\":\"mlp\",\"3\":\"block\"}}", head);
    moe_config *c = parse_ok(buf);
    assert_int_equal(c->n_dropped, 2);
    assert_int_equal(c->layers[1].kind, MOE_MLP_NONE);
    assert_int_equal(c->layers[1].drop, MOE_DROP_MLP);
    assert_int_equal(c->layers[3].drop, MOE_DROP_BLOCK);
    assert_int_equal(moe_config_has_tensor(c, 1, MOE_T_Q_PROJ), 1);
    assert_int_equal(moe_config_has_tensor(c, 1, MOE_T_Q_BIAS), 1);
    assert_int_equal(moe_config_has_tensor(c, 1, MOE_T_POST_NORM), 0);
    assert_int_equal(moe_config_has_tensor(c, 1, MOE_T_SHARED_GATE), 0);
    assert_int_equal(moe_config_has_tensor(c, 1, MOE_T_EXPERT_GATE), 0);
    assert_int_equal(moe_config_has_tensor(c, 3, MOE_T_INPUT_NORM), 0);
    assert_int_equal(moe_config_has_tensor(c, 2, MOE_T_ROUTER), 1);
    assert_int_equal(moe_config_base_is_moe(c, 3), 1);
    moe_tensor_ref *r;
    int n = moe_config_tensor_list(c, &r);
    int in1 = 0, in3 = 0;
    for (int i = 0; i < n; i++) {
        in1 += r[i].layer == 1;
        in3 += r[i].layer == 3;
    }
    assert_int_equal(in1, 8); /* input norm, q/k/v/o, q/k/v biases */
    assert_int_equal(in3, 0);
    free(r);
    char *js = moe_config_to_json(c, "bfloat16");
    moe_config *c2 = parse_ok(js);
    assert_int_equal(c2->n_dropped, 2);
    assert_int_equal(c2->layers[3].drop, MOE_DROP_BLOCK);
    moe_config_free(c2);
    free(js);
    moe_config_free(c);

    snprintf(buf, sizeof buf, "%s\"dropped_layers\":{\"4\":\"mlp\"}}", head);
    expect_err(buf, "dropped_layers: key '4' is not a layer index in [0, 4)");
    snprintf(buf, sizeof buf, "%s\"dropped_layers\":{\"1\":\"attention\"}}", head);
    expect_err(buf, "dropped_layers: layer 1: expected \"mlp\" or \"block\"");
    snprintf(buf, sizeof buf, "%s\"dropped_layers\":[1]}", head);
    expect_err(buf, "dropped_layers is not an object");
    snprintf(buf, sizeof buf, "%s\"condensed_layers\":{\"2\":{\"experts\":[1],\"weights\":[1]}},"
             "\"dropped_layers\":{\"2\":\"mlp\"}}", head);
    expect_err(buf, "dropped_layers: layer 2 is already condensed");
}

static void test_errors(void **state)
{
    (void)state;
    expect_err("{\"model_type\":\"llama\"," BASE "\"intermediate_size\":8}", "model_type 'llama' is not supported");
    expect_err("{\"hidden_size\":8}", "model_type");
    expect_err("{\"model_type\":\"olmoe\",", "not valid JSON");
    expect_err("[1,2]", "not a JSON object");
    expect_err("{\"model_type\":\"olmoe\",\"num_hidden_layers\":2}", "key 'hidden_size' missing");
    expect_err("{\"model_type\":\"olmoe\"," BASE "\"intermediate_size\":\"big\",\"num_experts\":4,"
               "\"num_experts_per_tok\":2}", "key 'intermediate_size' is not an integer");
    expect_err("{\"model_type\":\"olmoe\"," BASE "\"intermediate_size\":8,\"num_experts\":4,"
               "\"num_experts_per_tok\":5}", "num_experts_per_tok 5");
    expect_err("{\"model_type\":\"olmoe\"," BASE "\"intermediate_size\":8,\"num_experts\":4,"
               "\"num_experts_per_tok\":2,\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4}}",
               "rope_scaling type 'yarn' is not supported");
    expect_err("{\"model_type\":\"olmoe\"," BASE "\"intermediate_size\":8,\"num_experts\":4,"
               "\"num_experts_per_tok\":2,\"rope_parameters\":{\"rope_type\":\"llama3\",\"rope_theta\":5}}",
               "rope_parameters type 'llama3' is not supported");
    expect_err("{\"model_type\":\"olmoe\"," BASE "\"intermediate_size\":8,\"num_experts\":4,"
               "\"num_experts_per_tok\":2,\"num_key_value_heads\":3}", "not a multiple of num_key_value_heads");
    expect_err("{\"model_type\":\"olmoe\"," BASE "\"intermediate_size\":8,\"num_experts\":4,"
               "\"num_experts_per_tok\":2,\"hidden_act\":\"gelu\"}", "hidden_act 'gelu'");
    expect_err("{\"model_type\":\"deepseek\"," BASE "\"intermediate_size\":8,\"moe_intermediate_size\":4,"
               "\"n_routed_experts\":4,\"num_experts_per_tok\":2,\"scoring_func\":\"sigmoid\"}",
               "scoring_func 'sigmoid'");
    /* rope "default" accepted in both spellings */
    moe_config *c = parse_ok("{\"model_type\":\"olmoe\"," BASE "\"intermediate_size\":8,\"num_experts\":4,"
                             "\"num_experts_per_tok\":2,\"rope_scaling\":{\"rope_type\":\"default\"}}");
    moe_config_free(c);
    /* moe_config_load: missing file is an I/O error naming it */
    assert_null(moe_config_load("/nonexistent/config.json"));
    assert_int_equal(moe_error_kind(), MOE_ERR_IO);
    assert_non_null(strstr(moe_error(), "/nonexistent/config.json"));
    assert_null(moe_arch_find("gpt2"));
    assert_string_equal(moe_arch_get(MOE_ARCH_MIXTRAL)->model_type, "mixtral");
}

static void test_json_roundtrip(void **state)
{
    (void)state;
    for (int a = 0; a < MOE_ARCH_COUNT; a++) {
        moe_config *c = moe_config_new(moe_arch_get(a));
        c->num_layers = 3;
        c->head_dim = 8; /* != hidden/heads: must be written explicitly */
        assert_int_equal(moe_config_finish(c), 0);
        char *js = moe_config_to_json(c, "float32");
        moe_config *d = parse_ok(js);
        assert_int_equal(d->arch->id, a);
        assert_int_equal(d->hidden_size, c->hidden_size);
        assert_int_equal(d->head_dim, 8);
        assert_int_equal(d->n_routed_experts, c->n_routed_experts);
        assert_int_equal(d->moe_intermediate_size, c->moe_intermediate_size);
        assert_int_equal(d->shared_intermediate_size, c->shared_intermediate_size);
        assert_int_equal(d->norm_topk_prob, c->norm_topk_prob);
        for (int l = 0; l < 3; l++) assert_int_equal(d->layers[l].kind, c->layers[l].kind);
        assert_true(d->rope_theta == c->rope_theta && d->rms_norm_eps == c->rms_norm_eps);
        free(js);
        moe_config_free(d);
        moe_config_free(c);
    }
}

/* A config bounded by its checkpoint's tensor count: sizes that imply far
 * more tensors are refused on the sizes alone, before the layer table or a
 * tensor list is allocated; sizes that fit parse as before. */
static void test_bounded_by_checkpoint(void **state)
{
    (void)state;
    char js[1024];
    const char *fmt = "{\"model_type\":\"qwen2_moe\",\"hidden_size\":64,\"num_hidden_layers\":%lld,"
                      "\"num_attention_heads\":4,\"vocab_size\":300,\"intermediate_size\":128,"
                      "\"moe_intermediate_size\":16,\"num_experts\":%lld,\"num_experts_per_tok\":2}";
    /* 4 layers x (2 norms, q, k, v, o, 3 biases, router, 6 experts x 3) + embed, norm, lm_head = 115 */
    snprintf(js, sizeof js, fmt, 4LL, 6LL);
    moe_config *c = moe_config_parse_bounded(js, strlen(js), "dir/config.json", 115);
    if (!c) fail_msg("%s", moe_error());
    moe_tensor_ref *refs;
    assert_int_equal(moe_config_tensor_list(c, &refs), 115);
    free(refs);
    moe_config_free(c);
    static const struct { long long layers, experts; const char *want; } bad[] = {
        {1LL << 30, 6, "dir/config.json: num_hidden_layers 1073741824 implies at least 6442450946 tensors, "
                       "but the checkpoint's safetensors hold only 115"},
        {4, 1LL << 30, "dir/config.json: its sizes (num_hidden_layers 4, 1073741824 routed experts) imply"},
        {1 << 24, 1 << 10, "dir/config.json: num_hidden_layers 16777216 implies"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        snprintf(js, sizeof js, fmt, bad[i].layers, bad[i].experts);
        moe_error_clear();
        assert_null(moe_config_parse_bounded(js, strlen(js), "dir/config.json", 115));
        if (!strstr(moe_error(), bad[i].want)) fail_msg("error '%s' lacks '%s'", moe_error(), bad[i].want);
        assert_int_equal(moe_error_kind(), MOE_ERR_DATA);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deepseek),     cmocka_unit_test(test_qwen2),
        cmocka_unit_test(test_qwen3_olmoe_mixtral), cmocka_unit_test(test_condensed),
        cmocka_unit_test(test_dropped),
        cmocka_unit_test(test_errors),       cmocka_unit_test(test_json_roundtrip),
        cmocka_unit_test(test_bounded_by_checkpoint),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
