/* moe-condense - write the condensed checkpoint (CD-MoE step 4). */
#include "checkpoint.h"
#include "cli.h"
#include "condense.h"
#include "cplan.h"
#include "records.h"

#include <stdlib.h>
#include <string.h>

static const char help[] =
    "Usage: moe-condense --model DIR --layers N --experts K -o OUT [OPTIONS] [STREAM|-]\n"
    "       moe-condense --model DIR --method layerdrop|blockdrop --layers N -o OUT [STREAM|-]\n"
    "       moe-condense --model DIR --method prune-freq|prune-reap --experts N -o OUT [STREAM|-]\n"
    "Condense the first N layers of the greedy layer order, each keeping its shared\n"
    "experts and its first K ranked routed experts with their mean routing weights\n"
    "(no router), and write the smaller checkpoint to directory OUT.\n"
    "\n"
    "The plan comes from STREAM (standard input by default): the output of\n"
    "moe-layer-search, which carries moe-calib's statistics and moe-expert-rank's\n"
    "rankings.  Or from the original CD-MoE code's JSON files:\n"
    "  --cdmoe-weights FILE  dynamic_weight.json  {\"L-E\": [sum, count, mean]}\n"
    "  --cdmoe-experts FILE  layer_idx_to_expert_idx*.json  {\"L\": [experts...]}\n"
    "  --cdmoe-order FILE    layer_idx_order*.json  [layers...]\n"
    "  (L counts MoE layers from 0, as the original does; our streams use\n"
    "  decoder-layer indices.)  With these, no stream is read unless one is named.\n"
    "\n"
    "  --model DIR        the source checkpoint (Hugging Face layout)\n"
    "  --layers N         number of layers to condense (0 copies the model)\n"
    "  --experts K        routed experts kept per condensed layer (0: shared only)\n"
    "  -o, --output OUT   output directory (refused if it exists, unless --force)\n"
    "  --shard-size MB    split tensors into shards of at most MB megabytes\n"
    "                     (default: one file up to 5000 MB, then 5000 MB shards)\n"
    "  --fold             write each condensed layer as one dense MLP (kept experts\n"
    "                     scaled, plus the shared experts) under the dense-layer\n"
    "                     names mlp.{gate,up,down}_proj; not for qwen2_moe, whose\n"
    "                     shared expert is gated\n"
    "  --method M         what to do with the chosen layers (default cdmoe: condense):\n"
    "                     layerdrop  drop the MLP block of the first N layers of a\n"
    "                                moe-layer-search --method layerdrop order\n"
    "                     blockdrop  drop the whole decoder layer (--method blockdrop\n"
    "                                order); no --experts for either\n"
    "                     prune-freq keep the K routed experts of every MoE layer that\n"
    "                                calibration routed the most tokens to; the router\n"
    "                                keeps their rows and routes top-k among them\n"
    "                     prune-reap the same, by REAP saliency (moe-calib --reap);\n"
    "                                no --layers for either\n"
    "Prints parameters and bytes before and after on standard output.\n";

enum { OPT_MODEL = 1, OPT_LAYERS, OPT_EXPERTS, OPT_W, OPT_E, OPT_O, OPT_SHARD, OPT_FOLD, OPT_METHOD };

/* --method: the plan methods (records.h), then expert pruning */
enum { METHOD_PRUNE_FREQ = 3, METHOD_PRUNE_REAP = 4 };

static int method_from_name(const char *s) {
    if (strcmp(s, "prune-freq") == 0) return METHOD_PRUNE_FREQ;
    if (strcmp(s, "prune-reap") == 0) return METHOD_PRUNE_REAP;
    return moe_plan_method_from_name(s);
}

static const char *argv_method(int m) {
    return m == METHOD_PRUNE_FREQ ? "prune-freq" : m == METHOD_PRUNE_REAP ? "prune-reap" : moe_plan_method_name(m);
}

static void human(char *buf, size_t n, double v) {
    const char *unit[] = {"", "K", "M", "G", "T"};
    int u = 0;
    while (v >= 1000 && u < 4) { v /= 1000; u++; }
    snprintf(buf, n, u ? "%.2f%s" : "%.0f%s", v, unit[u]);
}

static void print_report(const moe_condense_report *r, int method, int n_layers, int k, const int *layers) {
    char a[32], b[32], c[32], d[32];
    human(a, sizeof a, (double)r->params_before);
    human(b, sizeof b, (double)r->params_after);
    human(c, sizeof c, (double)r->bytes_before);
    human(d, sizeof d, (double)r->bytes_after);
    printf("%-12s %12s %12s %8s\n", "", "before", "after", "ratio");
    printf("%-12s %12s %12s %8.4f\n", "parameters", a, b, (double)r->params_after / (double)r->params_before);
    printf("%-12s %12s %12s %8.4f\n", "bytes", c, d, (double)r->bytes_after / (double)r->bytes_before);
    if (method == METHOD_PRUNE_FREQ || method == METHOD_PRUNE_REAP) {
        printf("pruned every MoE layer to %d routed experts (%s)\n", k, argv_method(method));
        return;
    }
    if (method == MOE_PLAN_CDMOE)
        printf("condensed %d layer%s with %d routed expert%s each:", n_layers, n_layers == 1 ? "" : "s", k,
               k == 1 ? "" : "s");
    else
        printf("dropped the %s of %d layer%s:", method == MOE_PLAN_LAYERDROP ? "MLP block" : "decoder block",
               n_layers, n_layers == 1 ? "" : "s");
    for (int i = 0; i < n_layers; i++) printf(" %d", layers[i]);
    printf("\n");
}

/* The plan's layer order must come from a search of the same method. */
static int method_matches(const moe_cplan *p, int method, int n_layers) {
    if (n_layers == 0 || method > MOE_PLAN_BLOCKDROP) return 0;
    int have = p->order_method < 0 ? MOE_PLAN_CDMOE : p->order_method;
    if (p->n_order == 0 || have == method) return 0;
    moe_error_set(MOE_ERR_DATA, "the layer order is a %s plan; --method %s needs moe-layer-search --method %s",
                  moe_plan_method_name(have), moe_plan_method_name(method), moe_plan_method_name(method));
    return -1;
}

/* The inputs the plan was read from, for messages: "plan.msgpack.zst",
 * "w.json, e.json, o.json", ... (static storage). */
static const char *plan_inputs(const char *stream, const char *wj, const char *ej, const char *oj)
{
    static char buf[4096];
    const char *names[4] = {stream && !strcmp(stream, "-") ? "<stdin>" : stream, wj, ej, oj};
    size_t n = 0;
    buf[0] = 0;
    for (int i = 0; i < 4; i++)
        if (names[i] && n < sizeof buf)
            n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%s", n ? ", " : "", names[i]);
    return buf;
}

int main(int argc, char **argv) {
    moe_cli_init("moe-condense", help, MOE_CLI_TAKES_FORCE, argc, argv);
    static const struct option opts[] = {
        {"model", required_argument, 0, OPT_MODEL},     {"layers", required_argument, 0, OPT_LAYERS},
        {"experts", required_argument, 0, OPT_EXPERTS}, {"output", required_argument, 0, 'o'},
        {"cdmoe-weights", required_argument, 0, OPT_W}, {"cdmoe-experts", required_argument, 0, OPT_E},
        {"cdmoe-order", required_argument, 0, OPT_O},   {"shard-size", required_argument, 0, OPT_SHARD},
        {"fold", no_argument, 0, OPT_FOLD},             {"method", required_argument, 0, OPT_METHOD},
        MOE_CLI_COMMON_OPTIONS, {0, 0, 0, 0}};
    const char *model = NULL, *out = NULL, *wj = NULL, *ej = NULL, *oj = NULL;
    long n_layers = -1, k = -1, shard_mb = -1;
    int c, fold = 0, method = MOE_PLAN_CDMOE;
    while ((c = getopt_long(argc, argv, ":o:", opts, NULL)) != -1) {
        if (moe_cli_handle(c, optarg)) continue;
        switch (c) {
        case OPT_MODEL: model = optarg; break;
        case OPT_LAYERS: n_layers = moe_cli_long("--layers", optarg, 0, 100000); break;
        case OPT_EXPERTS: k = moe_cli_long("--experts", optarg, 0, 100000); break;
        case 'o': out = optarg; break;
        case OPT_W: wj = optarg; break;
        case OPT_E: ej = optarg; break;
        case OPT_O: oj = optarg; break;
        case OPT_FOLD: fold = 1; break;
        case OPT_METHOD:
            if ((method = method_from_name(optarg)) < 0)
                moe_cli_usage("--method: expected cdmoe, layerdrop, blockdrop, prune-freq or prune-reap, got '%s'",
                              optarg);
            break;
        case OPT_SHARD: shard_mb = moe_cli_long("--shard-size", optarg, 1, 1L << 30); break;
        default: moe_cli_usage("unknown option");
        }
    }
    if (!model) moe_cli_usage("--model DIR is required");
    if (!out) moe_cli_usage("-o OUT is required");
    int drop = method == MOE_PLAN_LAYERDROP || method == MOE_PLAN_BLOCKDROP;
    int prune = method == METHOD_PRUNE_FREQ || method == METHOD_PRUNE_REAP;
    if (prune && n_layers >= 0) moe_cli_usage("--layers: --method %s prunes every MoE layer", argv_method(method));
    if (drop && k > 0) moe_cli_usage("--experts: --method %s keeps no experts", argv_method(method));
    if (prune) n_layers = 0;
    if (drop && k < 0) k = 0;
    if (n_layers < 0) moe_cli_usage("--layers N is required");
    if (k < 0) moe_cli_usage("--experts K is required");
    if (fold && (drop || prune)) moe_cli_usage("--fold: only for --method cdmoe");
    if (argc - optind > 1) moe_cli_usage("at most one input stream");
    const char *stream = optind < argc ? argv[optind] : (wj || ej || oj) ? NULL : "-";

    moe_ckpt *ck = moe_ckpt_open(model);
    if (!ck) moe_cli_fail();
    const moe_config *cfg = moe_ckpt_config(ck);
    if (prune && k < cfg->top_k)
        moe_cli_usage("--experts %ld: fewer than the %d experts the router picks per token (top-k)", k, cfg->top_k);
    if (k > cfg->n_routed_experts)
        moe_cli_usage("--experts %ld: the model has %d routed experts per layer", k, cfg->n_routed_experts);
    if (fold && cfg->shared_gate && cfg->shared_intermediate_size > 0)
        moe_cli_usage("--fold: %s's shared expert is gated by sigmoid(x.g), which no fixed MLP reproduces",
                      cfg->arch->model_type);
    moe_cplan *plan = moe_cplan_new(cfg);
    if (stream) {
        moe_reader *r = moe_reader_open(stream);
        if (!r || moe_reader_check_model(r, moe_ckpt_fingerprint(ck), moe_cli.force) < 0 ||
            moe_cplan_read_stream(plan, cfg, r) < 0)
            moe_cli_fail();
        moe_reader_close(r);
    }
    if (moe_cplan_read_cdmoe(plan, cfg, wj, ej, oj) < 0) moe_cli_fail();

    size_t nsel = (size_t)(n_layers ? n_layers : 1) * (size_t)(k ? k : 1);
    int *layers = moe_calloc((size_t)(n_layers ? n_layers : 1), sizeof *layers);
    int *experts = moe_calloc(nsel, sizeof *experts);
    float *weights = moe_calloc(nsel, sizeof *weights);
    int n_moe = 0, *kept = prune ? moe_calloc((size_t)cfg->num_layers * (size_t)(k ? k : 1) + 1, sizeof(int)) : NULL;
    int rc = method_matches(plan, method, (int)n_layers);
    if (rc == 0 && prune) rc = moe_cplan_prune(plan, cfg, (int)k, method == METHOD_PRUNE_REAP, kept, &n_moe);
    if (rc == 0) rc = moe_cplan_select(plan, (int)n_layers, prune ? 0 : (int)k, layers, experts, weights);
    if (rc < 0) {
        free(kept);
        free(layers); /* freed, not left to exit: the sanitizer build reports them as leaks */
        free(experts);
        free(weights);
        moe_cplan_free(plan);
        moe_ckpt_close(ck);
        moe_cli_fail_in(plan_inputs(stream, wj, ej, oj)); /* what the plan lacks: name where it came from */
    }

    moe_condense_opts o = {.n_layers = (int)n_layers, .k = (int)k, .layers = layers, .experts = experts,
                           .weights = weights, .argc = argc, .argv = argv, .force = moe_cli.force, .fold = fold,
                           .drop = drop ? (moe_drop_kind)method : MOE_DROP_NONE,
                           .prune_n = prune ? (int)k : 0, .prune_kept = kept,
                           .shard_bytes = shard_mb > 0 ? (uint64_t)shard_mb * 1000000u
                                          : moe_ckpt_bytes(ck) > 5000000000ull ? 5000000000ull : 0};
    moe_condense_report rep;
    if (moe_condense_write(ck, out, &o, &rep) < 0) moe_cli_fail();
    print_report(&rep, method, (int)n_layers, (int)k, layers);
    free(kept);
    moe_cplan_free(plan);
    moe_ckpt_close(ck);
    free(layers);
    free(experts);
    free(weights);
    moe_cli_flush_stdout();
    return 0;
}
