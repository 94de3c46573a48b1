/* testutil.h - what the cmocka unit tests share: a temporary directory,
 * paths in it, whole files written and read back (asserting each step), a
 * relative error.  Header only (static inline): each test binary is one .c
 * file, so the Makefile links nothing more. */
#ifndef MOE_TESTUTIL_H
#define MOE_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The temporary directory made by tu_setup_dir (a cmocka setup: per group or per test). */
static char tu_dir[256] __attribute__((unused));

/* The tests' random numbers: xorshift64, uniform in [-1, 1).  Each test file
 * keeps its own state (and seed), so its sequence does not depend on others. */
static inline float tu_frand(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return (float)((*s >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}
static inline float *tu_rand_vec(uint64_t *s, size_t n) {
    float *v = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = tu_frand(s);
    return v;
}

static inline int tu_setup_dir(void **state) {
    (void)state;
    snprintf(tu_dir, sizeof tu_dir, "/tmp/cdmoe-test.XXXXXX");
    return mkdtemp(tu_dir) ? 0 : -1;
}

/* cmocka teardown: removes tu_dir and all in it. */
static inline int tu_teardown_dir(void **state) {
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tu_dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* "DIR/NAME" in one of 8 static buffers used in turn (so that a few paths
 * can be held at once). */
static inline const char *tu_join(const char *dir, const char *name) {
    static char buf[8][1024];
    static unsigned next;
    char *p = buf[next++ % 8];
    snprintf(p, sizeof buf[0], "%s/%s", dir, name);
    return p;
}

/* NAME in tu_dir (tu_join's buffers). */
static inline const char *tu_path(const char *name) { return tu_join(tu_dir, name); }

/* Whether an entry of tu_dir has `part` in its name. */
static inline int tu_dir_has(const char *part) {
    DIR *d = opendir(tu_dir);
    assert_non_null(d);
    struct dirent *e;
    int found = 0;
    while (!found && (e = readdir(d))) found = strstr(e->d_name, part) != NULL;
    closedir(d);
    return found;
}

/* Write n bytes to path (created or truncated). */
static inline void tu_write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (n) assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static inline void tu_write_text(const char *path, const char *text) {
    tu_write_file(path, text, strlen(text));
}

/* The whole file (malloc'd, NUL-terminated; *n its size). */
static inline char *tu_read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    assert_true(len >= 0);
    fseek(f, 0, SEEK_SET);
    *n = (size_t)len;
    char *b = malloc(*n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, *n, f), *n);
    b[*n] = 0;
    fclose(f);
    return b;
}

/* ||a - ref|| / ||ref|| (||a - ref|| when ref is 0); infinite when a has a
 * NaN or infinity. */
static inline double tu_rel_err(const float *a, const float *ref, size_t n) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i])) return INFINITY;
        double e = (double)a[i] - ref[i];
        d += e * e;
        r += (double)ref[i] * ref[i];
    }
    return r > 0 ? sqrt(d / r) : sqrt(d);
}

#endif
