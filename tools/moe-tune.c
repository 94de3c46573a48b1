/* moe-tune - fine-tune a condensed model (CD-MoE step 5), or train any
 * weights of a model: the command line and progress; the run is lib/tune.c. */
#include "cli.h"
#include "tune.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char help[] =
    "Usage: moe-tune --model DIR -o OUT --data FILE [OPTIONS]\n"
    "Train the shared and kept routed experts of a condensed model's condensed\n"
    "layers (everything else frozen) with AdamW, and write the tuned checkpoint\n"
    "to directory OUT, with the training log OUT/tune.msgpack.zst (kind tune).\n"
    "\n"
    "  --model DIR         the model to tune (Hugging Face layout)\n"
    "  -o, --output OUT    output directory (refused if it exists, unless --force)\n"
    "  --data FILE         training data: JSON Lines of {\"text\"} (loss on every\n"
    "                      token), {\"prompt\",\"response\"} (loss on the response),\n"
    "                      {\"turns\":[{\"role\",\"content\"}...]} (loss on assistant\n"
    "                      turns), {\"ids\":[...]} (token ids, loss on every token);\n"
    "                      the original's {\"instances\":[...]} JSON; or a\n"
    "                      token stream from moe-tokenize\n"
    "  --sft FILE          a second stage on this data, after --data (as the original's\n"
    "                      LM then SFT stages), with its own optimizer and schedule\n"
    "  --train SET         condensed (default): the condensed layers' experts;\n"
    "                      all: every weight, plus the load-balancing loss;\n"
    "                      L1,L2,...: the MLP weights of these layers\n"
    "  --train-weights     also train the condensed layers' fixed expert weights\n"
    "  --epochs E          passes over the data per stage (default 1)\n"
    "  --steps N           N optimizer steps per stage instead of epochs\n"
    "  --lr LR             peak learning rate (default 1e-5)\n"
    "  --min-lr LR         learning-rate floor reached at the last step (default 5e-6)\n"
    "  --warmup W          linear warm-up: a ratio of the steps if < 1, else steps\n"
    "                      (default 0.1)\n"
    "  --batch B           sequences per micro-batch (default 8)\n"
    "  --accum A           micro-batches per optimizer step (default 1)\n"
    "  --max-length T      cut every sequence to T tokens (default 256; 0: no limit)\n"
    "  --clip C            clip the global gradient norm to C (default 1; 0: no clipping)\n"
    "  --weight-decay WD   AdamW weight decay of matrices (default 0.01)\n"
    "  --aux-coef C        --train all: load-balancing loss coefficient (default: the\n"
    "                      config's)\n"
    "  --no-shuffle        keep the data's order (default: shuffled per epoch, --seed)\n"
    "  --val FILE          held-out data (same formats): its loss every --val-every\n"
    "                      steps and at the end of each stage\n"
    "  --val-every N       validation interval in steps\n"
    "  --recompute         keep only each layer's input; recompute its forward in the\n"
    "                      backward (less memory, about a third more time)\n"
    "  --log FILE          also write the log stream to FILE ('-': standard output)\n"
    "  --save-every N      write OUT with its resume state every N steps\n"
    "  --stop-after N      stop after global step N, writing OUT with its resume state\n"
    "  --save-state        keep the resume state in the final OUT too\n"
    "  --resume DIR        continue the run saved in DIR (same options and data; -o\n"
    "                      defaults to DIR): the result is the uninterrupted run's\n"
    "  -q                  the same as --quiet\n";

enum {
    OPT_MODEL = 1, OPT_DATA, OPT_SFT, OPT_TRAIN, OPT_TRAIN_WEIGHTS, OPT_EPOCHS, OPT_STEPS, OPT_LR, OPT_MIN_LR,
    OPT_WARMUP, OPT_BATCH, OPT_ACCUM, OPT_MAXLEN, OPT_CLIP, OPT_WD, OPT_AUX, OPT_NO_SHUFFLE, OPT_VAL,
    OPT_VAL_EVERY, OPT_RECOMPUTE, OPT_LOG, OPT_SAVE_EVERY, OPT_STOP_AFTER, OPT_SAVE_STATE, OPT_RESUME,
};

static const struct option options[] = {
    {"model", required_argument, 0, OPT_MODEL},       {"output", required_argument, 0, 'o'},
    {"data", required_argument, 0, OPT_DATA},         {"sft", required_argument, 0, OPT_SFT},
    {"train", required_argument, 0, OPT_TRAIN},       {"train-weights", no_argument, 0, OPT_TRAIN_WEIGHTS},
    {"epochs", required_argument, 0, OPT_EPOCHS},     {"steps", required_argument, 0, OPT_STEPS},
    {"lr", required_argument, 0, OPT_LR},             {"min-lr", required_argument, 0, OPT_MIN_LR},
    {"warmup", required_argument, 0, OPT_WARMUP},     {"batch", required_argument, 0, OPT_BATCH},
    {"accum", required_argument, 0, OPT_ACCUM},       {"max-length", required_argument, 0, OPT_MAXLEN},
    {"clip", required_argument, 0, OPT_CLIP},         {"weight-decay", required_argument, 0, OPT_WD},
    {"aux-coef", required_argument, 0, OPT_AUX},      {"no-shuffle", no_argument, 0, OPT_NO_SHUFFLE},
    {"val", required_argument, 0, OPT_VAL},           {"val-every", required_argument, 0, OPT_VAL_EVERY},
    {"recompute", no_argument, 0, OPT_RECOMPUTE},     {"log", required_argument, 0, OPT_LOG},
    {"save-every", required_argument, 0, OPT_SAVE_EVERY}, {"stop-after", required_argument, 0, OPT_STOP_AFTER},
    {"save-state", no_argument, 0, OPT_SAVE_STATE},   {"resume", required_argument, 0, OPT_RESUME},
    MOE_CLI_COMMON_OPTIONS,                           {0, 0, 0, 0}};

/* --train: condensed, all, or a list of layer indices. */
static void parse_train(moe_train_opts *t, const char *arg) {
    static int layers[4096];
    if (strcmp(arg, "condensed") == 0) t->set = MOE_TRAIN_CONDENSED;
    else if (strcmp(arg, "all") == 0) t->set = MOE_TRAIN_ALL;
    else {
        t->set = MOE_TRAIN_LAYERS;
        t->nlayers = 0;
        for (const char *p = arg; *p;) {
            char *end;
            errno = 0;
            long l = strtol(p, &end, 10);
            if (end == p || errno || l < 0 || l > INT_MAX || (*end && *end != ',') || t->nlayers == 4096)
                moe_cli_usage("--train: expected condensed, all or layer indices L1,L2,...: '%s'", arg);
            layers[t->nlayers++] = (int)l;
            p = *end ? end + 1 : end;
        }
        t->layers = layers;
    }
}

static double positive(const char *opt, const char *arg, int zero_ok) {
    double v = moe_cli_double(opt, arg);
    if (!(v > 0 || (zero_ok && v == 0))) moe_cli_usage("%s: must be %s: '%s'", opt, zero_ok ? ">= 0" : "> 0", arg);
    return v;
}

static void parse_option(moe_tune_opts *o, int c, const char *arg) {
    switch (c) {
    case OPT_MODEL: o->model_dir = arg; break;
    case 'o': o->out_dir = arg; break;
    case 'q': moe_cli_handle(MOE_OPT_QUIET, NULL); break;
    case OPT_DATA: o->data = arg; break;
    case OPT_SFT: o->sft = arg; break;
    case OPT_TRAIN: parse_train(&o->train, arg); break;
    case OPT_TRAIN_WEIGHTS: o->train.train_weights = 1; break;
    case OPT_EPOCHS: o->epochs = moe_cli_long("--epochs", arg, 1, 1000000); break;
    case OPT_STEPS: o->steps = moe_cli_long("--steps", arg, 1, 1L << 40); break;
    case OPT_LR: o->optim.lr = positive("--lr", arg, 0); break;
    case OPT_MIN_LR: o->optim.lr_min = positive("--min-lr", arg, 1); break;
    case OPT_WARMUP: o->optim.warmup = positive("--warmup", arg, 1); break;
    case OPT_BATCH: o->batch = (int)moe_cli_long("--batch", arg, 1, 1 << 20); break;
    case OPT_ACCUM: o->accum = (int)moe_cli_long("--accum", arg, 1, 1 << 20); break;
    case OPT_MAXLEN: o->max_length = (int)moe_cli_long("--max-length", arg, 0, INT_MAX); break;
    case OPT_CLIP: o->optim.clip = positive("--clip", arg, 1); break;
    case OPT_WD: o->optim.weight_decay = positive("--weight-decay", arg, 1); break;
    case OPT_AUX: o->train.aux_coef = positive("--aux-coef", arg, 1); break;
    case OPT_NO_SHUFFLE: o->shuffle = 0; break;
    case OPT_VAL: o->val = arg; break;
    case OPT_VAL_EVERY: o->val_every = moe_cli_long("--val-every", arg, 1, 1L << 40); break;
    case OPT_RECOMPUTE: o->train.recompute = 1; break;
    case OPT_LOG: o->log = arg; break;
    case OPT_SAVE_EVERY: o->save_every = moe_cli_long("--save-every", arg, 1, 1L << 40); break;
    case OPT_STOP_AFTER: o->stop_after = moe_cli_long("--stop-after", arg, 1, 1L << 40); break;
    case OPT_SAVE_STATE: o->save_state = 1; break;
    case OPT_RESUME: o->resume = arg; break;
    default: moe_cli_usage("unknown option");
    }
}

/* The same directory (an output that would replace the model it reads). */
static int same_dir(const char *a, const char *b) {
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* The log is written at the end: refuse now what would fail then. */
static void check_log(const char *log) {
    if (!log) return;
    if (!strcmp(log, "-")) {
        if (isatty(1)) {
            moe_error_set(MOE_ERR_IO, "<stdout>: refusing to write a binary stream to a terminal (redirect it "
                                      "to a file or a pipe)");
            moe_cli_fail();
        }
        return;
    }
    char dir[4096];
    const char *slash = strrchr(log, '/');
    snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - log) + 1 : 1, slash ? log : ".");
    if (access(dir, W_OK) != 0) {
        moe_error_set(MOE_ERR_IO, "%s: %s", log, strerror(errno));
        moe_cli_fail();
    }
}

static void check_options(moe_tune_opts *o, int epochs_given) {
    if (!o->model_dir) moe_cli_usage("--model DIR is required");
    if (!o->data) moe_cli_usage("--data FILE is required");
    if (o->resume && !o->out_dir) o->out_dir = o->resume;
    if (!o->out_dir) moe_cli_usage("-o OUT is required");
    if (epochs_given && o->steps) moe_cli_usage("--epochs and --steps: give one of them");
    if (o->val_every && !o->val) moe_cli_usage("--val-every needs --val FILE");
    if (o->sft && !strcmp(o->sft, "-") && !strcmp(o->data, "-")) moe_cli_usage("--data and --sft both read standard input");
    if (o->optim.lr_min > o->optim.lr) moe_cli_usage("--min-lr %g is above --lr %g", o->optim.lr_min, o->optim.lr);
    if (o->train.train_weights && o->train.set != MOE_TRAIN_CONDENSED)
        moe_cli_usage("--train-weights trains the condensed layers' weights: it goes with --train condensed");
    if (same_dir(o->out_dir, o->model_dir)) moe_cli_usage("-o %s: that is the model being read", o->out_dir);
    check_log(o->log);
    if (access(o->out_dir, F_OK) == 0 && !moe_cli.force && !(o->resume && same_dir(o->out_dir, o->resume))) {
        moe_error_set(MOE_ERR_IO, "%s: exists (use --force to replace it%s)", o->out_dir,
                      o->resume ? "" : ", or --resume to continue the run saved there");
        moe_cli_fail();
    }
}

/* Progress on a terminal: step, loss, lr, tokens/s, ETA. */
typedef struct {
    int enabled;
    double t0;
    long done;
} progress;

static void show_progress(void *ctx, const moe_tune_step *s, long k, long n) {
    progress *p = ctx;
    if (!p->enabled) return;
    double el = moe_now() - p->t0, eta = ++p->done > 0 ? el / (double)p->done * (double)(n - k) : 0;
    fprintf(stderr, "\rmoe-tune: stage %d step %ld/%ld  loss %.4f  lr %.3g  %.0f tok/s  ETA %d:%02d\033[K", s->stage,
            k, n, s->loss, s->lr, s->tokens_per_s, (int)eta / 60, (int)eta % 60);
    if (k == n) fprintf(stderr, "\n");
}

/* OpenMP threads that wait for work sleep (OMP_WAIT_POLICY=passive) unless
 * the user says otherwise: libgomp's default spins first, and on a machine
 * shared with other work the spinning threads take the cores from the ones
 * that compute -- bench/tune.sh's model trained 2-3x slower unset, and 3-4x
 * with "active", than passive.  A training step's parallel regions are few
 * and long, so waking sleeping threads costs little.  libgomp
 * reads the variable when it is loaded, before main: hence .preinit_array,
 * which runs before the shared libraries' initialisers.  Results are the
 * same bytes whatever the policy. */
static void omp_wait_passive(void) { setenv("OMP_WAIT_POLICY", "passive", 0); }
__attribute__((section(".preinit_array"), used)) static void (*const preinit_omp_wait)(void) =
    omp_wait_passive;

int main(int argc, char **argv) {
    moe_cli_init("moe-tune", help,
                 MOE_CLI_TAKES_THREADS | MOE_CLI_TAKES_DEVICE | MOE_CLI_TAKES_SEED | MOE_CLI_TAKES_FORCE |
                     MOE_CLI_TAKES_NO_PROVENANCE | MOE_CLI_TAKES_QUIET,
                 argc, argv);
    moe_tune_opts o;
    moe_tune_defaults(&o);
    o.optim.lr_min = 5e-6;
    o.optim.warmup = 0.1;
    int c, epochs_given = 0;
    while ((c = getopt_long(argc, argv, ":o:q", options, NULL)) != -1) {
        if (moe_cli_handle(c, optarg)) continue;
        epochs_given |= c == OPT_EPOCHS;
        parse_option(&o, c, optarg);
    }
    if (optind < argc) moe_cli_usage("unexpected argument '%s'", argv[optind]);
    check_options(&o, epochs_given);
    o.device = moe_cli.device;
    o.precision = moe_cli.precision;
    o.seed = moe_cli.seed;
    o.force = moe_cli.force;
    o.no_provenance = moe_cli.no_provenance;
    o.argc = argc;
    o.argv = argv;
    progress p = {.enabled = !moe_quiet && isatty(2), .t0 = moe_now()};
    o.progress = show_progress;
    o.progress_ctx = &p;
    moe_tune_summary sum;
    if (moe_tune_run(&o, &sum) < 0) moe_cli_fail();
    FILE *report = o.log && !strcmp(o.log, "-") ? stderr : stdout; /* the log may be on stdout */
    fprintf(report, "steps %ld", sum.steps);
    if (sum.steps) fprintf(report, "  loss %.6g -> %.6g", sum.first_loss, sum.last_loss);
    if (sum.nval > 1) fprintf(report, "  val loss %.6g -> %.6g", sum.first_val, sum.last_val);
    if (sum.nval == 1) fprintf(report, "  val loss %.6g", sum.last_val);
    if (sum.nval) fprintf(report, " (ppl %.6g)", exp(sum.last_val));
    fprintf(report, "%s\n", sum.stopped ? "  (stopped: continue with --resume)" : "");
    moe_cli_flush_stdout();
    return 0;
}
