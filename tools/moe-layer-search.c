/* moe-layer-search - CD-MoE step 2b: greedy choice of the layers to condense. */
#include "cli.h"
#include "search_job.h"

#include <stdio.h>
#include <stdlib.h>

static const char help[] =
    "Usage: moe-layer-search --model DIR --experts K [OPTIONS] [STREAM|-] > plan.msgpack.zst\n"
    "Greedy search, as the original CD-MoE, over the MoE layers to condense, each\n"
    "condensed with the first K experts of its ranking (K = 0: shared experts only)\n"
    "and their mean routing weights.  A candidate is scored by the divergence between\n"
    "the original and the candidate model's final hidden state (after the final norm),\n"
    "per token over the hidden dimension, averaged over a sequence's tokens, then over\n"
    "sequences.  Candidates in ascending layer order; the lowest score wins (ties: the\n"
    "earlier candidate).  The fast path caches the current model's hidden states, so a\n"
    "candidate restarts at its layer instead of layer 0 (memory: (layers + 1) x tokens\n"
    "x hidden floats per beam entry), and runs a step's candidates layer-major: each\n"
    "layer loaded once per pass for all candidates that reach it (plus once condensed\n"
    "where a candidate starts), tokens x hidden floats per candidate, in batches that\n"
    "fit --mem-mib (one pass per batch).  Appends a 'plan' record: the layer order\n"
    "(decoder-layer indices), the score after each step and every candidate's score.\n"
    "STREAM needs token, calib and (for K > 0) ranking records.\n"
    "\n"
    "The paper's baselines run the same search with a candidate layer dropped\n"
    "instead of condensed (--method layerdrop: its MLP block, the residual passes;\n"
    "blockdrop: the whole decoder layer); they need only the token records.  With\n"
    "--criterion cosine the order is one shot instead (He et al.): MoE layers by the\n"
    "cosine similarity of their input and output on the calibration tokens, the most\n"
    "similar first.\n"
    "\n"
    "  --model DIR        Hugging Face checkpoint directory (required)\n"
    "  --experts K        routed experts kept per condensed layer (required for\n"
    "                     --method cdmoe)\n"
    "  --method M         cdmoe (default: condense), layerdrop or blockdrop\n"
    "  --criterion C      greedy (default: the divergence of the final hidden state)\n"
    "                     or cosine (layerdrop and blockdrop only)\n"
    "  --layers N         length of the order (default: all MoE layers)\n"
    "  --beam B           keep the B best partial orders (default 1, the original)\n"
    "  --metric M         js (default, the original), kl, mse or cosine\n"
    "  --max-length N     truncate sequences to N tokens (default 256, the original's;\n"
    "                     0 = none)\n"
    "  --weight L:E=W     use W as the mean weight of expert E of decoder layer L\n"
    "                     (repeatable; e.g. for an expert calibration never routed to)\n"
    "  --mem-mib N        memory for the candidates' activations (default: a quarter\n"
    "                     of the host's or the GPU's free memory); fewer = more passes\n"
    "  --stream-weights   unload every layer after use even when the model fits in\n"
    "                     memory (as models over 1 GiB do; to measure that case)\n"
    "  --candidate-major  score one candidate after the other (the previous fast\n"
    "                     path, same result; for comparison)\n"
    "  --naive            run the original algorithm literally (a full model forward\n"
    "                     per candidate)\n"
    "  -o, --output FILE  write here instead of standard output\n";

enum { OPT_WEIGHT = 100, OPT_MODEL = 1, OPT_EXPERTS, OPT_LAYERS, OPT_BEAM, OPT_METRIC, OPT_MAXLEN, OPT_NAIVE,
       OPT_MEM, OPT_STREAM, OPT_CMAJOR, OPT_METHOD, OPT_CRITERION };

int main(int argc, char **argv) {
    const unsigned takes = MOE_CLI_TAKES_THREADS | MOE_CLI_TAKES_DEVICE | MOE_CLI_TAKES_FORCE |
                      MOE_CLI_TAKES_NO_PROVENANCE | MOE_CLI_TAKES_QUIET;
    moe_cli_init("moe-layer-search", help, takes, argc, argv);
    static const struct option opts[] = {{"model", required_argument, 0, OPT_MODEL},
                                         {"experts", required_argument, 0, OPT_EXPERTS},
                                         {"layers", required_argument, 0, OPT_LAYERS},
                                         {"beam", required_argument, 0, OPT_BEAM},
                                         {"metric", required_argument, 0, OPT_METRIC},
                                         {"max-length", required_argument, 0, OPT_MAXLEN},
                                         {"naive", no_argument, 0, OPT_NAIVE},
                                         {"mem-mib", required_argument, 0, OPT_MEM},
                                         {"stream-weights", no_argument, 0, OPT_STREAM},
                                         {"candidate-major", no_argument, 0, OPT_CMAJOR},
                                         {"weight", required_argument, 0, OPT_WEIGHT},
                                         {"method", required_argument, 0, OPT_METHOD},
                                         {"criterion", required_argument, 0, OPT_CRITERION},
                                         {"output", required_argument, 0, 'o'},
                                         MOE_CLI_COMMON_OPTIONS,
                                         {0, 0, 0, 0}};
    const char *model = NULL, *out = "-";
    moe_search_opts o = {.metric = 0, .max_length = 256, .k = -1, .beam = 1};
    int c;
    moe_weight_override *weights = NULL;
    int nweights = 0;
    while ((c = getopt_long(argc, argv, ":o:", opts, NULL)) != -1) {
        if (moe_cli_handle(c, optarg)) continue;
        switch (c) {
        case OPT_MODEL: model = optarg; break;
        case OPT_EXPERTS: o.k = (int)moe_cli_long("--experts", optarg, 0, 1 << 20); break;
        case OPT_LAYERS: o.max_layers = (int)moe_cli_long("--layers", optarg, 1, 1 << 20); break;
        case OPT_BEAM: o.beam = (int)moe_cli_long("--beam", optarg, 1, 1024); break;
        case OPT_METRIC:
            if ((o.metric = moe_metric_from_name(optarg)) < 0)
                moe_cli_usage("--metric: expected js, kl, mse or cosine, got '%s'", optarg);
            break;
        case OPT_MAXLEN: o.max_length = (int)moe_cli_long("--max-length", optarg, 0, 1 << 30); break;
        case OPT_NAIVE: o.naive = 1; break;
        case OPT_MEM:
            o.mem_bytes = (size_t)moe_cli_long("--mem-mib", optarg, 1, 1 << 24) << 20;
            break;
        case OPT_STREAM: o.stream_weights = 1; break;
        case OPT_CMAJOR: o.candidate_major = 1; break;
        case OPT_WEIGHT:
            if (moe_search_add_weight(&weights, &nweights, optarg) < 0)
                moe_cli_usage("--weight: expected LAYER:EXPERT=WEIGHT, got '%s'", optarg);
            break;
        case OPT_METHOD:
            if ((o.method = moe_plan_method_from_name(optarg)) < 0)
                moe_cli_usage("--method: expected cdmoe, layerdrop or blockdrop, got '%s'", optarg);
            break;
        case OPT_CRITERION:
            if ((o.criterion = moe_plan_criterion_from_name(optarg)) < 0)
                moe_cli_usage("--criterion: expected greedy or cosine, got '%s'", optarg);
            break;
        case 'o': out = optarg; break;
        default: moe_cli_usage("unknown option or missing argument");
        }
    }
    if (!model) moe_cli_usage("--model DIR is required");
    int drop = o.method != MOE_PLAN_CDMOE;
    if (o.k < 0 && !drop) moe_cli_usage("--experts K is required");
    if (o.k > 0 && drop) moe_cli_usage("--experts: --method %s keeps no experts", moe_plan_method_name(o.method));
    if (o.criterion == MOE_PLAN_COSINE && !drop)
        moe_cli_usage("--criterion cosine: only for --method layerdrop or blockdrop");
    if (drop && o.k < 0) o.k = 0;
    if (drop && (o.naive || o.beam > 1 || weights) && o.criterion == MOE_PLAN_COSINE)
        moe_cli_usage("--criterion cosine is one shot: no --naive, --beam or --weight");
    if (argc - optind > 1) moe_cli_usage("one input stream at most");
    const char *in = optind < argc ? argv[optind] : "-";
    o.weights = weights;
    o.n_weights = nweights;

    /* the ranking is read even for K = 0, where it is not needed */
    moe_search_job j = {.tool = "moe-layer-search", .kind = MOE_REC_PLAN, .argc = argc, .argv = argv,
                        .need = (drop ? 0 : MOE_SEARCH_IN_CALIB) | (o.k > 0 ? MOE_SEARCH_IN_RANKING : 0),
                        .collect = MOE_SEARCH_IN_RANKING};
    /* every candidate that reaches a layer runs through it while it is loaded:
     * keep its routed experts converted for the load (one layer's experts in
     * f32, e.g. 2.2 GB for DeepSeekMoE-16B) instead of converting them again
     * in every MLP call (each candidate, each chunk of tokens) */
    moe_model_opts mo = {.device = moe_cli.device, .precision = moe_cli.precision, .expert_cache_bytes = (size_t)-1};
    moe_model_opts_from_env(&mo);
    if (moe_search_job_model(&j, model, &mo) < 0) moe_cli_fail();
    if (o.k > j.cfg->n_routed_experts)
        moe_cli_usage("--experts %d: the model has %d routed experts per layer", o.k,
                      j.cfg->n_routed_experts);
    if (moe_search_job_open(&j, in, out, moe_cli.force, moe_cli.no_provenance) < 0) moe_cli_fail();
    moe_plan plan;
    if (moe_layer_search_run(j.model, &j.seqs, &j.calib, &j.ranking, &o, &plan, &j.work) < 0) {
        moe_search_job_abort(&j);
        moe_cli_fail_in(in); /* what the input holds (no sequences, a short ranking, ...) */
    }
    if (moe_plan_write(j.out, &plan) < 0 || moe_search_job_finish(&j) < 0) {
        moe_search_job_abort(&j);
        moe_cli_fail();
    }
    if (!moe_quiet) {
        char buf[256];
        moe_search_work_str(&j.work, buf, sizeof buf);
        if (o.naive)
            fprintf(stderr, "moe-layer-search: naive: %s\n", buf);
        else
            fprintf(stderr, "moe-layer-search: %s%s, %llu layer loads\n",
                    o.candidate_major ? "candidate-major: " : "", buf,
                    (unsigned long long)j.work.layer_loads);
    }
    moe_plan_free(&plan);
    free(weights);
    moe_search_job_close(&j);
    return 0;
}
