/* moe-expert-rank - CD-MoE step 2a: greedy expert ranking per MoE layer. */
#include "cli.h"
#include "search_job.h"

#include <stdio.h>
#include <stdlib.h>

static const char help[] =
    "Usage: moe-expert-rank --model DIR [OPTIONS] [STREAM|-] > ranked.msgpack.zst\n"
    "For every MoE layer independently, pick routed experts greedily, as the original\n"
    "CD-MoE does: a candidate set is scored by condensing only this layer (shared\n"
    "experts + the candidates, each times its mean routing weight from moe-calib, no\n"
    "router, every token) and measuring the divergence between the original and the\n"
    "condensed output of that decoder layer (after the final norm for the last layer),\n"
    "per token over the hidden dimension, averaged over a sequence's tokens, then\n"
    "over sequences.  Lowest score wins; ties go to the lowest expert id.  Experts\n"
    "that calibration never routed to have no mean weight and are left out (listed in\n"
    "the record).  Appends one 'ranking' record per layer (keyed by decoder-layer\n"
    "index: experts in pick order, score after each pick, every candidate's score).\n"
    "STREAM needs token and calib records (moe-tokenize | moe-calib).\n"
    "\n"
    "  --model DIR         Hugging Face checkpoint directory (required)\n"
    "  --max-experts K     experts to rank per layer (default: the model's top-k)\n"
    "  --metric M          js (default, the original), kl, mse or cosine\n"
    "  --layers LIST       only these decoder layers, e.g. 1-9,12 (shards merge with\n"
    "                      moe-merge)\n"
    "  --max-length N      truncate sequences to N tokens for the search (default 256,\n"
    "                      the original's; 0 = none)\n"
    "  --mem-mib N         expert-output cache (default 1024).  The fast path keeps\n"
    "                      ~7 x tokens x hidden floats plus as many candidate experts'\n"
    "                      outputs for all tokens (tokens x hidden floats each) as fit\n"
    "                      in the cache; it recomputes the others' outputs per token\n"
    "                      chunk at every pick.\n"
    "  --weight L:E=W      use W as the mean weight of expert E of decoder layer L\n"
    "                      (repeatable; e.g. for an expert calibration never routed to)\n"
    "  --naive             run the original algorithm literally (a full model forward\n"
    "                      per candidate; small models only)\n"
    "  -o, --output FILE   write here instead of standard output\n";

enum { OPT_WEIGHT = 100, OPT_MODEL = 1, OPT_MAXEXP, OPT_METRIC, OPT_LAYERS, OPT_MAXLEN, OPT_MEM, OPT_NAIVE };

int main(int argc, char **argv) {
    const unsigned takes = MOE_CLI_TAKES_THREADS | MOE_CLI_TAKES_DEVICE | MOE_CLI_TAKES_FORCE |
                      MOE_CLI_TAKES_NO_PROVENANCE | MOE_CLI_TAKES_QUIET;
    moe_cli_init("moe-expert-rank", help, takes, argc, argv);
    static const struct option opts[] = {{"model", required_argument, 0, OPT_MODEL},
                                         {"max-experts", required_argument, 0, OPT_MAXEXP},
                                         {"metric", required_argument, 0, OPT_METRIC},
                                         {"layers", required_argument, 0, OPT_LAYERS},
                                         {"max-length", required_argument, 0, OPT_MAXLEN},
                                         {"mem-mib", required_argument, 0, OPT_MEM},
                                         {"naive", no_argument, 0, OPT_NAIVE},
                                         {"weight", required_argument, 0, OPT_WEIGHT},
                                         {"output", required_argument, 0, 'o'},
                                         MOE_CLI_COMMON_OPTIONS,
                                         {0, 0, 0, 0}};
    const char *model = NULL, *out = "-";
    moe_search_opts o = {.metric = 0, .max_length = 256, .max_experts = -1};
    int c;
    moe_weight_override *weights = NULL;
    int nweights = 0;
    int *layers = NULL, nlayers = 0;
    while ((c = getopt_long(argc, argv, ":o:", opts, NULL)) != -1) {
        if (moe_cli_handle(c, optarg)) continue;
        switch (c) {
        case OPT_MODEL: model = optarg; break;
        case OPT_MAXEXP: o.max_experts = (int)moe_cli_long("--max-experts", optarg, 1, 1 << 20); break;
        case OPT_METRIC:
            if ((o.metric = moe_metric_from_name(optarg)) < 0)
                moe_cli_usage("--metric: expected js, kl, mse or cosine, got '%s'", optarg);
            break;
        case OPT_LAYERS:
            free(layers);
            if (moe_parse_layer_list(optarg, &layers, &nlayers) < 0)
                moe_cli_usage("--layers: expected a list like 1,3,5-9, got '%s'", optarg);
            break;
        case OPT_MAXLEN: o.max_length = (int)moe_cli_long("--max-length", optarg, 0, 1 << 30); break;
        case OPT_MEM:
            o.mem_bytes = (size_t)moe_cli_long("--mem-mib", optarg, 1, 1 << 24) << 20;
            break;
        case OPT_NAIVE: o.naive = 1; break;
        case OPT_WEIGHT:
            if (moe_search_add_weight(&weights, &nweights, optarg) < 0)
                moe_cli_usage("--weight: expected LAYER:EXPERT=WEIGHT, got '%s'", optarg);
            break;
        case 'o': out = optarg; break;
        default: moe_cli_usage("unknown option or missing argument");
        }
    }
    if (!model) moe_cli_usage("--model DIR is required");
    if (argc - optind > 1) moe_cli_usage("one input stream at most");
    const char *in = optind < argc ? argv[optind] : "-";
    o.layers = layers;
    o.n_layers = nlayers;
    o.weights = weights;
    o.n_weights = nweights;

    moe_search_job j = {.tool = "moe-expert-rank", .kind = MOE_REC_RANKING, .argc = argc, .argv = argv,
                        .need = MOE_SEARCH_IN_CALIB};
    /* each layer is loaded once: keep its routed experts converted while it is
     * (one layer's experts in f32, e.g. 2.2 GB for DeepSeekMoE-16B) rather than
     * converting them again in the layer's MLP call (per chunk of tokens) and in
     * every expert evaluation */
    moe_model_opts mo = {.device = moe_cli.device, .precision = moe_cli.precision, .expert_cache_bytes = (size_t)-1};
    moe_model_opts_from_env(&mo);
    if (moe_search_job_model(&j, model, &mo) < 0) moe_cli_fail();
    if (o.max_experts < 0) o.max_experts = j.cfg->top_k;
    if (o.max_experts > j.cfg->n_routed_experts)
        moe_cli_usage("--max-experts %d: the model has %d routed experts per layer", o.max_experts,
                      j.cfg->n_routed_experts);
    if (moe_search_job_open(&j, in, out, moe_cli.force, moe_cli.no_provenance) < 0) moe_cli_fail();
    moe_ranking rk;
    if (moe_rank_run(j.model, &j.seqs, &j.calib, &o, &rk, &j.work) < 0) {
        moe_search_job_abort(&j);
        moe_cli_fail_in(in); /* what the input holds (no sequences, ...) */
    }
    if (moe_ranking_write(j.out, &rk) < 0 || moe_search_job_finish(&j) < 0) {
        moe_search_job_abort(&j);
        moe_cli_fail();
    }
    for (int l = 0; l < rk.L; l++) {
        const moe_rank_layer *rl = &rk.layers[l];
        if (rl->present && rl->n_unrouted)
            moe_warn("layer %d: %d experts never routed in calibration, left out of the "
                     "candidates", l, rl->n_unrouted);
        if (rl->present && rl->n < o.max_experts)
            moe_warn("layer %d: only %d experts ranked (--max-experts %d)", l, rl->n, o.max_experts);
    }
    if (!moe_quiet) {
        char buf[256];
        moe_search_work_str(&j.work, buf, sizeof buf);
        fprintf(stderr, "moe-expert-rank: %s%s\n", o.naive ? "naive: " : "", buf);
    }
    moe_ranking_free(&rk);
    free(weights);
    free(layers);
    moe_search_job_close(&j);
    return 0;
}
