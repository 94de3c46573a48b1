/* moe-eval - evaluate a model on a token stream.  (This version: --dump.) */
#include "cli.h"
#include "evaldump.h"
#include "model.h"
#include "stream.h"

#include <stdlib.h>
#include <string.h>

static const char help[] =
    "Usage: moe-eval --model DIR --dump hidden,logits [OPTIONS] [TOKENS|-] [-o OUT]\n"
    "Run the model's forward pass over a token stream (records of type \"tokens\",\n"
    "as moe-tokenize writes them) and write a moe-stream of kind \"dump\": the input\n"
    "records passed through, each \"tokens\" record followed by a \"dump\" record\n"
    "{index, hidden: f32 [L+1, T, H], logits: f32 [T, V]}.  hidden is Hugging\n"
    "Face's output_hidden_states: the embeddings first, then each layer's output,\n"
    "the last one after the final norm.  Computation is float32 on the CPU.\n"
    "\n"
    "  -m, --model DIR        Hugging Face checkpoint directory (config.json + safetensors)\n"
    "  -d, --dump LIST        what to write: hidden, logits, or hidden,logits\n"
    "  -o, --output FILE      write here instead of standard output\n"
    "      --max-length N     truncate each sequence to N tokens\n"
    "      --batch-tokens N   tokens run together through each layer (default 2048);\n"
    "                         memory grows with N x hidden size x layers when dumping\n"
    "                         hidden states; results do not depend on it\n"
    "With no TOKENS, or TOKENS '-', read standard input.\n";

enum { OPT_MAX_LENGTH = 1, OPT_BATCH_TOKENS };

int main(int argc, char **argv) {
    moe_cli_init("moe-eval", help, argc, argv);
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},
        {"dump", required_argument, 0, 'd'},
        {"output", required_argument, 0, 'o'},
        {"max-length", required_argument, 0, OPT_MAX_LENGTH},
        {"batch-tokens", required_argument, 0, OPT_BATCH_TOKENS},
        MOE_CLI_COMMON_OPTIONS,
        {0, 0, 0, 0}};
    const char *model = NULL, *dump = NULL, *out = "-";
    moe_dump_opts d = {0};
    int c;
    while ((c = getopt_long(argc, argv, ":m:d:o:", opts, NULL)) != -1) {
        if (moe_cli_handle(c, optarg)) continue;
        switch (c) {
        case 'm': model = optarg; break;
        case 'd': dump = optarg; break;
        case 'o': out = optarg; break;
        case OPT_MAX_LENGTH: d.max_length = (int)moe_cli_long("--max-length", optarg, 1, 1 << 30); break;
        case OPT_BATCH_TOKENS:
            d.batch_tokens = (size_t)moe_cli_long("--batch-tokens", optarg, 1, 1L << 40);
            break;
        case ':': moe_cli_usage("option '%s' needs a value", argv[optind - 1]);
        default: moe_cli_usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (!model) moe_cli_usage("--model DIR is required");
    if (!dump) moe_cli_usage("--dump LIST is required (this version only dumps)");
    if (moe_dump_parse_what(dump, &d) < 0) moe_cli_usage("%s", moe_error());
    if (argc - optind > 1) moe_cli_usage("one TOKENS stream at most");
    const char *in = optind < argc ? argv[optind] : "-";

    moe_model_set_threads(moe_cli.threads);
    moe_model_opts mo = {.device = moe_cli.device};
    moe_model *m = moe_model_open(model, &mo);
    if (!m) moe_cli_fail();
    moe_reader *r = moe_reader_open(in);
    if (!r) moe_cli_fail();
    if (moe_reader_require_kind(r, "tokens", "make one with moe-tokenize") < 0) moe_cli_fail();
    if (moe_reader_check_model(r, moe_model_fingerprint(m), moe_cli.force) < 0) moe_cli_fail();
    moe_provenance prov = {.tool = "moe-eval", .argc = argc, .argv = argv,
                           .model = moe_model_fingerprint(m), .kind = "dump"};
    moe_writer *w = moe_writer_open(out, moe_reader_header(r), &prov, moe_cli.no_provenance);
    if (!w) moe_cli_fail();
    if (moe_eval_dump(m, r, w, &d) < 0) {
        moe_writer_abort(w);
        moe_cli_fail();
    }
    if (moe_writer_close(w) < 0) moe_cli_fail();
    moe_reader_close(r);
    moe_model_close(m);
    return 0;
}
