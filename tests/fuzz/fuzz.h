/* fuzz.h - shared by the fuzz targets tests/fuzz/fuzz_*.c.
 *
 * Each target is one LLVMFuzzerTestOneInput over one reader of untrusted
 * input.  `make fuzz` links it with libFuzzer (clang, -fsanitize=fuzzer,
 * address,undefined); `make all-tests` links it with replay.c instead, so
 * that `make test` replays the committed inputs (tests/fuzz/regressions/)
 * through the same function with any C compiler.
 *
 * The library reads files by name, so an input is handed over as a file:
 * a memfd rewritten for every input, named /proc/self/fd/N (no disk, and
 * mmap works on it as on a file).  Targets that need a model directory get
 * a real one in $TMPDIR (fuzz_dir), made once per process. */
#ifndef MOE_FUZZ_H
#define MOE_FUZZ_H

#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zstd.h>

#include "common.h"

#ifndef FUZZ_SRCDIR /* the repository root, for the fixtures (set by the Makefile) */
#define FUZZ_SRCDIR "."
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static inline void fuzz_die(const char *what) {
    perror(what);
    abort(); /* a broken harness, not a finding: say so loudly */
}

static inline void fuzz_write_all(int fd, const uint8_t *data, size_t size) {
    if (ftruncate(fd, 0) < 0) fuzz_die("fuzz: ftruncate");
    for (size_t off = 0; off < size;) {
        ssize_t k = pwrite(fd, data + off, size - off, (off_t)off);
        if (k <= 0) fuzz_die("fuzz: write");
        off += (size_t)k;
    }
}

/* The input as a file name (the same memfd each time; slot 0..3 for
 * targets that need several files at once). */
static inline const char *fuzz_file(int slot, const uint8_t *data, size_t size) {
    static int fds[4] = {-1, -1, -1, -1};
    static char names[4][64];
    if (fds[slot] < 0) {
        fds[slot] = memfd_create("fuzz-input", 0);
        if (fds[slot] < 0) fuzz_die("fuzz: memfd_create");
        snprintf(names[slot], sizeof names[slot], "/proc/self/fd/%d", fds[slot]);
    }
    fuzz_write_all(fds[slot], data, size);
    return names[slot];
}

/* A fixture's bytes (path relative to the repository root), read once. */
static inline char *fuzz_fixture(const char *rel, size_t *len) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", FUZZ_SRCDIR, rel);
    FILE *f = fopen(path, "rb");
    if (!f) fuzz_die(path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) fuzz_die(path);
    buf[n] = 0;
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* Write a file named `name` in directory dir. */
static inline void fuzz_put(const char *dir, const char *name, const void *data, size_t size) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f)) fuzz_die(path);
}

static char fuzz_dir_path[1024];
static inline void fuzz_dir_remove(void) {
    char cmd[1100];
    if (!fuzz_dir_path[0]) return;
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", fuzz_dir_path);
    if (system(cmd) != 0) fprintf(stderr, "fuzz: could not remove %s\n", fuzz_dir_path);
}

/* A private directory for this process, removed at exit. */
static inline const char *fuzz_dir(void) {
    if (!fuzz_dir_path[0]) {
        const char *tmp = getenv("TMPDIR");
        snprintf(fuzz_dir_path, sizeof fuzz_dir_path, "%s/cdmoe-fuzz.XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(fuzz_dir_path)) fuzz_die("fuzz: mkdtemp");
        atexit(fuzz_dir_remove);
    }
    return fuzz_dir_path;
}

/* A moe-stream file from the input: `compressed` 0 takes the bytes as the
 * decompressed msgpack and compresses them (so that mutations reach the
 * msgpack reader instead of failing zstd's checksum), 1 takes them as the
 * file itself (the zstd framing). */
static inline const char *fuzz_stream_file(int slot, const uint8_t *data, size_t size, int compressed) {
    if (compressed) return fuzz_file(slot, data, size);
    static void *buf;
    static size_t cap;
    static ZSTD_CCtx *cctx; /* one for the process: making one per input costs more than the reading */
    size_t need = ZSTD_compressBound(size);
    if (need > cap && !(buf = realloc(buf, cap = need))) fuzz_die("fuzz: realloc");
    if (!cctx && !(cctx = ZSTD_createCCtx())) fuzz_die("fuzz: ZSTD_createCCtx");
    size_t n = ZSTD_compressCCtx(cctx, buf, cap, data, size, 1);
    if (ZSTD_isError(n)) fuzz_die("fuzz: ZSTD_compress");
    return fuzz_file(slot, buf, n);
}

/* Split off the first byte as a selector (which reader, which format). */
static inline unsigned fuzz_selector(const uint8_t **data, size_t *size) {
    if (!*size) return 0;
    unsigned s = **data;
    (*data)++;
    (*size)--;
    return s;
}

#endif
