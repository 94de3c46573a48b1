/* host.h - what the tools ask of the host process: its peak resident memory
 * (for --bench), the machine's memory, and standard input spooled to a
 * temporary file (for input that is read more than once). */
#ifndef MOE_HOST_H
#define MOE_HOST_H

#include "common.h"

/* Restart the peak-RSS count (Linux: /proc/self/clear_refs; elsewhere a
 * no-op, the peak then counts from the start). */
void moe_peak_rss_reset(void);
/* Peak resident memory in MiB since the last reset (or the start). */
double moe_peak_rss_mib(void);
/* Physical memory in bytes, 0 if unknown. */
double moe_ram_bytes(void);

/* Copy standard input to a registered temporary file in $TMPDIR (or /tmp)
 * whose name starts with `stem`: the malloc'd path, to moe_tmp_discard and
 * free when done (removed at exit otherwise), or NULL with an I/O error. */
char *moe_spool_stdin(const char *stem);
/* 1 when the file at path starts with the zstd frame magic (a moe-stream),
 * 0 otherwise (unreadable included: its reader reports that). */
int moe_file_is_zstd(const char *path);

#endif
