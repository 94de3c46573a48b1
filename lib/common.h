/* common.h - errors, exit codes, memory, temporary outputs, progress.
 *
 * The library never prints to stdout and never calls exit(): a failing
 * function records one line with moe_error_set() and returns a failure value
 * (NULL, or a negative int).  Tools read it back with moe_error() and print
 * "tool: message" once, then exit with one of the documented codes below. */
#ifndef MOE_COMMON_H
#define MOE_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define MOE_VERSION "0.1.0"

/* Exit codes shared by every tool (documented in each man page). */
enum {
    MOE_EXIT_OK = 0,
    MOE_EXIT_DATA = 1,   /* bad input data, or the computation failed */
    MOE_EXIT_USAGE = 2,  /* bad command line */
    MOE_EXIT_IO = 3,     /* cannot open, read or write a file */
    MOE_EXIT_DEVICE = 4, /* GPU missing or failing */
};

/* Error kinds, so that a tool can map a failure to its exit code. */
enum { MOE_ERR_DATA = 1, MOE_ERR_IO = 3, MOE_ERR_DEVICE = 4 };

/* Record the current error (printf-style, one line, no trailing newline).
 * The message should name the file and the problem, e.g.
 *   "calib.msgpack.zst: truncated stream (no end record)". */
void moe_error_set(int kind, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *moe_error(void);   /* last message, "" if none */
int moe_error_kind(void);      /* MOE_ERR_*, 0 if none */
void moe_error_clear(void);

/* The program's name ("moe-calib"; set by moe_cli_init, "moe" until then):
 * the prefix of every line the library writes to stderr. */
void moe_set_program_name(const char *name);
const char *moe_program_name(void);

/* A warning: "PROGRAM: warning: message" on stderr, silenced by nothing
 * (the one way the library and the tools warn). */
void moe_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Allocation that never returns NULL: out of memory ends the tool with
 * "PROGRAM: out of memory (allocating N bytes)" and exit status 1 (never an
 * abort).  Sizes that come from input are checked before they get here. */
void *moe_malloc(size_t n);
void *moe_calloc(size_t n, size_t size);
void *moe_realloc(void *p, size_t n);
char *moe_strdup(const char *s);

/* A whole file, NUL-terminated (the terminator not counted in *len);
 * NULL with an I/O error naming the file. */
char *moe_read_file(const char *path, size_t *len);

/* Temporary outputs: every file or directory a tool is writing lives under a
 * temporary name that is registered here; moe_tmp_commit() renames it to its
 * final name.  If the process exits early (error, SIGINT, SIGTERM, SIGPIPE,
 * SIGHUP), whatever is still registered is removed, so no half-written
 * output is ever left behind. */
/* "dir/.name.tmp.PID.N", malloc'd.  Also removes temporary outputs for the
 * same name left by dead processes (a SIGKILL cannot be cleaned up after). */
char *moe_tmp_path(const char *final_path);
void moe_tmp_register(const char *tmp_path);    /* file or directory */
int moe_tmp_commit(const char *tmp_path, const char *final_path);
void moe_tmp_discard(const char *tmp_path);     /* remove now and unregister */
void moe_tmp_cleanup_all(void);                 /* called at exit and on signals */

/* Where an output named on the command line really goes.  Symbolic links
 * are followed to the file they name (which may not exist yet), so that the
 * link stays and its target is replaced.  *direct is set when that target
 * exists and is not a regular file or directory -- a FIFO, /dev/null, a
 * terminal: such a target is written in place (as cp does), never renamed
 * over.  Returns the resolved path (malloc'd), or NULL with an I/O error. */
char *moe_output_target(const char *path, int *direct);

/* An output file being written: a regular file under a temporary name beside
 * its final one (renamed by moe_output_close), or a special file written
 * directly (see moe_output_target), or standard output for "-". */
typedef struct {
    int fd;
    char *name;       /* for messages: the path as given, or "<stdout>" */
    char *final_path; /* the resolved target, when written under tmp_path */
    char *tmp_path;   /* NULL when written directly */
    FILE *fp;         /* set by moe_output_stdio */
} moe_output;
/* 0, or -1 with an I/O error naming the file. */
int moe_output_open(moe_output *o, const char *path);
/* The output as a stdio stream (stdout for "-"); NULL with an error. */
FILE *moe_output_stdio(moe_output *o);
/* With ok: flush (the stdio stream too) to disk, close and rename into place; 0 or -1 (error set,
 * the temporary removed).  Without ok: discard, return -1.  Frees o's strings. */
int moe_output_close(moe_output *o, int ok);

/* Progress on stderr, only when stderr is a terminal and not quiet:
 * "label: done/total unit (rate/s, ETA mm:ss)", redrawn at most ~5 times/s. */
typedef struct moe_progress {
    const char *label, *unit;
    uint64_t total, done;
    double t_start, t_last;
    int enabled;
} moe_progress;
void moe_progress_start(moe_progress *p, const char *label, const char *unit, uint64_t total);
void moe_progress_add(moe_progress *p, uint64_t n);
void moe_progress_end(moe_progress *p);
extern int moe_quiet; /* set by --quiet */

double moe_now(void); /* monotonic seconds */

#endif
