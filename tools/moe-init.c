/* moe-init - write a random Hugging Face checkpoint of a supported MoE
 * architecture (config.json, safetensors, byte-level tokenizer), streaming,
 * deterministic for a seed. */
#include "bytetok.h"
#include "checkpoint.h"
#include "cli.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

static const char help[] =
    "Usage: moe-init [--arch ARCH] [--config FILE.json] [SIZES...] --seed N -o DIR\n"
    "Write a random checkpoint in exact Hugging Face layout: config.json, model.safetensors\n"
    "(or shards + model.safetensors.index.json), tokenizer.json, tokenizer_config.json.\n"
    "ARCH: deepseek, qwen2_moe, qwen3_moe, olmoe, mixtral.  Sizes default to a tiny model;\n"
    "--config takes them from a real config.json, options given override it.\n"
    "\n"
    "  -a, --arch ARCH          architecture (model_type); optional with --config\n"
    "  -c, --config FILE        take sizes and flags from this config.json\n"
    "  -o, --output DIR         model directory to create (refused if it exists, unless --force)\n"
    "      --hidden N           hidden_size (default 64)\n"
    "      --layers N           num_hidden_layers (default 2)\n"
    "      --heads N            num_attention_heads (default 4)\n"
    "      --kv-heads N         num_key_value_heads (default 2)\n"
    "      --head-dim N         head_dim (default hidden/heads)\n"
    "      --experts N          routed experts (default 8)\n"
    "      --top-k N            num_experts_per_tok (default 2)\n"
    "      --shared N           shared experts: deepseek n_shared_experts (default 2);\n"
    "                           qwen2_moe: shared_expert_intermediate_size = N * moe-intermediate\n"
    "      --shared-intermediate N  qwen2_moe shared_expert_intermediate_size (default 64)\n"
    "      --moe-intermediate N routed expert width (deepseek/qwen; default 32)\n"
    "      --intermediate N     dense MLP width (olmoe/mixtral: expert width; default 128)\n"
    "      --first-dense N      deepseek first_k_dense_replace (default 1)\n"
    "      --sparse-step N      qwen decoder_sparse_step (default 1)\n"
    "      --norm-topk 0|1      norm_topk_prob (default: the architecture's)\n"
    "      --vocab N            vocab_size (default 512; >= 257 for the tokenizer)\n"
    "      --max-pos N          max_position_embeddings (default 4096)\n"
    "      --dtype bf16|f32     weight dtype (default bf16)\n"
    "      --std F              standard deviation of the weights (default 0.02)\n"
    "      --norm-std F         norms are 1 + N(0, F) (default 0: exactly 1, as HF init)\n"
    "      --bias-std F         q/k/v biases are N(0, F) (default 0: zero, as HF init)\n"
    "      --shard-size SIZE    split into shards of at most SIZE bytes (K/M/G suffixes;\n"
    "                           default 5G; 0 = one file)\n"
    "\n"
    "Values: tensor T gets element pairs (2j, 2j+1) from Box-Muller on outputs 2j and\n"
    "2j+1 of a splitmix64 sequence whose state starts at splitmix64(seed) XOR\n"
    "FNV-1a-64(T's name): independent of order, sharding and threads.\n";

enum {
    O_HIDDEN = 0x100, O_LAYERS, O_HEADS, O_KV, O_HEADDIM, O_EXPERTS, O_TOPK, O_SHARED, O_SHARED_I,
    O_MOE_I, O_I, O_FIRST_DENSE, O_SPARSE, O_NORMTOPK, O_VOCAB, O_MAXPOS, O_DTYPE, O_STD,
    O_NORMSTD, O_BIASSTD, O_SHARD,
};

static const struct option opts[] = {
    {"arch", required_argument, 0, 'a'},
    {"config", required_argument, 0, 'c'},
    {"output", required_argument, 0, 'o'},
    {"hidden", required_argument, 0, O_HIDDEN},
    {"layers", required_argument, 0, O_LAYERS},
    {"heads", required_argument, 0, O_HEADS},
    {"kv-heads", required_argument, 0, O_KV},
    {"head-dim", required_argument, 0, O_HEADDIM},
    {"experts", required_argument, 0, O_EXPERTS},
    {"top-k", required_argument, 0, O_TOPK},
    {"shared", required_argument, 0, O_SHARED},
    {"shared-intermediate", required_argument, 0, O_SHARED_I},
    {"moe-intermediate", required_argument, 0, O_MOE_I},
    {"intermediate", required_argument, 0, O_I},
    {"first-dense", required_argument, 0, O_FIRST_DENSE},
    {"sparse-step", required_argument, 0, O_SPARSE},
    {"norm-topk", required_argument, 0, O_NORMTOPK},
    {"vocab", required_argument, 0, O_VOCAB},
    {"max-pos", required_argument, 0, O_MAXPOS},
    {"dtype", required_argument, 0, O_DTYPE},
    {"std", required_argument, 0, O_STD},
    {"norm-std", required_argument, 0, O_NORMSTD},
    {"bias-std", required_argument, 0, O_BIASSTD},
    {"shard-size", required_argument, 0, O_SHARD},
    MOE_CLI_COMMON_OPTIONS,
    {0, 0, 0, 0},
};

/* ---- deterministic values ---------------------------------------------------- */

#define GAMMA 0x9e3779b97f4a7c15ULL

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t fnv1a64(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h;
}

typedef struct {
    uint64_t key;    /* splitmix64 state before output 0 */
    double mean, std;
    moe_dtype dt;
    moe_progress *prog;
} init_ctx;

/* Output i (0-based) of the splitmix64 sequence starting at state key. */
static inline uint64_t sm_out(uint64_t key, uint64_t i) { return mix64(key + (i + 1) * GAMMA); }

/* The normal pair (z0, z1) = values of elements 2j and 2j+1. */
static inline void normal_pair(uint64_t key, uint64_t j, double *z0, double *z1)
{
    double u1 = (double)((sm_out(key, 2 * j) >> 11) + 1) * 0x1p-53; /* (0, 1] */
    double u2 = (double)(sm_out(key, 2 * j + 1) >> 11) * 0x1p-53;   /* [0, 1) */
    double r = sqrt(-2.0 * log(u1)), a = 2.0 * M_PI * u2;
    *z0 = r * cos(a);
    *z1 = r * sin(a);
}

static inline void put(const init_ctx *c, void *out, uint64_t i, double z)
{
    float v = (float)(c->mean + c->std * z);
    if (c->dt == MOE_DT_F32) ((float *)out)[i] = v;
    else ((uint16_t *)out)[i] = moe_f32_to_bf16(v);
}

static int fill(void *vctx, const char *name, uint64_t start, uint64_t n, void *out)
{
    (void)name;
    init_ctx *c = vctx;
    if (!(c->std > 0)) {
        for (uint64_t i = 0; i < n; i++) put(c, out, i, 0.0);
    } else {
        /* pairs j covering elements [start, start + n) */
        uint64_t j0 = start / 2, j1 = (start + n + 1) / 2;
#pragma omp parallel for schedule(static)
        for (uint64_t j = j0; j < j1; j++) {
            double z0, z1;
            normal_pair(c->key, j, &z0, &z1);
            uint64_t e = 2 * j;
            if (e >= start && e < start + n) put(c, out, e - start, z0);
            if (e + 1 >= start && e + 1 < start + n) put(c, out, e + 1 - start, z1);
        }
    }
    moe_progress_add(c->prog, n * (c->dt == MOE_DT_F32 ? 4 : 2));
    return 0;
}

/* The field of the overrides that option opt sets (NULL: not a size). */
static int *override_field(moe_config_overrides *o, int opt)
{
    switch (opt) {
    case O_HIDDEN: return &o->hidden_size;
    case O_LAYERS: return &o->num_layers;
    case O_HEADS: return &o->num_heads;
    case O_KV: return &o->num_kv_heads;
    case O_HEADDIM: return &o->head_dim;
    case O_EXPERTS: return &o->n_routed_experts;
    case O_TOPK: return &o->top_k;
    case O_SHARED: return &o->shared_experts;
    case O_SHARED_I: return &o->shared_intermediate_size;
    case O_MOE_I: return &o->moe_intermediate_size;
    case O_I: return &o->intermediate_size;
    case O_FIRST_DENSE: return &o->first_k_dense_replace;
    case O_SPARSE: return &o->decoder_sparse_step;
    case O_NORMTOPK: return &o->norm_topk_prob;
    case O_VOCAB: return &o->vocab_size;
    case O_MAXPOS: return &o->max_position_embeddings;
    default: return NULL;
    }
}

/* Overrides the architecture has no field for are usage errors. */
static void check_overrides(const moe_arch *a, const moe_config_overrides *o)
{
    if (a->shared == MOE_SHARED_NONE && o->shared_experts > 0)
        moe_cli_usage("--shared: %s has no shared experts", a->model_type);
    if (o->shared_intermediate_size != MOE_CONFIG_KEEP && a->shared != MOE_SHARED_SIZE)
        moe_cli_usage("--shared-intermediate is for qwen2_moe only");
    if (o->first_k_dense_replace != MOE_CONFIG_KEEP && a->layer_rule != MOE_LAYERS_DEEPSEEK)
        moe_cli_usage("--first-dense is for deepseek only");
    if (o->decoder_sparse_step != MOE_CONFIG_KEEP && a->layer_rule != MOE_LAYERS_QWEN)
        moe_cli_usage("--sparse-step is for qwen2_moe/qwen3_moe only");
}

static uint64_t parse_size(const char *opt, const char *s)
{
    char *end;
    double v = strtod(s, &end);
    double mul = 1;
    if (end == s || v < 0) moe_cli_usage("%s: not a size: '%s'", opt, s);
    switch (*end) {
    case 'k': case 'K': mul = 1e3; end++; break;
    case 'm': case 'M': mul = 1e6; end++; break;
    case 'g': case 'G': mul = 1e9; end++; break;
    case 't': case 'T': mul = 1e12; end++; break;
    }
    if (*end == 'B' || *end == 'b') end++;
    if (*end) moe_cli_usage("%s: not a size: '%s'", opt, s);
    return (uint64_t)(v * mul);
}

/* The config: --config's, or --arch's tiny default, with the size options
 * applied (moe_config_override) and the byte-level tokenizer's ids. */
static moe_config *make_config(const char *arch_name, const char *config, const moe_config_overrides *ov)
{
    moe_config *c;
    if (config) {
        c = moe_config_load(config);
        if (!c) moe_cli_fail();
        if (arch_name && strcmp(arch_name, c->arch->model_type))
            moe_cli_usage("--arch %s does not match model_type '%s' of %s", arch_name, c->arch->model_type,
                          config);
    } else {
        const moe_arch *a = moe_arch_find(arch_name);
        if (!a) moe_cli_usage("--arch: unknown architecture '%s' (supported: %s)", arch_name, moe_arch_list());
        c = moe_config_new(a);
        if (moe_config_finish(c) < 0) moe_cli_fail();
    }
    check_overrides(c->arch, ov);
    int vocab = ov->vocab_size != MOE_CONFIG_KEEP ? ov->vocab_size : c->vocab_size;
    if (vocab < 257) moe_cli_usage("--vocab %d: at least 257 ids are needed for the byte-level tokenizer", vocab);
    int rc = moe_config_override(c, ov);
    if (rc == MOE_CONFIG_BAD_SIZES)
        moe_cli_usage("--hidden %d is not a multiple of --heads %d", c->hidden_size, c->num_heads);
    if (rc < 0) moe_cli_fail();
    int ntok = moe_bytetok_size(c->vocab_size);
    c->bos_token_id = c->eos_token_id = ntok - 1;
    c->pad_token_id = -1;
    return c;
}

/* Standard deviations of the values: weights, norms (around 1), biases. */
typedef struct {
    double std, norm_std, bias_std;
} init_stds;

/* Where tensor r's values come from (mean, deviation, seed). */
static void tensor_ctx(init_ctx *x, const moe_tensor_ref *r, const init_stds *sd, uint64_t seedkey)
{
    x->key = seedkey ^ fnv1a64(r->name);
    switch (r->kind) {
    case MOE_T_INPUT_NORM: case MOE_T_POST_NORM: case MOE_T_FINAL_NORM: case MOE_T_Q_NORM: case MOE_T_K_NORM:
        x->mean = 1.0;
        x->std = sd->norm_std;
        break;
    case MOE_T_Q_BIAS: case MOE_T_K_BIAS: case MOE_T_V_BIAS:
        x->mean = 0;
        x->std = sd->bias_std;
        break;
    default:
        x->mean = 0;
        x->std = sd->std;
    }
}

/* Write the checkpoint of config c to directory out. */
static void write_model(const moe_config *c, const char *out, uint64_t shard, moe_dtype dt, const init_stds *sd)
{
    moe_tensor_ref *refs;
    int n = moe_config_tensor_list(c, &refs);
    if (n < 0) moe_cli_fail();
    moe_ckpt_writer *w = moe_ckpt_writer_open(out, shard, moe_cli.force);
    if (!w) moe_cli_fail();
    init_ctx *ctx = moe_calloc((size_t)n, sizeof *ctx);
    moe_progress prog;
    uint64_t total = 0;
    uint64_t seedkey = mix64(moe_cli.seed + GAMMA);
    for (int i = 0; i < n; i++) {
        const moe_tensor_ref *r = &refs[i];
        init_ctx *x = &ctx[i];
        tensor_ctx(x, r, sd, seedkey);
        x->dt = dt;
        x->prog = &prog;
        uint64_t numel = 1;
        for (int d = 0; d < r->ndim; d++) numel *= (uint64_t)r->shape[d];
        total += numel * (dt == MOE_DT_F32 ? 4 : 2);
        if (moe_ckpt_writer_add(w, r->name, dt, r->ndim, r->shape, NULL, fill, x) < 0) {
            moe_ckpt_writer_abort(w);
            moe_cli_fail();
        }
    }
    char *cj = moe_config_to_json(c, c->dtype);
    if (moe_ckpt_writer_text(w, "config.json", cj) < 0 ||
        moe_bytetok_write(moe_ckpt_writer_tmpdir(w), c->vocab_size, c->max_position_embeddings) < 0) {
        free(cj);
        moe_ckpt_writer_abort(w);
        moe_cli_fail();
    }
    free(cj);
    moe_progress_start(&prog, "moe-init", "B", total);
    int rc = moe_ckpt_writer_close(w);
    moe_progress_end(&prog);
    free(ctx);
    free(refs);
    if (rc < 0) moe_cli_fail();
}

int main(int argc, char **argv)
{
    const unsigned takes = MOE_CLI_TAKES_THREADS | MOE_CLI_TAKES_SEED | MOE_CLI_TAKES_FORCE |
                      MOE_CLI_TAKES_QUIET;
    moe_cli_init("moe-init", help, takes, argc, argv);
    const char *arch_name = NULL, *config = NULL, *out = NULL, *dtype = "bf16";
    moe_config_overrides ov;
    moe_config_overrides_init(&ov);
    double std = 0.02, norm_std = 0, bias_std = 0;
    uint64_t shard = 5000000000ULL;
    int opt;
    while ((opt = getopt_long(argc, argv, ":a:c:o:", opts, NULL)) != -1) {
        switch (opt) {
        case 'a': arch_name = optarg; break;
        case 'c': config = optarg; break;
        case 'o': out = optarg; break;
        case O_DTYPE:
            if (strcmp(optarg, "bf16") && strcmp(optarg, "f32"))
                moe_cli_usage("--dtype: expected bf16 or f32, got '%s'", optarg);
            dtype = optarg;
            break;
        case O_STD: std = moe_cli_double("--std", optarg); break;
        case O_NORMSTD: norm_std = moe_cli_double("--norm-std", optarg); break;
        case O_BIASSTD: bias_std = moe_cli_double("--bias-std", optarg); break;
        case O_SHARD: shard = parse_size("--shard-size", optarg); break;
        case O_NORMTOPK: ov.norm_topk_prob = (int)moe_cli_long("--norm-topk", optarg, 0, 1); break;
        case O_HIDDEN: case O_LAYERS: case O_HEADS: case O_KV: case O_HEADDIM: case O_EXPERTS:
        case O_TOPK: case O_SHARED: case O_SHARED_I: case O_MOE_I: case O_I: case O_FIRST_DENSE:
        case O_SPARSE: case O_VOCAB: case O_MAXPOS: {
            const char *nm = "size";
            for (const struct option *o = opts; o->name; o++)
                if (o->val == opt) nm = o->name;
            long lo = (opt == O_SHARED || opt == O_SHARED_I || opt == O_FIRST_DENSE) ? 0 : 1;
            char oname[64];
            snprintf(oname, sizeof oname, "--%s", nm);
            *override_field(&ov, opt) = (int)moe_cli_long(oname, optarg, lo, 1L << 30);
            break;
        }
        default:
            if (!moe_cli_handle(opt, optarg)) moe_cli_usage("unexpected option");
        }
    }
    if (optind < argc) moe_cli_usage("unexpected argument '%s'", argv[optind]);
    if (!out) moe_cli_usage("no output directory (-o DIR)");
    if (!arch_name && !config) moe_cli_usage("--arch ARCH or --config FILE is required");
    if (!(std >= 0) || !(norm_std >= 0) || !(bias_std >= 0)) moe_cli_usage("standard deviations must be >= 0");

    moe_config *c = make_config(arch_name, config, &ov);
    free(c->dtype);
    c->dtype = moe_strdup(strcmp(dtype, "f32") ? "bfloat16" : "float32");
    init_stds sd = {std, norm_std, bias_std};
    write_model(c, out, shard, strcmp(dtype, "f32") ? MOE_DT_BF16 : MOE_DT_F32, &sd);
    moe_config_free(c);
    return 0;
}
