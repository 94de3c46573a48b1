/* common.c - error state, allocation, temporary outputs, progress. */
#define _GNU_SOURCE
#include "common.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- errors ------------------------------------------------------------- */

static __thread char error_msg[1024];
static __thread int error_kind;

void moe_error_set(int kind, const char *fmt, ...) {
    /* Formatted aside, then copied: a caller may pass moe_error() itself as
     * an argument to prefix the file and line, and vsnprintf into the buffer
     * it is reading garbles the message ("x: line 1: x: line 1: ded"). */
    char msg[sizeof error_msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    memcpy(error_msg, msg, sizeof msg);
    error_kind = kind;
}

const char *moe_error(void) { return error_msg; }
int moe_error_kind(void) { return error_kind; }
void moe_error_clear(void) { error_msg[0] = 0; error_kind = 0; }

/* ---- memory ------------------------------------------------------------- */

static void out_of_memory(size_t n) {
    fprintf(stderr, "out of memory (allocating %zu bytes)\n", n);
    abort();
}

void *moe_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) out_of_memory(n);
    return p;
}

void *moe_calloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) out_of_memory(n * size);
    return p;
}

void *moe_realloc(void *p, size_t n) {
    p = realloc(p, n ? n : 1);
    if (!p) out_of_memory(n);
    return p;
}

char *moe_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    return memcpy(moe_malloc(n), s, n);
}

/* ---- files -------------------------------------------------------------- */

char *moe_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        moe_error_set(MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0, k;
    char *buf = moe_malloc(cap + 1);
    while ((k = fread(buf + n, 1, cap - n, f)) > 0) {
        n += k;
        if (n == cap) buf = moe_realloc(buf, (cap *= 2) + 1);
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        moe_error_set(MOE_ERR_IO, "%s: read error", path);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

/* ---- temporary outputs -------------------------------------------------- */

/* A fixed table, so that the signal handler never allocates. */
#define MAX_TMP 64
static char *tmp_paths[MAX_TMP];
static volatile sig_atomic_t tmp_count_hint;

static void remove_path(const char *path);

/* Remove temporary outputs for final_path left by processes that no longer
 * exist (killed with SIGKILL, or the machine went down): ".NAME.tmp.PID.N". */
static void sweep_stale(const char *final_path) {
    const char *slash = strrchr(final_path, '/');
    char dir[4096];
    snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - final_path) : 1, slash ? final_path : ".");
    if (slash == final_path) snprintf(dir, sizeof dir, "/");
    const char *base = slash ? slash + 1 : final_path;
    char prefix[512];
    snprintf(prefix, sizeof prefix, ".%s.tmp.", base);
    size_t plen = strlen(prefix);
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, prefix, plen) != 0) continue;
        char *end;
        long pid = strtol(e->d_name + plen, &end, 10);
        if (end == e->d_name + plen || *end != '.' || pid <= 0) continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue; /* alive, or not ours to judge */
        char path[4600];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        remove_path(path);
    }
    closedir(d);
}

char *moe_tmp_path(const char *final_path) {
    static unsigned serial;
    sweep_stale(final_path);
    const char *slash = strrchr(final_path, '/');
    size_t dirlen = slash ? (size_t)(slash - final_path + 1) : 0;
    const char *base = final_path + dirlen;
    size_t n = strlen(final_path) + 64;
    char *p = moe_malloc(n);
    snprintf(p, n, "%.*s.%s.tmp.%ld.%u", (int)dirlen, final_path, base, (long)getpid(), serial++);
    return p;
}

void moe_tmp_register(const char *tmp_path) {
    for (int i = 0; i < MAX_TMP; i++)
        if (!tmp_paths[i]) {
            tmp_paths[i] = moe_strdup(tmp_path);
            tmp_count_hint = 1;
            return;
        }
    fprintf(stderr, "too many temporary outputs open\n");
    abort();
}

static void unregister(const char *tmp_path) {
    for (int i = 0; i < MAX_TMP; i++)
        if (tmp_paths[i] && strcmp(tmp_paths[i], tmp_path) == 0) {
            char *p = tmp_paths[i];
            tmp_paths[i] = NULL;
            free(p);
            return;
        }
}

/* Remove a file or a directory tree (a checkpoint being written) with
 * async-signal-safe calls only -- openat, getdents64, unlinkat, close, fixed
 * buffers on the stack -- because moe_tmp_cleanup_all runs in signal
 * handlers, where nftw/opendir could deadlock in malloc (a SIGTERM that landed
 * inside malloc did hang a test that way).  Depth is bounded: our outputs are
 * flat directories. */
struct linux_dirent64_hdr {
    uint64_t ino;
    int64_t off;
    unsigned short reclen;
    unsigned char type;
    char name[];
};

static void remove_at(int dirfd, const char *name, int depth) {
    if (unlinkat(dirfd, name, 0) == 0) return;
    if ((errno != EISDIR && errno != EPERM) || depth <= 0) return; /* gone, or not ours */
    for (int attempt = 0; attempt < 3; attempt++) { /* entries may move while we delete */
        int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) return;
        char buf[4096] __attribute__((aligned(8)));
        long n;
        while ((n = syscall(SYS_getdents64, fd, buf, sizeof buf)) > 0)
            for (long off = 0; off < n;) {
                struct linux_dirent64_hdr *e = (struct linux_dirent64_hdr *)(buf + off);
                off += e->reclen;
                if (e->name[0] == '.' && (!e->name[1] || (e->name[1] == '.' && !e->name[2])))
                    continue;
                remove_at(fd, e->name, depth - 1);
            }
        close(fd);
        if (unlinkat(dirfd, name, AT_REMOVEDIR) == 0 || errno != ENOTEMPTY) return;
    }
}

static void remove_path(const char *path) { remove_at(AT_FDCWD, path, 4); }

int moe_tmp_commit(const char *tmp_path, const char *final_path) {
    if (rename(tmp_path, final_path) != 0) {
        moe_error_set(MOE_ERR_IO, "%s: cannot rename into place: %s", final_path, strerror(errno));
        moe_tmp_discard(tmp_path);
        return -1;
    }
    unregister(tmp_path);
    return 0;
}

void moe_tmp_discard(const char *tmp_path) {
    remove_path(tmp_path);
    unregister(tmp_path);
}

/* Async-signal-safe (see remove_at): also called from signal handlers. */
void moe_tmp_cleanup_all(void) {
    if (!tmp_count_hint) return;
    for (int i = 0; i < MAX_TMP; i++) {
        const char *p = tmp_paths[i];
        if (p) remove_path(p);
    }
}

/* ---- progress ----------------------------------------------------------- */

int moe_quiet;

double moe_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void progress_draw(moe_progress *p, int final) {
    double el = moe_now() - p->t_start;
    double rate = el > 0 ? p->done / el : 0;
    fprintf(stderr, "\r%s: %llu", p->label, (unsigned long long)p->done);
    if (p->total) fprintf(stderr, "/%llu", (unsigned long long)p->total);
    fprintf(stderr, " %s (%.1f/s", p->unit, rate);
    if (p->total && rate > 0 && !final) {
        double eta = (p->total - p->done) / rate;
        fprintf(stderr, ", ETA %d:%02d", (int)eta / 60, (int)eta % 60);
    }
    if (final) fprintf(stderr, ", %.1f s", el);
    fprintf(stderr, ")\033[K%s", final ? "\n" : "");
}

void moe_progress_start(moe_progress *p, const char *label, const char *unit, uint64_t total) {
    p->label = label;
    p->unit = unit;
    p->total = total;
    p->done = 0;
    p->t_start = p->t_last = moe_now();
    p->enabled = !moe_quiet && isatty(2);
}

void moe_progress_add(moe_progress *p, uint64_t n) {
    p->done += n;
    if (!p->enabled) return;
    double t = moe_now();
    if (t - p->t_last < 0.2) return;
    p->t_last = t;
    progress_draw(p, 0);
}

void moe_progress_end(moe_progress *p) {
    if (p->enabled) progress_draw(p, 1);
    p->enabled = 0;
}
