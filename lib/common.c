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

/* ---- program name and warnings -------------------------------------------- */

static const char *program_name = "moe";

void moe_set_program_name(const char *name) { program_name = name; }
const char *moe_program_name(void) { return program_name; }

void moe_warn(const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "%s: warning: ", program_name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* ---- memory ------------------------------------------------------------- */

/* Out of memory ends the tool with a one-line message and exit status 1,
 * never an abort (a core dump and status 134 look like a crash); exit()
 * runs the atexit handler that removes temporary outputs.  Callers that
 * size an allocation from input check the size first and name the file. */
static void out_of_memory(size_t n) {
    fprintf(stderr, "%s: out of memory (allocating %zu bytes)\n", program_name, n);
    exit(MOE_EXIT_DATA);
}

void *moe_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) out_of_memory(n);
    return p;
}

void *moe_calloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    size_t bytes;
    if (!p) out_of_memory(__builtin_mul_overflow(n, size, &bytes) ? SIZE_MAX : bytes);
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
    fprintf(stderr, "%s: too many temporary outputs open\n", program_name);
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

/* ---- outputs ------------------------------------------------------------ */

/* Follow symbolic links by hand (realpath needs the target to exist; a
 * dangling link names the file to create). */
char *moe_output_target(const char *path, int *direct) {
    /* The kernel's view first: /dev/stdout and /proc/self/fd/N are links
     * whose text ("pipe:[123]") is no path, but they open fine. */
    struct stat kst;
    if (stat(path, &kst) == 0 && !S_ISREG(kst.st_mode) && !S_ISDIR(kst.st_mode)) {
        *direct = 1;
        return moe_strdup(path);
    }
    char *p = moe_strdup(path);
    *direct = 0;
    for (int hops = 0;; hops++) {
        struct stat st;
        if (lstat(p, &st) != 0) {
            if (errno == ENOENT) return p; /* a new file */
            moe_error_set(MOE_ERR_IO, "%s: %s", path, strerror(errno));
            free(p);
            return NULL;
        }
        if (!S_ISLNK(st.st_mode)) {
            *direct = !S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode);
            return p;
        }
        char link[4096];
        ssize_t n = hops < 40 ? readlink(p, link, sizeof link - 1) : -1;
        if (n < 0) {
            moe_error_set(MOE_ERR_IO, "%s: %s", path, hops < 40 ? strerror(errno) : strerror(ELOOP));
            free(p);
            return NULL;
        }
        link[n] = 0;
        const char *slash = strrchr(p, '/');
        char *next;
        if (link[0] == '/' || !slash) next = moe_strdup(link);
        else { /* relative to the link's directory */
            size_t dirlen = (size_t)(slash - p + 1);
            next = moe_malloc(dirlen + (size_t)n + 1);
            memcpy(next, p, dirlen);
            memcpy(next + dirlen, link, (size_t)n + 1);
        }
        free(p);
        p = next;
    }
}

int moe_output_open(moe_output *o, const char *path) {
    memset(o, 0, sizeof *o);
    if (strcmp(path, "-") == 0) {
        o->fd = 1;
        o->name = moe_strdup("<stdout>");
        return 0;
    }
    int direct;
    char *target = moe_output_target(path, &direct);
    if (!target) return -1;
    struct stat st;
    int existed = !direct && stat(target, &st) == 0;
    if (existed && S_ISDIR(st.st_mode)) {
        moe_error_set(MOE_ERR_IO, "%s: is a directory", path);
        free(target);
        return -1;
    }
    if (direct) {
        o->fd = open(target, O_WRONLY | O_CLOEXEC);
        free(target);
    } else {
        o->final_path = target;
        o->tmp_path = moe_tmp_path(target);
        moe_tmp_register(o->tmp_path); /* before it exists: no window for a signal */
        o->fd = open(o->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (o->fd >= 0 && existed) fchmod(o->fd, st.st_mode & 07777); /* the replaced file's permissions */
    }
    if (o->fd < 0) {
        moe_error_set(MOE_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
        if (o->tmp_path) moe_tmp_discard(o->tmp_path);
        free(o->tmp_path);
        free(o->final_path);
        memset(o, 0, sizeof *o);
        return -1;
    }
    o->name = moe_strdup(path);
    return 0;
}

FILE *moe_output_stdio(moe_output *o) {
    if (!o->fp) o->fp = o->fd == 1 ? stdout : fdopen(o->fd, "w");
    if (!o->fp) moe_error_set(MOE_ERR_IO, "%s: %s", o->name, strerror(errno));
    return o->fp;
}

int moe_output_close(moe_output *o, int ok) {
    int rc = ok ? 0 : -1;
    if (o->fp && (fflush(o->fp) != 0 || ferror(o->fp)) && rc == 0) {
        moe_error_set(MOE_ERR_IO, "%s: write error: %s", o->name, strerror(errno));
        rc = -1;
    }
    /* fsync a file before it replaces the old one; a pipe or device cannot */
    if (rc == 0 && o->tmp_path && fsync(o->fd) != 0 && errno != EINVAL) {
        moe_error_set(MOE_ERR_IO, "%s: write error: %s", o->name, strerror(errno));
        rc = -1;
    }
    if (o->fd != 1 && (o->fp ? fclose(o->fp) : close(o->fd)) != 0 && rc == 0) {
        moe_error_set(MOE_ERR_IO, "%s: write error: %s", o->name, strerror(errno));
        rc = -1;
    }
    if (o->tmp_path) {
        if (rc == 0) rc = moe_tmp_commit(o->tmp_path, o->final_path);
        else moe_tmp_discard(o->tmp_path);
    }
    free(o->tmp_path);
    free(o->final_path);
    free(o->name);
    memset(o, 0, sizeof *o);
    return rc;
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
