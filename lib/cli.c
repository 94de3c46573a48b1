/* cli.c - shared command-line behaviour of every tool. */
#define _GNU_SOURCE
#include "cli.h"
#include "device.h"
#include "kernels.h"
#include "model.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

moe_cli_common moe_cli;
static const char *tool_help = "";
static unsigned tool_takes;
static char **tool_argv;

/* The common options, each with the MOE_CLI_TAKES_* bit a tool declares to
 * take it (0: every tool) and its line of --help. */
static const struct {
    int opt;
    unsigned bit;
    const char *name, *help;
} common_opts[] = {
    {MOE_OPT_THREADS, MOE_CLI_TAKES_THREADS, "--threads",
     "  --threads N        worker threads (default: all cores; results do not depend on it)\n"},
    {MOE_OPT_DEVICE, MOE_CLI_TAKES_DEVICE, "--device",
     "  --device cpu|cuda  compute device (default: cuda when available)\n"},
    {MOE_OPT_PRECISION, MOE_CLI_TAKES_DEVICE, "--precision",
     "  --precision f32|bf16  products in float32, or BF16 inputs summed in float32\n"
     "                     (default: f32 on the CPU, bf16 on CUDA)\n"},
    {MOE_OPT_SEED, MOE_CLI_TAKES_SEED, "--seed", "  --seed N           random seed (default 0)\n"},
    {MOE_OPT_FORCE, MOE_CLI_TAKES_FORCE, "--force",
     "  --force            overwrite outputs / accept a stream made with another model\n"},
    {MOE_OPT_NO_PROVENANCE, MOE_CLI_TAKES_NO_PROVENANCE, "--no-provenance",
     "  --no-provenance    do not append this command to the stream header\n"},
    {MOE_OPT_QUIET, MOE_CLI_TAKES_QUIET, "--quiet", "  --quiet            no progress on stderr\n"},
    {MOE_OPT_HELP, 0, "--help", "  --help             show this help and exit\n"},
    {MOE_OPT_VERSION, 0, "--version", "  --version          show the version and exit\n"},
};
#define N_COMMON_OPTS (sizeof common_opts / sizeof *common_opts)

static void print_help(void) {
    fputs(tool_help, stdout);
    fputs("\nCommon options:\n", stdout);
    for (size_t i = 0; i < N_COMMON_OPTS; i++)
        if (!common_opts[i].bit || (tool_takes & common_opts[i].bit)) fputs(common_opts[i].help, stdout);
    fputs("\nExit status: 0 success, 1 bad data, 2 usage error, 3 I/O error, 4 device error.\n", stdout);
}

/* A common option the tool did not declare is a usage error. */
static void check_taken(int opt) {
    for (size_t i = 0; i < N_COMMON_OPTS; i++)
        if (common_opts[i].opt == opt && common_opts[i].bit && !(tool_takes & common_opts[i].bit))
            moe_cli_usage("option '%s' is not used by %s", common_opts[i].name, moe_program_name());
}

static void on_signal(int sig) {
    moe_tmp_cleanup_all();
    signal(sig, SIG_DFL);
    raise(sig);
}

static void at_exit(void) { moe_tmp_cleanup_all(); }

void moe_cli_init(const char *name, const char *help, unsigned takes, int argc, char **argv) {
    (void)argc;
    tool_argv = argv;
    opterr = 0; /* we report unknown options ourselves, in one line */
    moe_set_program_name(name);
    tool_help = help;
    tool_takes = takes;
    atexit(at_exit);
    /* SIGPIPE: die quietly like cat(1) does (no "broken pipe" noise), but
     * remove half-written temporary outputs first. */
    int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGPIPE};
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) signal(sigs[i], on_signal);
}

int moe_cli_handle(int opt, const char *arg) {
    check_taken(opt);
    switch (opt) {
    case MOE_OPT_HELP:
        print_help();
        exit(fflush(stdout) == 0 ? 0 : MOE_EXIT_IO);
    case MOE_OPT_VERSION:
        printf("%s (cdmoe) %s\nbackends: cpu%s\n", moe_program_name(), MOE_VERSION,
               moe_device_cuda_built() ? ", cuda" : "");
        exit(0);
    case MOE_OPT_QUIET: moe_quiet = 1; return 1;
    case MOE_OPT_THREADS:
        /* the one place the thread count is applied: OpenMP (every parallel
         * loop of the library and the tools) and the kernels' BLAS policy */
        moe_cli.threads = (int)moe_cli_long("--threads", arg, 1, 4096);
        moe_kernels_set_threads(moe_cli.threads);
        return 1;
    case MOE_OPT_DEVICE:
        if (strcmp(arg, "cpu") != 0 && strcmp(arg, "cuda") != 0)
            moe_cli_usage("--device: expected cpu or cuda, got '%s'", arg);
        moe_cli.device = arg;
        return 1;
    case MOE_OPT_PRECISION:
        moe_cli.precision = moe_precision_parse(arg);
        if (moe_cli.precision < 0) moe_cli_usage("--precision: expected f32 or bf16, got '%s'", arg);
        return 1;
    case MOE_OPT_SEED: {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(arg, &end, 10);
        if (errno || end == arg || *end) moe_cli_usage("--seed: not a number: '%s'", arg);
        moe_cli.seed = v;
        return 1;
    }
    case MOE_OPT_FORCE: moe_cli.force = 1; return 1;
    case MOE_OPT_NO_PROVENANCE: moe_cli.no_provenance = 1; return 1;
    case '?':
        if (optopt) moe_cli_usage("unknown option '-%c'", optopt);
        moe_cli_usage("unknown option '%s'", tool_argv[optind - 1]);
    case ':': moe_cli_usage("option '%s' needs a value", tool_argv[optind - 1]);
    default: return 0;
    }
}

void moe_cli_usage(const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "%s: ", moe_program_name());
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry '%s --help' for more information.\n", moe_program_name());
    exit(MOE_EXIT_USAGE);
}

void moe_cli_fail(void) {
    const char *msg = moe_error();
    fprintf(stderr, "%s: %s\n", moe_program_name(), *msg ? msg : "failed");
    int kind = moe_error_kind();
    exit(kind == MOE_ERR_IO ? MOE_EXIT_IO : kind == MOE_ERR_DEVICE ? MOE_EXIT_DEVICE : MOE_EXIT_DATA);
}

void moe_cli_flush_stdout(void) {
    errno = 0;
    if (fflush(stdout) != 0 || ferror(stdout)) {
        moe_error_set(MOE_ERR_IO, "<stdout>: write error: %s", strerror(errno ? errno : EIO));
        moe_cli_fail();
    }
}

void moe_cli_fail_in(const char *file) {
    const char *name = strcmp(file, "-") ? file : "<stdin>";
    int kind = moe_error_kind() ? moe_error_kind() : MOE_ERR_DATA;
    /* an I/O or device error names what failed itself */
    if (kind == MOE_ERR_DATA && !strstr(moe_error(), name))
        moe_error_set(kind, "%s: %s", name, *moe_error() ? moe_error() : "failed");
    moe_cli_fail();
}

long moe_cli_long(const char *opt, const char *arg, long min, long max) {
    char *end;
    errno = 0;
    long v = strtol(arg, &end, 10);
    if (errno || end == arg || *end) moe_cli_usage("%s: not an integer: '%s'", opt, arg);
    if (v < min || v > max) moe_cli_usage("%s: %ld is out of range [%ld, %ld]", opt, v, min, max);
    return v;
}

double moe_cli_double(const char *opt, const char *arg) {
    char *end;
    errno = 0;
    double v = strtod(arg, &end);
    if (errno || end == arg || *end) moe_cli_usage("%s: not a number: '%s'", opt, arg);
    return v;
}
