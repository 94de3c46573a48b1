/* eval.c - perplexity and harness-style multiple-choice scoring (see eval.h). */
#define _GNU_SOURCE
#include "eval.h"
#include "common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_BATCH_TOKENS 4096
#define LOGIT_CHUNK_FLOATS ((size_t)16 << 20) /* 64 MB of logits at a time */

/* ---- scoring core ------------------------------------------------------------- */

/* log-softmax of one row at `target`, in double; *is_max = target is the
 * first argmax. */
static double row_logprob(const float *z, int V, int target, int *is_max) {
    float mx = z[0];
    int am = 0;
    for (int v = 1; v < V; v++)
        if (z[v] > mx || (isnan(z[v]) && !isnan(mx))) { mx = z[v]; am = v; }
    double s = 0.0, m = (double)mx;
    for (int v = 0; v < V; v++) s += exp((double)z[v] - m);
    *is_max = (am == target);
    return (double)z[target] - (m + log(s));
}

/* Layout of one sequence in a layer-major batch.  A sequence either runs
 * whole (P = 0: input rows 0..T-2) or continues a shared context of P
 * tokens (prefix sharing): the context's P rows are run once, by the first
 * sequence of its group (lead), at ctx; each member runs only its input
 * positions P..T-2, at off. */
typedef struct {
    int P;         /* cached context tokens (0: whole sequence) */
    int lead;      /* 1: first of its group, runs the context */
    size_t ctx;    /* row of the group's context (P > 0) */
    size_t off;    /* row of input position P */
} seq_rows;

/* A layer-major batch of scored sequences: seq_rows per sequence and the
 * runs of tokens (a group's context once, then each member's own tokens)
 * as the moe_batch whose rows they are. */
typedef struct {
    moe_model *m;
    moe_eval_seq *seqs;
    seq_rows *sr;
    int n;
    moe_batch b;
    float *kc, *vc; /* KV cache of a shared context (NULL when none) */
} eval_batch;

static void eval_batch_init(eval_batch *e, moe_model *m, moe_eval_seq *seqs, const seq_rows *sr0,
                            int n) {
    e->m = m;
    e->seqs = seqs;
    e->n = n;
    e->sr = moe_malloc(sizeof(seq_rows) * (size_t)(n + 1));
    const int32_t **ids = moe_malloc(sizeof *ids * (size_t)(2 * n + 1));
    int *T = moe_malloc(sizeof(int) * (size_t)(2 * n + 1));
    int nr = 0;
    size_t tot = 0, kvrows = 0;
    for (int s = 0; s < n; s++) {
        seq_rows *r = &e->sr[s];
        *r = sr0[s];
        if (r->P > 0 && r->lead) {
            r->ctx = tot;
            ids[nr] = seqs[s].ids;
            T[nr++] = r->P;
            tot += (size_t)r->P;
        } else if (r->P > 0) {
            r->ctx = e->sr[s - 1].ctx;
        }
        r->off = tot;
        ids[nr] = seqs[s].ids + r->P;
        T[nr++] = seqs[s].T - 1 - r->P;
        tot += (size_t)(seqs[s].T - 1 - r->P);
        if (r->P > 0 && (size_t)(seqs[s].T - 1) > kvrows) kvrows = (size_t)(seqs[s].T - 1);
    }
    moe_batch_init(&e->b, nr, ids, T, 0);
    free(ids);
    free(T);
    e->kc = kvrows ? moe_model_alloc(m, moe_model_kv_floats(m, (int)kvrows)) : NULL;
    e->vc = kvrows ? moe_model_alloc(m, moe_model_kv_floats(m, (int)kvrows)) : NULL;
}

static void eval_batch_free_kv(eval_batch *e) {
    if (e->kc) moe_model_free(e->m, e->kc);
    if (e->vc) moe_model_free(e->m, e->vc);
    e->kc = e->vc = NULL;
}

static void eval_batch_free(eval_batch *e) {
    eval_batch_free_kv(e);
    moe_batch_free(&e->b);
    free(e->sr);
}

/* The attention of layer l on the batch: a whole sequence alone; a group's
 * context once, then its members over the context's cached K/V (the cache
 * rows 0..P-1 stay valid while each member overwrites rows P..). */
static int eval_attention(void *ctx, int l, float *x) {
    eval_batch *e = ctx;
    size_t H = (size_t)moe_model_config(e->m)->hidden_size;
    int rc = 0;
    for (int s = 0; s < e->n && rc == 0; s++) {
        const seq_rows *r = &e->sr[s];
        int P = r->P, Tn = e->seqs[s].T - 1 - P;
        if (P == 0) {
            rc = moe_layer_attention(e->m, l, x + r->off * H, Tn);
            continue;
        }
        if (r->lead) rc = moe_layer_attention_kv(e->m, l, x + r->ctx * H, P, 0, e->kc, e->vc);
        if (rc == 0) rc = moe_layer_attention_kv(e->m, l, x + r->off * H, Tn, P, e->kc, e->vc);
    }
    return rc;
}

/* One layer-major batch seqs[0..n-1] (each with something to score). */
static int score_batch(moe_model *m, moe_eval_seq *seqs, const seq_rows *sr0, int n) {
    const moe_config *c = moe_model_config(m);
    const moe_backend *be = moe_model_backend(m);
    int L = c->num_layers, H = c->hidden_size, V = c->vocab_size;
    eval_batch e;
    eval_batch_init(&e, m, seqs, sr0, n);
    const seq_rows *sr = e.sr;
    size_t tot = e.b.tot;
    float *x = moe_model_alloc(m, tot * H);
    int rc = moe_batch_embed(m, &e.b, x);
    /* layers loaded before (moe-eval --bench preloads them) stay loaded */
    moe_residency res;
    moe_residency_init(&res, m, 0);
    moe_run_hooks h = {.ctx = &e, .attention = eval_attention};
    if (rc == 0) rc = moe_run_layers(m, &e.b, 0, L, x, NULL, NULL, &res, &h);
    moe_residency_free(&res);
    if (rc == 0) rc = moe_model_final_norm(m, x, x, (int)tot);
    eval_batch_free_kv(&e);
    /* lm_head on the scored rows only, in chunks */
    size_t chunk = LOGIT_CHUNK_FLOATS / (size_t)V;
    if (chunk < 1) chunk = 1;
    float *lg = moe_model_alloc(m, chunk * V);
    float *hl = be->host_memory ? lg : moe_malloc(sizeof(float) * chunk * V);
    double *lp = moe_malloc(sizeof(double) * chunk);
    int *gr = moe_malloc(sizeof(int) * chunk);
    for (int s = 0; s < n && rc == 0; s++) {
        moe_eval_seq *q = &seqs[s];
        q->logprob = 0.0;
        q->greedy = 1;
        /* row r (0-based input position, r >= P) predicts ids[r + 1] */
        for (int r0 = q->start - 1; r0 < q->T - 1 && rc == 0; r0 += (int)chunk) {
            int nr = q->T - 1 - r0;
            if ((size_t)nr > chunk) nr = (int)chunk;
            rc = moe_model_lm_head(m, lg, x + (sr[s].off + (size_t)(r0 - sr[s].P)) * H, nr);
            if (rc) break;
            if (!be->host_memory) be->download(hl, lg, sizeof(float) * (size_t)nr * V);
            if ((rc = moe_backend_status(be)) != 0) break; /* no scores from a failed device */
            for (int i = 0; i < nr; i++) {
                int tgt = q->ids[r0 + i + 1];
                if (tgt < 0 || tgt >= V) {
                    moe_error_set(MOE_ERR_DATA, "token id %d out of range (vocabulary %d)", tgt, V);
                    rc = -1;
                    break;
                }
            }
            if (rc) break;
#pragma omp parallel for schedule(static)
            for (int i = 0; i < nr; i++)
                lp[i] = row_logprob(hl + (size_t)i * V, V, q->ids[r0 + i + 1], &gr[i]);
            for (int i = 0; i < nr; i++) {
                q->logprob += lp[i];
                if (!gr[i]) q->greedy = 0;
            }
        }
    }
    free(lp);
    free(gr);
    if (!be->host_memory) free(hl);
    moe_model_free(m, lg);
    moe_model_free(m, x);
    eval_batch_free(&e);
    return rc;
}

/* Sequence b continues the same context as a: the same first scored
 * position and the same tokens before it, except the last context token
 * (the cached prefix is ids[0 .. start-2]; the last context token is an
 * input of every member, so that all scored rows belong to the members). */
static int same_prefix(const moe_eval_seq *a, const moe_eval_seq *b) {
    return a->start == b->start && a->start >= 2 &&
           !memcmp(a->ids, b->ids, sizeof(int32_t) * (size_t)(a->start - 1));
}

int moe_eval_score(moe_model *m, moe_eval_seq *seqs, int n, const moe_eval_opts *o) {
    moe_eval_opts def = {0};
    if (!o) o = &def;
    if (o->tokens_run) *o->tokens_run = 0;
    size_t budget = o->batch_tokens ? o->batch_tokens : DEFAULT_BATCH_TOKENS;
    uint64_t total = 0, done = 0;
    for (int s = 0; s < n; s++) {
        if (seqs[s].T < 1 || seqs[s].start < 1 || seqs[s].start > seqs[s].T) {
            moe_error_set(MOE_ERR_DATA, "sequence %d: bad window (T %d, start %d)", s, seqs[s].T,
                          seqs[s].start);
            return -1;
        }
        seqs[s].logprob = 0.0;
        seqs[s].greedy = 1;
        if (seqs[s].start < seqs[s].T) total += (uint64_t)(seqs[s].T - 1);
    }
    /* the sequences with something to score, and their groups: consecutive
     * ones sharing a context (prefix_cache) */
    int *live = moe_malloc(sizeof(int) * (size_t)(n + 1)), nl = 0;
    for (int s = 0; s < n; s++)
        if (seqs[s].start < seqs[s].T) live[nl++] = s;
    seq_rows *sr = moe_calloc((size_t)nl + 1, sizeof *sr);
    int *gend = moe_malloc(sizeof(int) * (size_t)(nl + 1)); /* group of live[i]: [i, gend[i]) */
    for (int i = 0; i < nl;) {
        int e = i + 1;
        if (!o->no_prefix_cache)
            while (e < nl && same_prefix(&seqs[live[i]], &seqs[live[e]])) e++;
        int P = e - i >= 2 ? seqs[live[i]].start - 1 : 0;
        for (int j = i; j < e; j++) {
            sr[j].P = P;
            sr[j].lead = j == i;
            gend[j] = e;
        }
        i = e;
    }
    moe_eval_seq **batch = moe_malloc(sizeof(*batch) * (size_t)(n + 1));
    moe_eval_seq *tmp = moe_malloc(sizeof(*tmp) * (size_t)(n + 1));
    seq_rows *bsr = moe_malloc(sizeof(*bsr) * (size_t)(n + 1));
    int i = 0, rc = 0;
    while (i < nl && rc == 0) {
        int k = 0;
        size_t tok = 0, ran = 0;
        while (i < nl) { /* whole groups */
            size_t t = 0, r = 0;
            for (int j = i; j < gend[i]; j++) {
                t += (size_t)(seqs[live[j]].T - 1);
                r += (size_t)(seqs[live[j]].T - 1 - sr[j].P) + (sr[j].lead ? (size_t)sr[j].P : 0);
            }
            if (k > 0 && ran + r > budget) break;
            for (int j = i; j < gend[i]; j++, k++) {
                batch[k] = &seqs[live[j]];
                tmp[k] = seqs[live[j]];
                bsr[k] = sr[j];
            }
            tok += t;
            ran += r;
            i = gend[i];
        }
        rc = score_batch(m, tmp, bsr, k);
        for (int j = 0; j < k && rc == 0; j++) {
            batch[j]->logprob = tmp[j].logprob;
            batch[j]->greedy = tmp[j].greedy;
        }
        done += tok;
        if (o->tokens_run) *o->tokens_run += (int64_t)ran;
        if (o->progress && rc == 0) o->progress(o->progress_ctx, done, total);
    }
    free(batch);
    free(tmp);
    free(bsr);
    free(live);
    free(sr);
    free(gend);
    return rc;
}

/* ---- perplexity ----------------------------------------------------------------- */

int moe_eval_ppl(moe_model *m, const int32_t *const *ids, const int *T, int n,
                 const moe_eval_opts *o, moe_ppl_result *res) {
    memset(res, 0, sizeof *res);
    res->n = n;
    res->sample_nll = moe_malloc(sizeof(double) * (size_t)(n + 1));
    res->sample_tokens = moe_malloc(sizeof(int32_t) * (size_t)(n + 1));
    moe_eval_seq *q = moe_calloc((size_t)n + 1, sizeof *q);
    for (int s = 0; s < n; s++) {
        q[s].ids = ids[s];
        q[s].T = T[s] < 1 ? 1 : T[s];
        q[s].start = T[s] >= 2 ? 1 : q[s].T;
    }
    if (moe_eval_score(m, q, n, o) < 0) {
        free(q);
        moe_ppl_result_free(res);
        return -1;
    }
    double sum_mean = 0.0, sum_nll = 0.0;
    for (int s = 0; s < n; s++) {
        if (T[s] < 2) {
            res->sample_nll[s] = NAN;
            res->sample_tokens[s] = 0;
            res->n_skipped++;
            continue;
        }
        double nll = -q[s].logprob;
        res->sample_nll[s] = nll;
        res->sample_tokens[s] = T[s] - 1;
        sum_mean += nll / (double)(T[s] - 1);
        sum_nll += nll;
        res->n_tokens += T[s] - 1;
        res->n_samples++;
    }
    free(q);
    if (res->n_samples == 0) {
        moe_error_set(MOE_ERR_DATA, "perplexity: no sample has 2 or more tokens");
        moe_ppl_result_free(res);
        return -1;
    }
    res->mean_nll = sum_mean / (double)res->n_samples;
    res->ppl = exp(res->mean_nll);
    res->token_nll = sum_nll / (double)res->n_tokens;
    res->ppl_token = exp(res->token_nll);
    return 0;
}

void moe_ppl_result_free(moe_ppl_result *r) {
    if (!r) return;
    free(r->sample_nll);
    free(r->sample_tokens);
    r->sample_nll = NULL;
    r->sample_tokens = NULL;
}

/* ---- pair encoding ------------------------------------------------------------ */

static int is_ws(char ch) {
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f';
}

int moe_eval_encode_pair(moe_tokenizer *tok, const char *ctx, const char *cont, int add_bos,
                         int32_t **ids, size_t *n, size_t *nctx) {
    size_t lc = strlen(ctx), lk = strlen(cont);
    size_t cut = lc;
    while (cut > 0 && is_ws(ctx[cut - 1])) cut--;
    /* whole = ctx + cont; the split moves ctx[cut..] into the continuation */
    char *whole = moe_malloc(lc + lk + 1);
    memcpy(whole, ctx, lc);
    memcpy(whole + lc, cont, lk);
    whole[lc + lk] = 0;
    int32_t *wi = NULL, *ci = NULL;
    size_t wn = 0, cn = 0;
    int rc = moe_tokenizer_encode(tok, whole, lc + lk, add_bos, &wi, &wn);
    if (rc == 0) rc = moe_tokenizer_encode(tok, ctx, cut, add_bos, &ci, &cn);
    free(whole);
    if (rc < 0) {
        free(wi);
        free(ci);
        return -1;
    }
    /* the continuation tokens are whole[len(ctx_enc):] */
    if (cn > wn) cn = wn;
    free(ci);
    *ids = wi;
    *n = wn;
    *nctx = cn;
    return 0;
}

/* Empty context: [prefix] + encode(continuation). */
static int encode_empty_ctx(moe_tokenizer *tok, const moe_config *c, const char *cont,
                            int32_t **ids, size_t *n, size_t *nctx) {
    int prefix = c->bos_token_id >= 0 ? c->bos_token_id : c->eos_token_id;
    if (prefix < 0) {
        moe_error_set(MOE_ERR_DATA, "empty context and the model has no BOS/EOS token id");
        return -1;
    }
    int32_t *ci = NULL;
    size_t cn = 0;
    if (moe_tokenizer_encode(tok, cont, strlen(cont), 0, &ci, &cn) < 0) return -1;
    int32_t *r = moe_malloc(sizeof(int32_t) * (cn + 1));
    r[0] = prefix;
    if (cn) memcpy(r + 1, ci, sizeof(int32_t) * cn);
    free(ci);
    *ids = r;
    *n = cn + 1;
    *nctx = 1;
    return 0;
}

/* ---- task scoring -------------------------------------------------------------- */

static int argmax_np(const double *v, int n) {
    int b = 0;
    for (int i = 0; i < n; i++) {
        if (isnan(v[i])) return i; /* numpy: the first NaN */
        if (v[i] > v[b]) b = i;
    }
    return b;
}

/* Window k of each choice: its tokens (ids[k], owned), the scored sequence
 * q[k] (the last tokens that fit max_length + 1, scoring the continuation). */
static int task_windows(moe_tokenizer *tok, const moe_config *c, const moe_task *t,
                        const moe_task_opts *to, int32_t **ids, moe_eval_seq *q,
                        moe_task_result *r) {
    size_t maxlen = to->max_length > 0 ? (size_t)to->max_length
                                       : (size_t)(c->max_position_embeddings > 0
                                                      ? c->max_position_embeddings
                                                      : 2048);
    int rc = 0;
    for (int i = 0, k = 0; i < t->n_items && rc == 0; i++) {
        const moe_task_item *it = &t->items[i];
        for (int j = 0; j < it->n && rc == 0; j++, k++) {
            size_t n = 0, nctx = 0;
            if (it->ctx[j][0] == 0)
                rc = encode_empty_ctx(tok, c, it->cont[j], &ids[k], &n, &nctx);
            else
                rc = moe_eval_encode_pair(tok, it->ctx[j], it->cont[j], to->add_bos, &ids[k], &n,
                                          &nctx);
            if (rc == 0 && nctx == 0) { /* whitespace-only context: as an empty one */
                char *all = NULL;
                if (asprintf(&all, "%s%s", it->ctx[j], it->cont[j]) < 0) all = NULL;
                free(ids[k]);
                ids[k] = NULL;
                rc = all ? encode_empty_ctx(tok, c, all, &ids[k], &n, &nctx) : -1;
                free(all);
            }
            if (rc) {
                moe_error_set(moe_error_kind(), "%s: item %d choice %d: %s", t->path, i, j,
                              moe_error());
                break;
            }
            size_t ncont = n - nctx, first = 0;
            if (n > maxlen + 1) first = n - (maxlen + 1);
            if (ncont > maxlen) {
                moe_error_set(MOE_ERR_DATA,
                              "%s: item %d choice %d: continuation of %zu tokens exceeds the "
                              "window of %zu",
                              t->path, i, j, ncont, maxlen);
                rc = -1;
                break;
            }
            q[k].ids = ids[k] + first;
            q[k].T = (int)(n - first);
            q[k].start = (int)(n - first - ncont);
            if (q[k].start < 1) q[k].start = q[k].T > 0 ? 1 : 0; /* ncont == n: cannot happen */
            if (q[k].T < 1) { /* empty everything */
                moe_error_set(MOE_ERR_DATA, "%s: item %d choice %d: no tokens", t->path, i, j);
                rc = -1;
                break;
            }
            r->n_seqs++;
            r->n_tokens += q[k].T - 1;
        }
    }
    return rc;
}

/* Identical windows are scored once: uq[0..nu) the distinct ones (looking
 * back a little), dup[k] the one of window k.  Returns nu. */
static int distinct_windows(const moe_eval_seq *q, int nc, int *dup, moe_eval_seq *uq) {
    int nu = 0;
    for (int k = 0; k < nc; k++) {
        dup[k] = -1;
        for (int u = nu - 1; u >= 0 && u >= nu - 64; u--)
            if (uq[u].T == q[k].T && uq[u].start == q[k].start &&
                !memcmp(uq[u].ids, q[k].ids, sizeof(int32_t) * (size_t)q[k].T)) {
                dup[k] = u;
                break;
            }
        if (dup[k] < 0) {
            dup[k] = nu;
            uq[nu++] = q[k];
        }
    }
    return nu;
}

/* Per-choice scores from the distinct windows, predictions and the task's
 * accuracy / perplexity. */
static void task_scores(const moe_task *t, const moe_eval_seq *uq, const int *dup,
                        moe_task_result *r) {
    double sum_acc = 0, sum_norm = 0, sum_ll = 0;
    double *tmp = moe_malloc(sizeof(double) * 64);
    int tcap = 64;
    for (int i = 0; i < t->n_items; i++) {
        const moe_task_item *it = &t->items[i];
        int b = r->choice_off[i];
        for (int j = 0; j < it->n; j++) {
            r->loglik[b + j] = uq[dup[b + j]].logprob;
            r->greedy[b + j] = uq[dup[b + j]].greedy;
        }
        if (t->kind == MOE_TASK_LM) {
            sum_acc += r->greedy[b];
            sum_ll += r->loglik[b];
            r->pred[i] = r->pred_norm[i] = 0;
            continue;
        }
        if (it->n > tcap) {
            tcap = it->n;
            tmp = moe_realloc(tmp, sizeof(double) * (size_t)tcap);
        }
        r->pred[i] = argmax_np(r->loglik + b, it->n);
        for (int j = 0; j < it->n; j++) tmp[j] = r->loglik[b + j] / (double)it->norm_len[j];
        r->pred_norm[i] = argmax_np(tmp, it->n);
        sum_acc += r->pred[i] == it->gold;
        sum_norm += r->pred_norm[i] == it->gold;
    }
    free(tmp);
    double ni = t->n_items > 0 ? (double)t->n_items : NAN;
    r->acc = sum_acc / ni;
    r->acc_norm = t->has_acc_norm ? sum_norm / ni : NAN;
    r->perplexity = t->kind == MOE_TASK_LM ? exp(-sum_ll / ni) : NAN;
}

int moe_eval_task(moe_model *m, moe_tokenizer *tok, const moe_task *t, const moe_task_opts *to,
                  const moe_eval_opts *o, moe_task_result *r) {
    moe_task_opts dto = {0};
    if (!to) to = &dto;
    memset(r, 0, sizeof *r);
    r->n_items = t->n_items;
    r->choice_off = moe_malloc(sizeof(int) * (size_t)(t->n_items + 1));
    int nc = 0;
    for (int i = 0; i < t->n_items; i++) {
        r->choice_off[i] = nc;
        nc += t->items[i].n;
    }
    r->choice_off[t->n_items] = nc;
    r->loglik = moe_calloc((size_t)nc + 1, sizeof(double));
    r->greedy = moe_calloc((size_t)nc + 1, sizeof(int));
    r->pred = moe_calloc((size_t)t->n_items + 1, sizeof(int));
    r->pred_norm = moe_calloc((size_t)t->n_items + 1, sizeof(int));
    int32_t **ids = moe_calloc((size_t)nc + 1, sizeof(int32_t *));
    moe_eval_seq *q = moe_calloc((size_t)nc + 1, sizeof *q);
    int rc = task_windows(tok, moe_model_config(m), t, to, ids, q, r);
    int *dup = moe_malloc(sizeof(int) * ((size_t)nc + 1));
    moe_eval_seq *uq = moe_calloc((size_t)nc + 1, sizeof *uq);
    int nu = rc == 0 ? distinct_windows(q, nc, dup, uq) : 0;
    moe_eval_opts so = o ? *o : (moe_eval_opts){0};
    so.tokens_run = &r->n_tokens_run;
    if (rc == 0) rc = moe_eval_score(m, uq, nu, &so);
    if (rc == 0 && o && o->tokens_run) *o->tokens_run = r->n_tokens_run;
    if (rc == 0) task_scores(t, uq, dup, r);
    for (int k = 0; k < nc; k++) free(ids[k]);
    free(ids);
    free(q);
    free(uq);
    free(dup);
    if (rc) moe_task_result_free(r);
    return rc;
}

void moe_task_result_free(moe_task_result *r) {
    if (!r) return;
    free(r->choice_off);
    free(r->loglik);
    free(r->greedy);
    free(r->pred);
    free(r->pred_norm);
    memset(r, 0, sizeof *r);
}

/* ---- sizes -------------------------------------------------------------------- */

uint64_t moe_eval_active_params(const moe_config *c) {
    moe_tensor_ref *refs = NULL;
    int n = moe_config_tensor_list(c, &refs);
    uint64_t active = 0, *experts = moe_calloc((size_t)c->num_layers + 1, sizeof(uint64_t));
    for (int i = 0; i < n; i++) {
        const moe_tensor_ref *r = &refs[i];
        uint64_t numel = (uint64_t)r->shape[0] * (uint64_t)(r->ndim > 1 ? r->shape[1] : 1);
        int routed = r->kind >= MOE_T_EXPERT_GATE && r->kind <= MOE_T_EXPERT_DOWN &&
                     c->layers[r->layer].kind == MOE_MLP_MOE;
        if (routed)
            experts[r->layer] += numel;
        else
            active += numel;
    }
    for (int l = 0; l < c->num_layers && c->n_routed_experts > 0; l++)
        active += experts[l] / (uint64_t)c->n_routed_experts * (uint64_t)c->top_k;
    free(experts);
    free(refs);
    return active;
}

int moe_eval_model_size(moe_model *m, uint64_t *params, uint64_t *bytes) {
    const moe_config *c = moe_model_config(m);
    const moe_ckpt *ck = moe_model_ckpt(m);
    moe_tensor_ref *refs = NULL;
    int n = moe_config_tensor_list(c, &refs);
    if (n < 0) return -1;
    uint64_t p = 0, b = 0;
    for (int i = 0; i < n; i++) {
        const moe_st_tensor *st = moe_ckpt_find(ck, refs[i].name);
        if (!st) {
            moe_error_set(MOE_ERR_DATA, "%s: tensor %s missing", moe_ckpt_dir(ck), refs[i].name);
            free(refs);
            return -1;
        }
        p += (uint64_t)st->numel;
        b += st->nbytes;
    }
    free(refs);
    *params = p;
    *bytes = b;
    return 0;
}
