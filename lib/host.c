/* host.c - peak RSS, machine memory, standard input spooled (see host.h). */
#define _GNU_SOURCE
#include "host.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

void moe_peak_rss_reset(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f); /* 5: reset the peak RSS (VmHWM) to the current RSS */
        fclose(f);
    }
}

double moe_peak_rss_mib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) kb = atof(line + 6);
    if (f) fclose(f);
    if (kb < 0) {
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        kb = (double)ru.ru_maxrss;
    }
    return kb / 1024.0;
}

double moe_ram_bytes(void) {
    long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGESIZE);
    return pages > 0 && page_size > 0 ? (double)pages * (double)page_size : 0;
}

char *moe_spool_stdin(const char *stem) {
    const char *dir = getenv("TMPDIR");
    char *base = NULL;
    if (asprintf(&base, "%s/%s", dir && *dir ? dir : "/tmp", stem) < 0) base = NULL;
    char *spool = moe_tmp_path(base ? base : stem);
    free(base);
    moe_tmp_register(spool);
    FILE *f = fopen(spool, "wb");
    if (!f) {
        moe_error_set(MOE_ERR_IO, "%s: %s", spool, strerror(errno));
        moe_tmp_discard(spool);
        free(spool);
        return NULL;
    }
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0)
        if (fwrite(buf, 1, n, f) != n) break;
    int failed = ferror(stdin);
    if (fclose(f) != 0) failed = 1;
    if (failed) {
        moe_error_set(MOE_ERR_IO, "<stdin>: cannot spool to %s", spool);
        moe_tmp_discard(spool);
        free(spool);
        return NULL;
    }
    return spool;
}

int moe_file_is_zstd(const char *path) {
    FILE *f = fopen(path, "rb");
    unsigned char b[4] = {0};
    if (!f) return 0;
    size_t n = fread(b, 1, 4, f);
    fclose(f);
    return n == 4 && b[0] == 0x28 && b[1] == 0xB5 && b[2] == 0x2F && b[3] == 0xFD;
}
