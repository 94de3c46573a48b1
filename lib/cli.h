/* cli.h - what every tool's main shares: program name, common options,
 * usage errors and the mapping from library errors to exit codes.
 * (Only tools include this; the library proper never exits.) */
#ifndef MOE_CLI_H
#define MOE_CLI_H

#include <getopt.h>
#include "common.h"

/* Long options every tool accepts; put MOE_CLI_COMMON_OPTIONS at the end of
 * the tool's option table (before the terminating zero entry). */
enum {
    MOE_OPT_HELP = 0x1000, MOE_OPT_VERSION, MOE_OPT_QUIET, MOE_OPT_THREADS,
    MOE_OPT_DEVICE, MOE_OPT_SEED, MOE_OPT_FORCE, MOE_OPT_NO_PROVENANCE,
};
#define MOE_CLI_COMMON_OPTIONS                                         \
    {"help", no_argument, 0, MOE_OPT_HELP},                            \
    {"version", no_argument, 0, MOE_OPT_VERSION},                      \
    {"quiet", no_argument, 0, MOE_OPT_QUIET},                          \
    {"threads", required_argument, 0, MOE_OPT_THREADS},                \
    {"device", required_argument, 0, MOE_OPT_DEVICE},                  \
    {"seed", required_argument, 0, MOE_OPT_SEED},                      \
    {"force", no_argument, 0, MOE_OPT_FORCE},                          \
    {"no-provenance", no_argument, 0, MOE_OPT_NO_PROVENANCE}

/* Values of the common options after parsing. */
typedef struct {
    int threads;        /* 0 = all cores */
    const char *device; /* "cpu", "cuda" or NULL (= default) */
    uint64_t seed;
    int force;
    int no_provenance;
} moe_cli_common;
extern moe_cli_common moe_cli;

/* Text printed after the tool's own help for the common options. */
extern const char moe_cli_common_help[];

/* Call first in main: records the name, installs the handlers that remove
 * temporary outputs on signals and at exit, sets SIGPIPE handling. */
void moe_cli_init(const char *name, const char *help, int argc, char **argv);
const char *moe_cli_name(void);
/* Handle a common option returned by getopt_long; returns 1 if handled.
 * --help prints the help text to stdout and exits 0; --version likewise;
 * '?' (unknown option) and ':' (missing value) are usage errors (exit 2).
 * Use ":..." at the start of the short-option string so ':' is reported. */
int moe_cli_handle(int opt, const char *arg);
/* "tool: message" + "Try 'tool --help'." on stderr, exit 2. */
_Noreturn void moe_cli_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "tool: <moe_error()>" on stderr, exit with the code for its kind. */
_Noreturn void moe_cli_fail(void);
/* The same for an error about what `file` holds ("-" = "<stdin>"): the
 * message is prefixed with the file's name unless it names it already (the
 * library reports some such errors without knowing the file). */
_Noreturn void moe_cli_fail_in(const char *file);
/* Warning line on stderr ("tool: warning: ..."), silenced by nothing. */
void moe_cli_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Parse helpers for option values; bad values are usage errors. */
long moe_cli_long(const char *opt, const char *arg, long min, long max);
double moe_cli_double(const char *opt, const char *arg);

#endif
