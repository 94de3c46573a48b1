/* moe-calib - CD-MoE step 1: routing statistics per MoE layer and expert. */
#include "cli.h"
#include "search_job.h"

#include <stdio.h>
#include <stdlib.h>

static const char help[] =
    "Usage: moe-calib --model DIR [OPTIONS] [STREAM|-] > calib.msgpack.zst\n"
    "Run the model on the token sequences of STREAM (from moe-tokenize) and append,\n"
    "for every MoE layer (by decoder-layer index), a 'calib' record: per routed\n"
    "expert the sum of the routing weights it received over all tokens (the top-k\n"
    "weights as the router outputs them, renormalised only where the model\n"
    "renormalises), the number of tokens routed to it, their ratio (mean weight),\n"
    "its load, and the layer's mean routing entropy.  Upstream records pass through.\n"
    "Every position of every sequence counts, as in the original CD-MoE (which\n"
    "calibrated on untruncated texts with BOS).  Layer-major: each layer's weights\n"
    "are read once; memory ~ 3 x tokens x hidden floats + one layer (with\n"
    "--batch-tokens, per group of sequences; each group reads the weights again).\n"
    "\n"
    "  --model DIR        Hugging Face checkpoint directory (required)\n"
    "  --max-length N     use only the first N tokens of each sequence (default: all)\n"
    "  --batch-tokens N   run the sequences in groups of at most N tokens (default:\n"
    "                     all at once); the result is the same bit for bit\n"
    "  --reap             also measure each expert's REAP saliency (the mean over the\n"
    "                     tokens routed to it of gate weight x ||expert output||_2; the\n"
    "                     'reap' key, for moe-condense --method prune-reap); runs the\n"
    "                     routed experts a second time\n"
    "  -o, --output FILE  write here instead of standard output\n";

enum { OPT_MODEL = 1, OPT_MAXLEN, OPT_BATCH, OPT_REAP };

int main(int argc, char **argv) {
    const unsigned takes = MOE_CLI_TAKES_THREADS | MOE_CLI_TAKES_DEVICE | MOE_CLI_TAKES_FORCE |
                      MOE_CLI_TAKES_NO_PROVENANCE | MOE_CLI_TAKES_QUIET;
    moe_cli_init("moe-calib", help, takes, argc, argv);
    static const struct option opts[] = {{"model", required_argument, 0, OPT_MODEL},
                                         {"max-length", required_argument, 0, OPT_MAXLEN},
                                         {"batch-tokens", required_argument, 0, OPT_BATCH},
                                         {"reap", no_argument, 0, OPT_REAP},
                                         {"output", required_argument, 0, 'o'},
                                         MOE_CLI_COMMON_OPTIONS,
                                         {0, 0, 0, 0}};
    const char *model = NULL, *out = "-";
    int max_length = 0, c, reap = 0;
    size_t batch = 0;
    while ((c = getopt_long(argc, argv, ":o:", opts, NULL)) != -1) {
        if (moe_cli_handle(c, optarg)) continue;
        switch (c) {
        case OPT_MODEL: model = optarg; break;
        case OPT_MAXLEN: max_length = (int)moe_cli_long("--max-length", optarg, 1, 1 << 30); break;
        case OPT_BATCH: batch = (size_t)moe_cli_long("--batch-tokens", optarg, 1, 1L << 40); break;
        case OPT_REAP: reap = 1; break;
        case 'o': out = optarg; break;
        default: moe_cli_usage("unknown option or missing argument");
        }
    }
    if (!model) moe_cli_usage("--model DIR is required");
    if (argc - optind > 1) moe_cli_usage("one input stream at most");
    const char *in = optind < argc ? argv[optind] : "-";

    moe_search_job j = {.tool = "moe-calib", .kind = MOE_REC_CALIB, .argc = argc, .argv = argv};
    moe_model_opts mo = {.device = moe_cli.device, .precision = moe_cli.precision};
    moe_model_opts_from_env(&mo);
    if (moe_search_job_model(&j, model, &mo) < 0 ||
        moe_search_job_open(&j, in, out, moe_cli.force, moe_cli.no_provenance) < 0)
        moe_cli_fail();
    moe_calib cal;
    if (moe_calib_run_reap(j.model, &j.seqs, max_length, batch, reap, &cal, &j.work) < 0) {
        moe_search_job_abort(&j);
        moe_cli_fail_in(in); /* what the input holds (no sequences, ...) */
    }
    if (moe_calib_write(j.out, &cal) < 0 || moe_search_job_finish(&j) < 0) {
        moe_search_job_abort(&j);
        moe_cli_fail();
    }
    if (!moe_quiet) {
        char buf[256];
        moe_search_work_str(&j.work, buf, sizeof buf);
        fprintf(stderr, "moe-calib: %d sequences; %s\n", j.seqs.n, buf);
    }
    moe_calib_free(&cal);
    moe_search_job_close(&j);
    return 0;
}
