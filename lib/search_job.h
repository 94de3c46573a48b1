/* search_job.h - what the search tools (moe-calib, moe-expert-rank,
 * moe-layer-search) share around their algorithm: the model, the input
 * stream read whole (its token sequences and, on demand, its calib and
 * ranking records; every record copied to the output), the model checked
 * against the stream's provenance, the output stream with this tool's
 * provenance entry, and the "work" record that closes it.
 *
 *   moe_search_job j = {.tool = "moe-calib", .kind = MOE_REC_CALIB, .argc = argc, .argv = argv};
 *   moe_search_job_model(&j, dir, &model_opts);   (check options against j.cfg)
 *   moe_search_job_open(&j, in, out, force, no_provenance);
 *   ... the algorithm on j.model, j.seqs, j.calib, j.ranking, counting into
 *       j.work; its records written to j.out ...
 *   moe_search_job_finish(&j);   (on any failure: moe_search_job_abort(&j))
 *   moe_search_job_close(&j);
 *
 * Library rules: nothing printed, errors through moe_error_set(). */
#ifndef MOE_SEARCH_JOB_H
#define MOE_SEARCH_JOB_H

#include "search.h"

/* Input records besides the token sequences (which are always needed). */
enum { MOE_SEARCH_IN_CALIB = 1, MOE_SEARCH_IN_RANKING = 2 };

typedef struct {
    /* set by the tool */
    const char *tool;      /* "moe-calib": provenance entry, work record */
    const char *kind;      /* the stream kind the tool adds (MOE_REC_CALIB, ...) */
    int argc;              /* the tool's command line, for the provenance */
    char **argv;
    int need;              /* MOE_SEARCH_IN_*: kinds the input stream must have */
    int collect;           /* MOE_SEARCH_IN_*: records collected besides the needed ones */
    /* set by moe_search_job_model() / moe_search_job_open() */
    moe_model *model;
    const moe_config *cfg;
    moe_reader *in;
    moe_writer *out;
    moe_seqs seqs;
    moe_calib calib;       /* zero unless collected */
    moe_ranking ranking;   /* zero unless collected */
    moe_search_work work;  /* for the algorithm to count into */
    moe_tokens_check tokenizer; /* the model's tokenizer, which the tokens must come from */
} moe_search_job;

/* Open the model in dir (the worker threads are the caller's: --threads).
 * 0 or -1. */
int moe_search_job_model(moe_search_job *j, const char *dir, const moe_model_opts *mo);

/* Open the input stream `in` ("-" = stdin), require its token records and
 * the kinds in j->need, check the model's fingerprint against its
 * provenance (force: a warning only), open the output stream `out` ("-" =
 * stdout) with the tool's provenance entry (none with no_provenance), then
 * read every input record, copying it to the output and collecting the
 * token sequences (made with the model's tokenizer, if the stream says
 * which: force makes a mismatch a warning) and the records of
 * j->need | j->collect.  0 or -1 (the
 * output, if opened, is removed). */
int moe_search_job_open(moe_search_job *j, const char *in, const char *out, int force,
                        int no_provenance);

/* Write the work record and close the output stream (renamed into place).
 * 0 or -1; after -1 call moe_search_job_abort(). */
int moe_search_job_finish(moe_search_job *j);

/* Give up the output stream, if still open (its temporary file removed). */
void moe_search_job_abort(moe_search_job *j);

/* Close everything the job holds. */
void moe_search_job_close(moe_search_job *j);

/* Append a --weight value "L:E=W" to the array *w of *n entries (realloc'd).
 * -1 on bad syntax (nothing appended). */
int moe_search_add_weight(moe_weight_override **w, int *n, const char *s);

#endif
