/* cli.h - what every tool's main shares: program name, common options,
 * usage errors and the mapping from library errors to exit codes.
 * (Only tools include this; the library proper never exits.) */
#ifndef MOE_CLI_H
#define MOE_CLI_H

#include <getopt.h>
#include "common.h"

/* Long options shared by the tools; put MOE_CLI_COMMON_OPTIONS at the end of
 * the tool's option table (before the terminating zero entry).  getopt knows
 * them all, so that one a tool does not take (declared with MOE_CLI_TAKES_*
 * in moe_cli_init) is refused by name rather than reported as unknown. */
enum {
    MOE_OPT_HELP = 0x1000, MOE_OPT_VERSION, MOE_OPT_QUIET, MOE_OPT_THREADS,
    MOE_OPT_DEVICE, MOE_OPT_SEED, MOE_OPT_FORCE, MOE_OPT_NO_PROVENANCE, MOE_OPT_PRECISION,
};
#define MOE_CLI_COMMON_OPTIONS                                         \
    {"help", no_argument, 0, MOE_OPT_HELP},                            \
    {"version", no_argument, 0, MOE_OPT_VERSION},                      \
    {"quiet", no_argument, 0, MOE_OPT_QUIET},                          \
    {"threads", required_argument, 0, MOE_OPT_THREADS},                \
    {"device", required_argument, 0, MOE_OPT_DEVICE},                  \
    {"precision", required_argument, 0, MOE_OPT_PRECISION},            \
    {"seed", required_argument, 0, MOE_OPT_SEED},                      \
    {"force", no_argument, 0, MOE_OPT_FORCE},                          \
    {"no-provenance", no_argument, 0, MOE_OPT_NO_PROVENANCE}

/* The common options a tool takes, for moe_cli_init (--help and --version
 * always): a tool takes an option only if it acts on it, so that e.g.
 * `moe-dump --seed 9` is a usage error instead of a silent no-op. */
enum {
    MOE_CLI_TAKES_THREADS = 1 << 0,       /* it runs parallel work */
    MOE_CLI_TAKES_DEVICE = 1 << 1,        /* it runs a model (--device, --precision) */
    MOE_CLI_TAKES_SEED = 1 << 2,          /* it draws random numbers */
    MOE_CLI_TAKES_FORCE = 1 << 3,         /* it overwrites or checks a model */
    MOE_CLI_TAKES_NO_PROVENANCE = 1 << 4, /* it writes a stream */
    MOE_CLI_TAKES_QUIET = 1 << 5,         /* it shows progress */
};

/* Values of the common options after parsing. */
typedef struct {
    int threads;        /* 0 = all cores */
    const char *device; /* "cpu", "cuda" or NULL (= default) */
    int precision;      /* MOE_PRECISION_* (model.h); 0 = the device's default */
    uint64_t seed;
    int force;
    int no_provenance;
} moe_cli_common;
extern moe_cli_common moe_cli;

/* Call first in main: records the name (the prefix of every error and
 * warning, see moe_warn()) and the common options the tool takes
 * (MOE_CLI_TAKES_* ored), installs the handlers that remove temporary
 * outputs on signals and at exit, sets SIGPIPE handling. */
void moe_cli_init(const char *name, const char *help, unsigned takes, int argc, char **argv);
/* Handle a common option returned by getopt_long; returns 1 if handled.
 * --help prints the help text (the tool's, then the common options it
 * takes) to stdout and exits 0; --version likewise; --threads N sets the
 * worker threads of every parallel part of the library, here and only
 * here; a common option the tool does not take, '?' (unknown option) and
 * ':' (missing value) are usage errors (exit 2).  Use ":..." at the start of
 * the short-option string so ':' is reported. */
int moe_cli_handle(int opt, const char *arg);
/* "tool: message" + "Try 'tool --help'." on stderr, exit 2. */
_Noreturn void moe_cli_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "tool: <moe_error()>" on stderr, exit with the code for its kind. */
_Noreturn void moe_cli_fail(void);
/* Flush standard output; on a write error (a full disk, /dev/full) fail
 * with "<stdout>: write error: REASON" and exit 3. */
void moe_cli_flush_stdout(void);
/* The same for an error about what `file` holds ("-" = "<stdin>"): the
 * message is prefixed with the file's name unless it names it already (the
 * library reports some such errors without knowing the file). */
_Noreturn void moe_cli_fail_in(const char *file);
/* Parse helpers for option values; bad values are usage errors. */
long moe_cli_long(const char *opt, const char *arg, long min, long max);
double moe_cli_double(const char *opt, const char *arg);

#endif
