/* replay.c - a main for the fuzz targets without libFuzzer: runs
 * LLVMFuzzerTestOneInput once on each file named (a directory: on each file
 * in it), so that `make test` replays the committed crash inputs and the
 * seed corpora with any C compiler (and under `make SAN=1 test`, with the
 * sanitizers).  Exit 0 when every input returned. */
#include "fuzz.h"

#include <dirent.h>

static int replay_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return -1;
    }
    size_t cap = 1 << 16, n = 0, k;
    uint8_t *buf = malloc(cap);
    while (buf && (k = fread(buf + n, 1, cap - n, f)) > 0)
        if ((n += k) == cap) buf = realloc(buf, cap *= 2);
    fclose(f);
    if (!buf) return -1;
    /* an exact-size copy, so that reading past the input is caught as libFuzzer would */
    uint8_t *exact = malloc(n ? n : 1);
    memcpy(exact, buf, n);
    free(buf);
    LLVMFuzzerTestOneInput(exact, n);
    free(exact);
    return 0;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* the files of a directory in name order (a stable replay order) */
static int replay_dir(const char *dir, int *count) {
    DIR *d = opendir(dir);
    if (!d) return replay_file(dir) == 0 ? (++*count, 0) : -1;
    char **names = NULL;
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.' && strcmp(e->d_name, "README")) {
            names = realloc(names, (n + 1) * sizeof *names);
            names[n++] = strdup(e->d_name);
        }
    closedir(d);
    qsort(names, n, sizeof *names, cmp_str);
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (replay_file(path) < 0) rc = -1;
        else ++*count;
        free(names[i]);
    }
    free(names);
    return rc;
}

int main(int argc, char **argv) {
    int count = 0, rc = 0;
    for (int i = 1; i < argc; i++)
        if (replay_dir(argv[i], &count) < 0) rc = 1;
    printf("replayed %d inputs\n", count);
    return rc;
}
