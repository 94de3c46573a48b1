/* search_job.c - the set-up and tear-down the search tools share. */
#include "search_job.h"

#include "common.h"

#include <stdlib.h>

int moe_search_job_model(moe_search_job *j, const char *dir, const moe_model_opts *mo) {
    if (!(j->model = moe_model_open(dir, mo))) return -1;
    j->cfg = moe_model_config(j->model);
    return moe_tokens_check_init(&j->tokenizer, dir, 0);
}

static const struct {
    int flag;
    const char *kind, *hint;
} needed[] = {
    {MOE_SEARCH_IN_CALIB, MOE_REC_CALIB, "make it with moe-calib"},
    {MOE_SEARCH_IN_RANKING, MOE_REC_RANKING, "make it with moe-expert-rank"},
};

int moe_search_job_open(moe_search_job *j, const char *in, const char *out, int force,
                        int no_provenance) {
    if (!(j->in = moe_reader_open(in))) return -1;
    if (moe_reader_require_kind(j->in, MOE_REC_TOKENS, "make it with moe-tokenize") < 0) return -1;
    for (size_t i = 0; i < sizeof needed / sizeof *needed; i++)
        if ((j->need & needed[i].flag) &&
            moe_reader_require_kind(j->in, needed[i].kind, needed[i].hint) < 0)
            return -1;
    const char *fp = moe_model_fingerprint(j->model);
    if (moe_reader_check_model(j->in, fp, force) < 0) return -1;
    moe_provenance prov = {j->tool, j->argc, j->argv, fp, j->kind};
    if (!(j->out = moe_writer_open(out, moe_reader_header(j->in), &prov, no_provenance))) return -1;
    int want = j->need | j->collect;
    j->tokenizer.force = force;
    moe_records_opts ro = {j->cfg->num_layers, j->cfg->n_routed_experts, &j->tokenizer};
    if (moe_records_collect(j->in, j->out, &ro, &j->seqs, (want & MOE_SEARCH_IN_CALIB) ? &j->calib : NULL,
                            (want & MOE_SEARCH_IN_RANKING) ? &j->ranking : NULL, NULL) < 0) {
        moe_search_job_abort(j);
        return -1;
    }
    return 0;
}

int moe_search_job_finish(moe_search_job *j) {
    const moe_backend *be = moe_model_backend(j->model);
    if (moe_backend_is_device(be) && be->mem_used) { /* a GPU: say how much memory it took */
        size_t live, peak;
        be->mem_used(&live, &peak);
        j->work.device_peak = peak;
    }
    if (moe_search_work_write(j->out, j->tool, &j->work) < 0) return -1;
    moe_writer *w = j->out;
    j->out = NULL;
    return moe_writer_close(w);
}

void moe_search_job_abort(moe_search_job *j) {
    if (j->out) moe_writer_abort(j->out);
    j->out = NULL;
}

void moe_search_job_close(moe_search_job *j) {
    moe_search_job_abort(j);
    moe_ranking_free(&j->ranking);
    moe_calib_free(&j->calib);
    moe_seqs_free(&j->seqs);
    moe_reader_close(j->in);
    moe_model_close(j->model);
    j->in = NULL;
    j->model = NULL;
    j->cfg = NULL;
}

int moe_search_add_weight(moe_weight_override **w, int *n, const char *s) {
    moe_weight_override one;
    if (moe_parse_weight(s, &one) < 0) return -1;
    *w = moe_realloc(*w, sizeof **w * (size_t)(*n + 1));
    (*w)[(*n)++] = one;
    return 0;
}
