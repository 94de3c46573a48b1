/* generate.c - greedy / sampled generation with a KV cache, and the text
 * streaming (see generate.h). */
#define _GNU_SOURCE
#include "generate.h"
#include "common.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_MAX_BATCH 8

/* ---- random numbers: SplitMix64 ----------------------------------------------- */

static uint64_t splitmix_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t splitmix_next(uint64_t *state) {
    *state += 0x9E3779B97F4A7C15ull;
    return splitmix_mix(*state);
}

uint64_t moe_gen_rng_init(uint64_t seed, uint64_t stream) {
    /* streams of neighbouring indices start far apart in the state sequence */
    return seed + splitmix_mix(stream + 1);
}

double moe_gen_uniform(uint64_t *rng) {
    return (double)(splitmix_next(rng) >> 11) * 0x1.0p-53;
}

/* ---- choosing a token ----------------------------------------------------------- */

typedef struct {
    float z;
    int32_t id;
} scored_id;

/* Logit descending, then id ascending: a total order, so any qsort gives
 * the same permutation. */
static int by_logit_desc(const void *a, const void *b) {
    const scored_id *x = a, *y = b;
    if (x->z != y->z) return x->z > y->z ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static int32_t argmax_first(const float *z, int V) {
    int32_t best = 0;
    for (int v = 1; v < V; v++)
        if (z[v] > z[best]) best = v;
    return best;
}

/* The candidates in the order the draw walks: all ids in id order, or
 * (a filter on) sorted by logit and cut to top_k.  Returns their number. */
static int sampling_candidates(const float *z, int V, const moe_gen_opts *o, scored_id *cand) {
    for (int v = 0; v < V; v++) cand[v] = (scored_id){z[v], v};
    int filtered = (o->top_k > 0 && o->top_k < V) || o->top_p < 1.0;
    if (!filtered) return V;
    qsort(cand, (size_t)V, sizeof *cand, by_logit_desc);
    return o->top_k > 0 && o->top_k < V ? o->top_k : V;
}

int32_t moe_gen_pick(const float *z, int V, const moe_gen_opts *o, uint64_t *rng) {
    for (int v = 0; v < V; v++)
        if (!isfinite(z[v])) {
            moe_error_set(MOE_ERR_DATA, "the model's logits are not finite (token %d: %g)", v,
                          (double)z[v]);
            return -1;
        }
    if (o->temperature <= 0) return argmax_first(z, V);
    scored_id *cand = moe_malloc(sizeof *cand * (size_t)V);
    double *p = moe_malloc(sizeof *p * (size_t)V);
    int n = sampling_candidates(z, V, o, cand);
    double mx = -INFINITY, mass = 0.0;
    for (int i = 0; i < n; i++)
        if ((double)cand[i].z > mx) mx = (double)cand[i].z;
    for (int i = 0; i < n; i++) {
        p[i] = exp(((double)cand[i].z - mx) / o->temperature);
        mass += p[i];
    }
    if (o->top_p < 1.0) { /* the shortest prefix (probability order) reaching top_p */
        double want = o->top_p * mass, cum = 0.0;
        int keep = 0;
        while (keep < n && (keep == 0 || cum < want)) cum += p[keep++];
        n = keep;
        mass = cum;
    }
    double u = moe_gen_uniform(rng) * mass, cum = 0.0;
    int32_t id = cand[n - 1].id;
    for (int i = 0; i < n; i++) {
        cum += p[i];
        if (u < cum) {
            id = cand[i].id;
            break;
        }
    }
    free(cand);
    free(p);
    return id;
}

/* ---- decoding a batch ------------------------------------------------------------ */

/* The sequences of one batch while they are generated. */
typedef struct {
    moe_model *m;
    moe_gen_seq *q;
    int n, L;
    int base;       /* index of q[0] in the caller's sequences (for cb) */
    int *pos;       /* [n] tokens already in the cache */
    int *cap;       /* [n] length limit (cache rows) */
    int *live;      /* [n] still generating */
    uint64_t *rng;  /* [n] */
    float **kc, **vc; /* [n * L] cache of sequence s, layer l at [s * L + l] */
    int *order;     /* [n] the live sequences of the current step, batch order */
    int nstep;
} gen_batch;

static int gen_batch_init(gen_batch *g, moe_model *m, moe_gen_seq *q, int base, int n,
                          const moe_gen_opts *o) {
    const moe_config *c = moe_model_config(m);
    int maxpos = o->max_positions > 0 ? o->max_positions
                                      : (c->max_position_embeddings > 0 ? c->max_position_embeddings
                                                                         : 2048);
    memset(g, 0, sizeof *g);
    g->m = m;
    g->q = q;
    g->n = n;
    g->base = base;
    g->L = c->num_layers;
    g->pos = moe_calloc((size_t)n, sizeof(int));
    g->cap = moe_calloc((size_t)n, sizeof(int));
    g->live = moe_calloc((size_t)n, sizeof(int));
    g->rng = moe_calloc((size_t)n, sizeof(uint64_t));
    g->order = moe_calloc((size_t)n, sizeof(int));
    g->kc = moe_calloc((size_t)n * (size_t)g->L, sizeof(float *));
    g->vc = moe_calloc((size_t)n * (size_t)g->L, sizeof(float *));
    for (int s = 0; s < n; s++) {
        moe_gen_seq *sq = &q[s];
        if (sq->n_prompt < 1 || sq->n_prompt > maxpos) {
            moe_error_set(MOE_ERR_DATA, "sequence %d: a prompt of %d tokens (1 to %d fit the model)",
                          base + s, sq->n_prompt, maxpos);
            return -1;
        }
        long cap = (long)sq->n_prompt + o->max_new_tokens;
        g->cap[s] = cap > maxpos ? maxpos : (int)cap;
        sq->ids = moe_malloc(sizeof(int32_t) * (size_t)g->cap[s] + sizeof(int32_t));
        memcpy(sq->ids, sq->prompt, sizeof(int32_t) * (size_t)sq->n_prompt);
        sq->n = sq->n_prompt;
        sq->finish = MOE_GEN_LENGTH;
        g->live[s] = o->max_new_tokens > 0 && sq->n_prompt < g->cap[s];
        g->rng[s] = moe_gen_rng_init(o->seed, sq->stream);
        size_t kvf = moe_model_kv_floats(m, g->cap[s]);
        for (int l = 0; l < g->L; l++) {
            g->kc[(size_t)s * g->L + l] = moe_model_alloc(m, kvf);
            g->vc[(size_t)s * g->L + l] = moe_model_alloc(m, kvf);
        }
    }
    return 0;
}

static void gen_batch_free(gen_batch *g) {
    for (size_t i = 0; i < (size_t)g->n * (size_t)g->L; i++) {
        if (g->kc[i]) moe_model_free(g->m, g->kc[i]);
        if (g->vc[i]) moe_model_free(g->m, g->vc[i]);
    }
    free(g->kc);
    free(g->vc);
    free(g->pos);
    free(g->cap);
    free(g->live);
    free(g->rng);
    free(g->order);
}

/* Attention of layer l for the step's sequences: each continues its cache. */
static int gen_attention(void *ctx, int l, float *x) {
    gen_batch *g = ctx;
    size_t H = (size_t)moe_model_config(g->m)->hidden_size;
    size_t row = 0;
    for (int i = 0; i < g->nstep; i++) {
        int s = g->order[i], T = g->q[s].n - g->pos[s];
        size_t kv = (size_t)s * g->L + l;
        if (moe_layer_attention_kv(g->m, l, x + row * H, T, g->pos[s], g->kc[kv], g->vc[kv]) < 0)
            return -1;
        row += (size_t)T;
    }
    return 0;
}

/* Run the step's new tokens through the model; logits of each sequence's
 * last row into host memory lg [nstep, V]. */
static int gen_forward(gen_batch *g, moe_residency *res, float *lg) {
    moe_model *m = g->m;
    const moe_config *c = moe_model_config(m);
    const moe_backend *be = moe_model_backend(m);
    size_t H = (size_t)c->hidden_size, V = (size_t)c->vocab_size;
    const int32_t **ids = moe_malloc(sizeof *ids * (size_t)g->nstep);
    int *T = moe_malloc(sizeof(int) * (size_t)g->nstep);
    for (int i = 0; i < g->nstep; i++) {
        int s = g->order[i];
        ids[i] = g->q[s].ids + g->pos[s];
        T[i] = g->q[s].n - g->pos[s];
    }
    moe_batch b;
    moe_batch_init(&b, g->nstep, ids, T, 0);
    free(ids);
    free(T);
    float *x = moe_model_alloc(m, b.tot * H);
    float *last = moe_model_alloc(m, (size_t)g->nstep * H);
    float *dl = be->host_memory ? lg : moe_model_alloc(m, (size_t)g->nstep * V);
    moe_run_hooks h = {.ctx = g, .attention = gen_attention};
    int rc = moe_batch_embed(m, &b, x);
    if (rc == 0) rc = moe_run_layers(m, &b, 0, g->L, x, NULL, NULL, res, &h);
    for (int i = 0; i < g->nstep && rc == 0; i++)
        rc = moe_model_final_norm(m, last + (size_t)i * H, x + (b.off[i + 1] - 1) * H, 1);
    if (rc == 0) rc = moe_model_lm_head(m, dl, last, g->nstep);
    if (rc == 0 && !be->host_memory) be->download(lg, dl, sizeof(float) * (size_t)g->nstep * V);
    if (rc == 0) rc = moe_backend_status(be);
    if (!be->host_memory) moe_model_free(m, dl);
    moe_model_free(m, last);
    moe_model_free(m, x);
    moe_batch_free(&b);
    return rc;
}

static int is_stop_id(const moe_gen_opts *o, int32_t id) {
    for (int i = 0; i < o->n_stop_ids; i++)
        if (o->stop_ids[i] == id) return 1;
    return 0;
}

/* Choose each step sequence's next token, append it, end the sequences
 * that are done, tell the caller.  Returns tokens added, or -1. */
static int gen_append(gen_batch *g, const float *lg, const moe_gen_opts *o, moe_gen_token_fn cb,
                      void *ctx) {
    int V = moe_model_config(g->m)->vocab_size, added = 0;
    for (int i = 0; i < g->nstep; i++) {
        int s = g->order[i];
        moe_gen_seq *sq = &g->q[s];
        int32_t id = moe_gen_pick(lg + (size_t)i * V, V, o, &g->rng[s]);
        if (id < 0) return -1;
        g->pos[s] = sq->n;
        sq->ids[sq->n++] = id;
        added++;
        int stop = is_stop_id(o, id);
        if (stop) sq->finish = MOE_GEN_EOS;
        int last = stop || sq->n - sq->n_prompt >= o->max_new_tokens || sq->n >= g->cap[s];
        int r = cb ? cb(ctx, g->base + s, id, last) : 0;
        if (r < 0) return -1;
        if (r > 0) sq->finish = MOE_GEN_STOP;
        if (r > 0 || last) g->live[s] = 0;
    }
    return added;
}

/* Sequences q[base .. base + n - 1], together. */
static int gen_run_batch(moe_model *m, moe_gen_seq *q, int base, int n, const moe_gen_opts *o,
                         moe_gen_token_fn cb, void *ctx, moe_gen_stats *st) {
    gen_batch g;
    q += base;
    int rc = gen_batch_init(&g, m, q, base, n, o);
    const moe_config *c = moe_model_config(m);
    float *lg = moe_malloc(sizeof(float) * (size_t)n * (size_t)c->vocab_size);
    moe_residency res;
    moe_residency_init(&res, m, moe_model_fits(m));
    if (res.keep && rc == 0) { /* it stays loaded: load it first, timed apart from the steps */
        double t0 = moe_now();
        for (int l = 0; l < g.L && rc == 0; l++) rc = moe_residency_use(&res, l);
        st->load_s += moe_now() - t0;
    }
    for (int step = 0; rc == 0; step++) {
        g.nstep = 0;
        for (int s = 0; s < n; s++)
            if (g.live[s]) g.order[g.nstep++] = s;
        if (g.nstep == 0) break;
        double t0 = moe_now();
        rc = gen_forward(&g, &res, lg);
        int added = rc == 0 ? gen_append(&g, lg, o, cb, ctx) : -1;
        if (added < 0) rc = -1;
        double dt = moe_now() - t0;
        if (step == 0) st->prefill_s += dt;
        else st->decode_s += dt;
        if (rc == 0) st->new_tokens += added;
    }
    for (int s = 0; s < n; s++) st->prompt_tokens += q[s].n_prompt;
    moe_residency_free(&res);
    free(lg);
    gen_batch_free(&g);
    return rc;
}

int moe_generate(moe_model *m, moe_gen_seq *seqs, int n, const moe_gen_opts *o,
                 moe_gen_token_fn cb, void *ctx, moe_gen_stats *st) {
    moe_gen_stats dummy = {0};
    if (!st) st = &dummy;
    if (o->top_p <= 0 || o->top_p > 1 || o->top_k < 0 || o->max_new_tokens < 0) {
        moe_error_set(MOE_ERR_DATA, "bad sampling settings (top_p %g, top_k %d, max new tokens %d)",
                      o->top_p, o->top_k, o->max_new_tokens);
        return -1;
    }
    for (int s = 0; s < n; s++) seqs[s].ids = NULL;
    int batch = o->max_batch > 0 ? o->max_batch : DEFAULT_MAX_BATCH;
    for (int s0 = 0; s0 < n; s0 += batch) {
        int k = n - s0 < batch ? n - s0 : batch;
        if (gen_run_batch(m, seqs, s0, k, o, cb, ctx, st) < 0) {
            for (int s = 0; s < n; s++) {
                free(seqs[s].ids);
                seqs[s].ids = NULL;
            }
            return -1;
        }
    }
    return 0;
}

/* ---- text as it is produced ------------------------------------------------------ */

void moe_detok_init(moe_detok *d, const moe_tokenizer *tok, const char *const *stops, int n_stops) {
    memset(d, 0, sizeof *d);
    d->tok = tok;
    d->stops = stops;
    d->n_stops = n_stops;
}

void moe_detok_free(moe_detok *d) {
    free(d->ids);
    free(d->text);
    memset(d, 0, sizeof *d);
}

/* Length of s without a trailing UTF-8 character that is still incomplete
 * (a lead byte followed by fewer continuation bytes than it announces). */
static size_t complete_utf8_prefix(const char *s, size_t n) {
    size_t i = n;
    while (i > 0 && n - i < 4 && ((unsigned char)s[i - 1] & 0xC0) == 0x80) i--;
    if (i == 0) return n;
    unsigned char lead = (unsigned char)s[i - 1];
    size_t need = lead >= 0xF0 && lead <= 0xF4 ? 4 : lead >= 0xE0 && lead < 0xF0 ? 3
                : lead >= 0xC2 && lead < 0xE0 ? 2 : 1;
    return n - (i - 1) < need ? i - 1 : n;
}

/* The decoded text of the ids so far; whole = 0 leaves out an incomplete
 * last character.  0 or -1. */
static int detok_decode(moe_detok *d, int whole) {
    char *raw = NULL;
    size_t rl = 0;
    if (moe_tokenizer_decode(d->tok, d->ids, d->n, MOE_TOK_SKIP_SPECIAL | MOE_TOK_RAW, &raw, &rl) < 0)
        return -1;
    size_t cut = whole ? rl : complete_utf8_prefix(raw, rl);
    free(d->text);
    d->text = moe_utf8_lossy(raw, cut, &d->len);
    free(raw);
    return 0;
}

/* The longest tail of text[from..len) that begins some stop string. */
static size_t partial_stop_tail(const moe_detok *d, size_t from) {
    size_t best = 0;
    for (int i = 0; i < d->n_stops; i++) {
        size_t sl = strlen(d->stops[i]);
        for (size_t k = sl > 0 ? sl - 1 : 0; k > best; k--)
            if (k <= d->len - from && !memcmp(d->text + d->len - k, d->stops[i], k)) {
                best = k;
                break;
            }
    }
    return best;
}

/* Hand out what became final: up to a stop string, or all but a tail that
 * may begin one. */
static int detok_settle(moe_detok *d, const char **out, size_t *len) {
    size_t from = d->emitted, end = d->len;
    int stopped = 0;
    for (int i = 0; i < d->n_stops; i++) {
        const char *hit = memmem(d->text + from, d->len - from, d->stops[i], strlen(d->stops[i]));
        if (hit && (size_t)(hit - d->text) < end) {
            end = (size_t)(hit - d->text);
            stopped = 1;
        }
    }
    if (!stopped) end -= partial_stop_tail(d, from);
    *out = d->text + from;
    *len = end > from ? end - from : 0;
    if (end > from) d->emitted = end;
    d->stopped = stopped;
    return stopped;
}

int moe_detok_push(moe_detok *d, int32_t id, const char **out, size_t *len) {
    *out = "";
    *len = 0;
    if (d->stopped) return 1;
    /* an id past the tokenizer's (a model's padded vocabulary) has no text:
     * left out, as tokenizers' decode does */
    if ((size_t)id >= moe_tokenizer_vocab_size(d->tok)) return 0;
    if (d->n == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 64;
        d->ids = moe_realloc(d->ids, sizeof(int32_t) * d->cap);
    }
    d->ids[d->n++] = id;
    if (detok_decode(d, 0) < 0) return -1;
    return detok_settle(d, out, len);
}

int moe_detok_finish(moe_detok *d, const char **out, size_t *len) {
    *out = "";
    *len = 0;
    if (d->stopped || d->n == 0) return 0;
    if (detok_decode(d, 1) < 0) return -1;
    *out = d->text + (d->emitted < d->len ? d->emitted : d->len);
    *len = d->len > d->emitted ? d->len - d->emitted : 0;
    d->emitted = d->len;
    return 0;
}

/* ---- end-of-sequence ids ------------------------------------------------------ */

static void ids_add_unique(int32_t **ids, int *n, int32_t id) {
    for (int i = 0; i < *n; i++)
        if ((*ids)[i] == id) return;
    *ids = moe_realloc(*ids, sizeof(int32_t) * (size_t)(*n + 1));
    (*ids)[(*n)++] = id;
}

/* eos_token_id of dir/name (absent file or key: nothing). */
static int eos_ids_of(const char *dir, const char *name, int32_t **ids, int *n) {
    char *path = moe_malloc(strlen(dir) + strlen(name) + 2);
    sprintf(path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    int rc = 0;
    if (f) {
        json_error_t err;
        json_t *root = json_loadf(f, 0, &err);
        fclose(f);
        json_t *v = root ? json_object_get(root, "eos_token_id") : NULL;
        size_t k = json_is_array(v) ? json_array_size(v) : v && !json_is_null(v) ? 1 : 0;
        if (!root) {
            moe_error_set(MOE_ERR_DATA, "%s: not JSON: %s (line %d)", path, err.text, err.line);
            rc = -1;
        }
        for (size_t i = 0; i < k && rc == 0; i++) {
            json_t *e = json_is_array(v) ? json_array_get(v, i) : v;
            json_int_t id = json_integer_value(e);
            if (!json_is_integer(e) || id < 0 || id > INT32_MAX) {
                moe_error_set(MOE_ERR_DATA, "%s: eos_token_id is not a token id", path);
                rc = -1;
            } else {
                ids_add_unique(ids, n, (int32_t)id);
            }
        }
        json_decref(root);
    }
    free(path);
    return rc;
}

int moe_gen_eos_ids(const char *model_dir, int32_t **ids) {
    int n = 0;
    *ids = moe_malloc(sizeof(int32_t));
    if (eos_ids_of(model_dir, "config.json", ids, &n) < 0 ||
        eos_ids_of(model_dir, "generation_config.json", ids, &n) < 0) {
        free(*ids);
        *ids = NULL;
        return -1;
    }
    return n;
}
