/* moe-eval - perplexity, multiple-choice tasks (lm-evaluation-harness style),
 * prefill benchmark, and forward dumps (hidden states, logits). */
#define _GNU_SOURCE
#include "cli.h"
#include "eval.h"
#include "evaldump.h"
#include "jsonout.h"
#include "model.h"
#include "stream.h"
#include "tokenizer.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static const char help[] =
    "Usage: moe-eval --model DIR [--model DIR2] [--ppl TEXT.jsonl|TOKENS] [--task FILE]...\n"
    "                [--limit N] [--bench] [--json] [-o OUT.msgpack.zst]\n"
    "       moe-eval --model DIR --dump hidden,logits [-o OUT] [TOKENS|-]\n"
    "Measure a model (and compare it with a second one, e.g. dense vs condensed):\n"
    "perplexity, multiple-choice accuracy as lm-evaluation-harness computes it,\n"
    "prefill speed and weight memory.  A table goes to stdout (--json: JSON);\n"
    "-o also writes the results as a moe-stream (kind \"eval\").\n"
    "\n"
    "  -m, --model DIR     model directory (twice: the second is compared with the first)\n"
    "      --ppl FILE|-    perplexity over JSON Lines {\"text\":...} (or {\"turns\":[...]}),\n"
    "                      tokenized with the model's tokenizer (BOS added as the\n"
    "                      tokenizer does), or over a token stream (moe-tokenize)\n"
    "      --max-length N  truncate each --ppl / --dump sequence to N tokens (default:\n"
    "                      no truncation, as CD-MoE's compute_ppl)\n"
    "      --task FILE     a task file (repeatable); format auto-detected, see --task-format\n"
    "      --task-format F format of the following --task files: auto, mc, schema, lm,\n"
    "                      piqa, winogrande, hellaswag, rte (default: auto)\n"
    "      --delimiter STR continuation delimiter for the following mc task files\n"
    "                      (default: MosaicML's per file name, else \" \")\n"
    "      --limit N       first N items of each task / N samples of --ppl\n"
    "      --add-bos       prepend BOS to task contexts (harness add_bos_token; default off)\n"
    "      --task-max-length N  task window (default: the model's max_position_embeddings)\n"
    "      --batch-tokens N  tokens per layer-major forward batch (default 4096; --dump 2048)\n"
    "      --no-prefix-cache  run every choice whole (default: a multiple-choice item's\n"
    "                      context runs once, its keys/values cached for the choices)\n"
    "      --bench         prefill tokens/s and weight memory (params, bytes, peak RSS)\n"
    "      --bench-tokens N  prompt length of the benchmark (default 256)\n"
    "      --bench-runs N  timed runs, the fastest is reported (default 3)\n"
    "      --json          JSON on stdout instead of the table\n"
    "  -d, --dump LIST     forward dump of a token stream (TOKENS or stdin): hidden,\n"
    "                      logits or hidden,logits; writes a stream of kind \"dump\"\n"
    "  -o, --output OUT    write a moe-stream (the results, or the dump; '-' = stdout)\n";

enum {
    OPT_PPL = 1, OPT_MAXLEN, OPT_TASK, OPT_TASKFMT, OPT_DELIM, OPT_LIMIT, OPT_ADDBOS,
    OPT_TASKMAX, OPT_BATCH, OPT_BENCH, OPT_BTOK, OPT_BRUNS, OPT_JSON, OPT_NOPREFIX,
};

#define MAX_TASKS 64

typedef struct {
    const char *path, *format, *delim;
} task_arg;

typedef struct {
    const char *dir;
    char fingerprint[80];
    int has_ppl;
    moe_ppl_result ppl;
    int ntasks;
    moe_task_result tr[MAX_TASKS];
    double task_s[MAX_TASKS];
    int has_bench;
    double bench_s, tok_per_s, peak_rss_mb;
    int resident;
    uint64_t params, bytes;
} model_res;

static struct {
    const char *models[2];
    int nmodels;
    const char *ppl, *out, *dump;
    long max_length, limit, task_max, batch, btok, bruns;
    int add_bos, bench, json, no_prefix;
    task_arg tasks[MAX_TASKS];
    int ntasks;
} A = {.btok = 256, .bruns = 3};

static moe_task *tasks[MAX_TASKS];

/* ---- progress --------------------------------------------------------------- */

static void progress_cb(void *ctx, uint64_t done, uint64_t total) {
    moe_progress *p = ctx;
    if (p->total != total) p->total = total;
    moe_progress_add(p, done - p->done);
}

/* ---- peak RSS ------------------------------------------------------------- */

static void rss_reset(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f);
        fclose(f);
    }
}

static double rss_peak_mb(void) {
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

/* ---- perplexity input -------------------------------------------------------- */

static int is_zstd(const char *path) {
    FILE *f = fopen(path, "rb");
    unsigned char b[4] = {0};
    if (!f) return 0;
    size_t n = fread(b, 1, 4, f);
    fclose(f);
    return n == 4 && b[0] == 0x28 && b[1] == 0xB5 && b[2] == 0x2F && b[3] == 0xFD;
}

typedef struct {
    int32_t **ids;
    int *T;
    int n, cap;
} seqs_t;

static void seqs_add(seqs_t *s, int32_t *ids, int T) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->ids = moe_realloc(s->ids, sizeof(int32_t *) * (size_t)s->cap);
        s->T = moe_realloc(s->T, sizeof(int) * (size_t)s->cap);
    }
    s->ids[s->n] = ids;
    s->T[s->n++] = T;
}

static void seqs_free(seqs_t *s) {
    for (int i = 0; i < s->n; i++) free(s->ids[i]);
    free(s->ids);
    free(s->T);
    memset(s, 0, sizeof *s);
}

static int read_token_stream(const char *path, seqs_t *s, long limit) {
    moe_reader *r = moe_reader_open(path);
    if (!r) return -1;
    if (moe_reader_require_kind(r, "tokens", "make one with moe-tokenize") < 0) {
        moe_reader_close(r);
        return -1;
    }
    const msgpack_object *rec;
    int rc;
    while ((rc = moe_reader_next(r, &rec)) > 0) {
        if (!moe_record_is(rec, "tokens")) continue;
        if (limit > 0 && s->n >= limit) continue;
        moe_array a;
        if (moe_record_array(r, rec, "ids", &a) < 0) {
            rc = -1;
            break;
        }
        int32_t *ids = moe_malloc(sizeof(int32_t) * (size_t)(a.count + 1));
        if (moe_array_to_i32(&a, ids) < 0) {
            free(ids);
            moe_error_set(MOE_ERR_DATA, "%s: record %llu: ids out of int32 range",
                          moe_reader_name(r), (unsigned long long)moe_reader_index(r));
            rc = -1;
            break;
        }
        int T = (int)a.count;
        if (A.max_length > 0 && T > A.max_length) T = (int)A.max_length;
        seqs_add(s, ids, T);
    }
    moe_reader_close(r);
    return rc < 0 ? -1 : 0;
}

static int read_text_jsonl(const char *path, moe_tokenizer *tok, long max_length, seqs_t *s,
                           long limit) {
    FILE *f = strcmp(path, "-") ? fopen(path, "r") : stdin;
    if (!f) {
        moe_error_set(MOE_ERR_IO, "%s: %s", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int lineno = 0, rc = 0;
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (limit > 0 && s->n >= limit) break;
        char *p = line;
        while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n') p++;
        if (!*p) continue;
        json_error_t jerr;
        json_t *o = json_loads(p, 0, &jerr);
        json_t *t = json_is_object(o) ? json_object_get(o, "turns") : NULL;
        const char *text = NULL;
        size_t tl = 0;
        if (json_is_array(t) && json_is_string(json_array_get(t, 0))) t = json_array_get(t, 0);
        else t = json_is_object(o) ? json_object_get(o, "text") : NULL;
        if (json_is_string(t)) {
            text = json_string_value(t);
            tl = json_string_length(t);
        }
        if (!text) {
            moe_error_set(MOE_ERR_DATA, "%s: line %d: %s", path, lineno,
                          !o ? jerr.text : "no string \"text\" (or \"turns\"[0])");
            json_decref(o);
            rc = -1;
            break;
        }
        int32_t *ids = NULL;
        size_t n = 0;
        if (moe_tokenizer_encode_trunc(tok, text, tl, 1, max_length > 0 ? (size_t)max_length : 0,
                                       &ids, &n) < 0) {
            moe_error_set(moe_error_kind(), "%s: line %d: %s", path, lineno, moe_error());
            json_decref(o);
            rc = -1;
            break;
        }
        json_decref(o);
        seqs_add(s, ids, (int)n);
    }
    free(line);
    if (f != stdin) fclose(f);
    return rc;
}

/* ---- benchmark -------------------------------------------------------------- */

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int run_bench(moe_model *m, model_res *res, const moe_eval_opts *eo) {
    const moe_config *c = moe_model_config(m);
    int T = (int)A.btok;
    int32_t *ids = moe_malloc(sizeof(int32_t) * (size_t)(T + 1));
    uint64_t x = moe_cli.seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
    for (int i = 0; i <= T; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids[i] = (int32_t)(x % (uint64_t)c->vocab_size);
    }
    rss_reset();
    /* keep every layer resident when they fit comfortably (the timing is then
     * compute, as on a GPU holding the model); otherwise stream */
    double f32_bytes = (double)res->params * 4.0;
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    double ram = pages > 0 && psz > 0 ? (double)pages * (double)psz : 0;
    res->resident = ram == 0 || f32_bytes < 0.4 * ram;
    moe_eval_opts o = *eo;
    o.progress = NULL;
    o.keep_loaded = res->resident;
    o.batch_tokens = (size_t)T + 1;
    int rc = 0;
    if (res->resident)
        for (int l = 0; l < c->num_layers && rc == 0; l++) rc = moe_layer_load(m, l);
    moe_eval_seq q = {.ids = ids, .T = T + 1, .start = T};
    if (rc == 0) rc = moe_eval_score(m, &q, 1, &o); /* warm-up */
    int runs = (int)A.bruns;
    double *t = moe_malloc(sizeof(double) * (size_t)runs);
    for (int i = 0; i < runs && rc == 0; i++) {
        double t0 = moe_now();
        rc = moe_eval_score(m, &q, 1, &o);
        t[i] = moe_now() - t0;
    }
    if (rc == 0) {
        qsort(t, (size_t)runs, sizeof(double), cmp_d);
        res->bench_s = t[0]; /* best of the runs: the least disturbed by other load */
        res->tok_per_s = T / res->bench_s;
        res->peak_rss_mb = rss_peak_mb();
        res->has_bench = 1;
    }
    for (int l = 0; l < c->num_layers; l++) moe_layer_unload(m, l);
    free(t);
    free(ids);
    return rc;
}

/* ---- one model ----------------------------------------------------------------- */

static int eval_model(const char *dir, model_res *res) {
    memset(res, 0, sizeof *res);
    res->dir = dir;
    moe_model_opts mo = {.device = moe_cli.device};
    moe_model *m = moe_model_open(dir, &mo);
    if (!m) return -1;
    snprintf(res->fingerprint, sizeof res->fingerprint, "%s", moe_model_fingerprint(m));
    if (moe_eval_model_size(m, &res->params, &res->bytes) < 0) goto fail;
    moe_tokenizer *tok = NULL;
    int need_tok = A.ntasks > 0 || (A.ppl && !is_zstd(A.ppl));
    if (need_tok && !(tok = moe_tokenizer_open(dir))) goto fail;
    moe_eval_opts eo = {.batch_tokens = (size_t)A.batch, .no_prefix_cache = A.no_prefix};
    moe_progress prog;
    eo.progress = progress_cb;
    eo.progress_ctx = &prog;
    if (A.ppl) {
        seqs_t s = {0};
        int rc = is_zstd(A.ppl) ? read_token_stream(A.ppl, &s, A.limit)
                                : read_text_jsonl(A.ppl, tok, A.max_length, &s, A.limit);
        if (rc == 0) {
            moe_progress_start(&prog, "perplexity", "tok", 0);
            rc = moe_eval_ppl(m, (const int32_t *const *)s.ids, s.T, s.n, &eo, &res->ppl);
            moe_progress_end(&prog);
            if (rc && !strstr(moe_error(), A.ppl)) moe_error_set(moe_error_kind(), "%s: %s", A.ppl, moe_error());
        }
        seqs_free(&s);
        if (rc) goto fail_tok;
        res->has_ppl = 1;
    }
    moe_task_opts to = {.add_bos = A.add_bos, .max_length = (int)A.task_max};
    for (int i = 0; i < A.ntasks; i++) {
        moe_progress_start(&prog, tasks[i]->name, "tok", 0);
        double t0 = moe_now();
        int rc = moe_eval_task(m, tok, tasks[i], &to, &eo, &res->tr[i]);
        res->task_s[i] = moe_now() - t0;
        moe_progress_end(&prog);
        if (rc) goto fail_tok;
        res->ntasks = i + 1;
    }
    if (A.bench && run_bench(m, res, &eo) < 0) goto fail_tok;
    moe_tokenizer_close(tok);
    moe_model_close(m);
    return 0;
fail_tok:
    moe_tokenizer_close(tok);
fail:
    moe_model_close(m);
    return -1;
}

static void free_res(model_res *r) {
    moe_ppl_result_free(&r->ppl);
    for (int i = 0; i < r->ntasks; i++) moe_task_result_free(&r->tr[i]);
}

/* averages over tasks: acc over all, acc_norm over those that have it */
static void averages(const model_res *r, double *acc, double *accn) {
    double sa = 0, sn = 0;
    int na = 0, nn = 0;
    for (int i = 0; i < r->ntasks; i++) {
        sa += r->tr[i].acc;
        na++;
        if (!isnan(r->tr[i].acc_norm)) {
            sn += r->tr[i].acc_norm;
            nn++;
        }
    }
    *acc = na ? sa / na : NAN;
    *accn = nn ? sn / nn : NAN;
}

/* ---- output: table ------------------------------------------------------------- */

static void cell(double v, const char *fmt) {
    if (isnan(v)) printf(" %14s", "-");
    else {
        char b[64];
        snprintf(b, sizeof b, fmt, v);
        printf(" %14s", b);
    }
}

static void print_table(model_res *R, int n) {
    printf("%-28s", "model");
    for (int k = 0; k < n; k++) printf(" %14s", k == 0 ? (n > 1 ? "model 1" : "value") : "model 2");
    printf("\n");
    for (int k = 0; k < n; k++) printf("  model %d: %s\n", k + 1, R[k].dir);
    if (R[0].has_ppl) {
        printf("%-28s", "ppl (CD-MoE: mean/sample)");
        for (int k = 0; k < n; k++) cell(R[k].ppl.ppl, "%.4f");
        printf("\n%-28s", "ppl (token-weighted)");
        for (int k = 0; k < n; k++) cell(R[k].ppl.ppl_token, "%.4f");
        printf("\n%-28s", "ppl samples / tokens");
        for (int k = 0; k < n; k++) {
            char b[64];
            snprintf(b, sizeof b, "%lld/%lld", (long long)R[k].ppl.n_samples,
                     (long long)R[k].ppl.n_tokens);
            printf(" %14s", b);
        }
        printf("\n");
        if (R[0].ppl.n_skipped) printf("  (%lld samples under 2 tokens skipped)\n",
                                       (long long)R[0].ppl.n_skipped);
    }
    for (int i = 0; i < A.ntasks; i++) {
        char lab[64];
        snprintf(lab, sizeof lab, "%s acc (n=%d)", tasks[i]->name, tasks[i]->n_items);
        printf("%-28s", lab);
        for (int k = 0; k < n; k++) cell(R[k].tr[i].acc, "%.4f");
        printf("\n");
        if (tasks[i]->has_acc_norm) {
            snprintf(lab, sizeof lab, "%s acc_norm", tasks[i]->name);
            printf("%-28s", lab);
            for (int k = 0; k < n; k++) cell(R[k].tr[i].acc_norm, "%.4f");
            printf("\n");
        }
        if (tasks[i]->kind == MOE_TASK_LM) {
            snprintf(lab, sizeof lab, "%s perplexity", tasks[i]->name);
            printf("%-28s", lab);
            for (int k = 0; k < n; k++) cell(R[k].tr[i].perplexity, "%.4f");
            printf("\n");
        }
    }
    if (A.ntasks > 1) {
        double a[2], an[2];
        for (int k = 0; k < n; k++) averages(&R[k], &a[k], &an[k]);
        printf("%-28s", "average acc");
        for (int k = 0; k < n; k++) cell(a[k], "%.4f");
        printf("\n%-28s", "average acc_norm");
        for (int k = 0; k < n; k++) cell(an[k], "%.4f");
        printf("\n");
    }
    printf("%-28s", "parameters");
    for (int k = 0; k < n; k++) cell((double)R[k].params, "%.0f");
    printf("\n%-28s", "weight bytes");
    for (int k = 0; k < n; k++) cell((double)R[k].bytes, "%.0f");
    printf("\n");
    if (A.bench) {
        printf("%-28s", "prefill tokens/s");
        for (int k = 0; k < n; k++) cell(R[k].tok_per_s, "%.1f");
        printf("\n%-28s", "prefill seconds (best)");
        for (int k = 0; k < n; k++) cell(R[k].bench_s, "%.4f");
        printf("\n%-28s", "peak RSS MiB (bench)");
        for (int k = 0; k < n; k++) cell(R[k].peak_rss_mb, "%.1f");
        printf("\n%-28s", "weights");
        for (int k = 0; k < n; k++) printf(" %14s", R[k].resident ? "resident" : "streamed");
        printf("\n");
    }
    if (n == 2) {
        printf("%-28s", "memory ratio (params)");
        cell((double)R[1].params / (double)R[0].params, "%.4f");
        printf("\n%-28s", "memory ratio (bytes)");
        cell((double)R[1].bytes / (double)R[0].bytes, "%.4f");
        printf("\n");
        if (A.bench) {
            printf("%-28s", "speedup (model 2 vs 1)");
            cell(R[0].bench_s / R[1].bench_s, "%.3f");
            printf("\n");
        }
    }
}

/* ---- output: JSON -------------------------------------------------------------- */

static void jkv(const char *k, double v, int comma) {
    printf("%s\"%s\": ", comma ? ", " : "", k);
    moe_json_number(stdout, v, 0);
}

static void print_json(model_res *R, int n) {
    printf("{\"models\": [");
    for (int k = 0; k < n; k++) {
        model_res *r = &R[k];
        printf("%s{\"dir\": ", k ? ", " : "");
        moe_json_string(stdout, r->dir, strlen(r->dir));
        printf(", \"fingerprint\": \"%s\"", r->fingerprint);
        printf(", \"params\": %llu, \"bytes\": %llu", (unsigned long long)r->params,
               (unsigned long long)r->bytes);
        if (r->has_ppl) {
            printf(", \"ppl\": {");
            jkv("ppl", r->ppl.ppl, 0);
            jkv("ppl_token", r->ppl.ppl_token, 1);
            jkv("mean_nll", r->ppl.mean_nll, 1);
            jkv("token_nll", r->ppl.token_nll, 1);
            printf(", \"samples\": %lld, \"skipped\": %lld, \"tokens\": %lld}",
                   (long long)r->ppl.n_samples, (long long)r->ppl.n_skipped,
                   (long long)r->ppl.n_tokens);
        }
        printf(", \"tasks\": [");
        for (int i = 0; i < r->ntasks; i++) {
            printf("%s{\"task\": ", i ? ", " : "");
            moe_json_string(stdout, tasks[i]->name, strlen(tasks[i]->name));
            printf(", \"format\": \"%s\", \"items\": %d", tasks[i]->format, tasks[i]->n_items);
            jkv("acc", r->tr[i].acc, 1);
            if (tasks[i]->has_acc_norm) jkv("acc_norm", r->tr[i].acc_norm, 1);
            if (tasks[i]->kind == MOE_TASK_LM) jkv("perplexity", r->tr[i].perplexity, 1);
            printf(", \"tokens\": %lld, \"tokens_run\": %lld", (long long)r->tr[i].n_tokens,
                   (long long)r->tr[i].n_tokens_run);
            jkv("seconds", r->task_s[i], 1);
            printf("}");
        }
        printf("]");
        if (r->ntasks) {
            double a, an;
            averages(r, &a, &an);
            printf(", \"average\": {");
            jkv("acc", a, 0);
            jkv("acc_norm", an, 1);
            printf("}");
        }
        if (r->has_bench) {
            printf(", \"bench\": {\"tokens\": %ld, \"runs\": %ld", A.btok, A.bruns);
            jkv("seconds", r->bench_s, 1);
            jkv("tokens_per_s", r->tok_per_s, 1);
            jkv("peak_rss_mib", r->peak_rss_mb, 1);
            printf(", \"weights\": \"%s\"}", r->resident ? "resident" : "streamed");
        }
        printf("}");
    }
    printf("]");
    if (n == 2) {
        printf(", \"compare\": {");
        jkv("memory_ratio_params", (double)R[1].params / (double)R[0].params, 0);
        jkv("memory_ratio_bytes", (double)R[1].bytes / (double)R[0].bytes, 1);
        if (A.bench) jkv("speedup", R[0].bench_s / R[1].bench_s, 1);
        printf("}");
    }
    printf("}\n");
}

/* ---- output: stream ------------------------------------------------------------ */

static int write_stream(model_res *R, int n, int argc, char **argv) {
    moe_provenance prov = {"moe-eval", argc, argv, R[0].fingerprint, "eval"};
    moe_writer *w = moe_writer_open(A.out, NULL, &prov, moe_cli.no_provenance);
    if (!w) return -1;
    for (int k = 0; k < n; k++) {
        model_res *r = &R[k];
        msgpack_packer *pk = moe_writer_record(w, "model", 5);
        moe_pack_kv_int(pk, "model_index", k);
        moe_pack_kv_str(pk, "dir", r->dir);
        moe_pack_kv_str(pk, "fingerprint", r->fingerprint);
        moe_pack_kv_int(pk, "params", (int64_t)r->params);
        moe_pack_kv_int(pk, "bytes", (int64_t)r->bytes);
        if (r->has_ppl) {
            pk = moe_writer_record(w, "ppl", 9);
            moe_pack_kv_int(pk, "model_index", k);
            moe_pack_kv_double(pk, "ppl", r->ppl.ppl);
            moe_pack_kv_double(pk, "ppl_token", r->ppl.ppl_token);
            moe_pack_kv_double(pk, "mean_nll", r->ppl.mean_nll);
            moe_pack_kv_double(pk, "token_nll", r->ppl.token_nll);
            moe_pack_kv_int(pk, "samples", r->ppl.n_samples);
            moe_pack_kv_int(pk, "tokens", r->ppl.n_tokens);
            int64_t sh[1] = {r->ppl.n};
            moe_pack_kv_array(pk, "sample_nll", MOE_DT_F64, 1, sh, r->ppl.sample_nll);
            moe_pack_kv_array(pk, "sample_tokens", MOE_DT_I32, 1, sh, r->ppl.sample_tokens);
        }
        for (int i = 0; i < r->ntasks; i++) {
            moe_task_result *t = &r->tr[i];
            int lm = tasks[i]->kind == MOE_TASK_LM, nn = tasks[i]->has_acc_norm;
            pk = moe_writer_record(w, "task", 8 + nn + lm);
            moe_pack_kv_int(pk, "model_index", k);
            moe_pack_kv_str(pk, "task", tasks[i]->name);
            moe_pack_kv_str(pk, "format", tasks[i]->format);
            moe_pack_kv_int(pk, "items", t->n_items);
            moe_pack_kv_double(pk, "acc", t->acc);
            if (nn) moe_pack_kv_double(pk, "acc_norm", t->acc_norm);
            if (lm) moe_pack_kv_double(pk, "perplexity", t->perplexity);
            int64_t sc[1] = {t->choice_off[t->n_items]}, si[1] = {t->n_items + 1},
                    sp[1] = {t->n_items};
            moe_pack_kv_array(pk, "loglik", MOE_DT_F64, 1, sc, t->loglik);
            moe_pack_kv_array(pk, "choice_offsets", MOE_DT_I32, 1, si, t->choice_off);
            moe_pack_kv_array(pk, "pred", MOE_DT_I32, 1, sp, t->pred);
        }
        if (r->has_bench) {
            pk = moe_writer_record(w, "bench", 7);
            moe_pack_kv_int(pk, "model_index", k);
            moe_pack_kv_int(pk, "tokens", A.btok);
            moe_pack_kv_int(pk, "runs", A.bruns);
            moe_pack_kv_double(pk, "seconds", r->bench_s);
            moe_pack_kv_double(pk, "tokens_per_s", r->tok_per_s);
            moe_pack_kv_double(pk, "peak_rss_mib", r->peak_rss_mb);
            moe_pack_kv_str(pk, "weights", r->resident ? "resident" : "streamed");
        }
    }
    if (n == 2) {
        msgpack_packer *pk = moe_writer_record(w, "compare", 2 + (A.bench ? 1 : 0));
        moe_pack_kv_double(pk, "memory_ratio_params", (double)R[1].params / (double)R[0].params);
        moe_pack_kv_double(pk, "memory_ratio_bytes", (double)R[1].bytes / (double)R[0].bytes);
        if (A.bench) moe_pack_kv_double(pk, "speedup", R[0].bench_s / R[1].bench_s);
    }
    return moe_writer_close(w);
}

static int known_format(const char *f) {
    static const char *k[] = {"mc", "schema", "lm", "piqa", "winogrande", "hellaswag", "rte"};
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++)
        if (!strcmp(f, k[i])) return 1;
    return 0;
}

/* ---- dump (lib/evaldump) -------------------------------------------------------- */

static int run_dump(int argc, char **argv) {
    moe_dump_opts d = {.max_length = (int)A.max_length, .batch_tokens = (size_t)A.batch};
    if (moe_dump_parse_what(A.dump, &d) < 0) moe_cli_usage("%s", moe_error());
    if (argc - optind > 1) moe_cli_usage("one TOKENS stream at most");
    const char *in = optind < argc ? argv[optind] : "-";
    moe_model_opts mo = {.device = moe_cli.device};
    moe_model *m = moe_model_open(A.models[0], &mo);
    if (!m) moe_cli_fail();
    moe_reader *r = moe_reader_open(in);
    if (!r) moe_cli_fail();
    if (moe_reader_require_kind(r, "tokens", "make one with moe-tokenize") < 0) moe_cli_fail();
    if (moe_reader_check_model(r, moe_model_fingerprint(m), moe_cli.force) < 0) moe_cli_fail();
    moe_provenance prov = {.tool = "moe-eval", .argc = argc, .argv = argv,
                           .model = moe_model_fingerprint(m), .kind = "dump"};
    moe_writer *w = moe_writer_open(A.out ? A.out : "-", moe_reader_header(r), &prov,
                                    moe_cli.no_provenance);
    if (!w) moe_cli_fail();
    if (moe_eval_dump(m, r, w, &d) < 0) {
        moe_writer_abort(w);
        moe_cli_fail();
    }
    if (moe_writer_close(w) < 0) moe_cli_fail();
    moe_reader_close(r);
    moe_model_close(m);
    return 0;
}

/* ---- main ------------------------------------------------------------------ */

int main(int argc, char **argv) {
    moe_cli_init("moe-eval", help, argc, argv);
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},
        {"ppl", required_argument, 0, OPT_PPL},
        {"max-length", required_argument, 0, OPT_MAXLEN},
        {"task", required_argument, 0, OPT_TASK},
        {"task-format", required_argument, 0, OPT_TASKFMT},
        {"delimiter", required_argument, 0, OPT_DELIM},
        {"limit", required_argument, 0, OPT_LIMIT},
        {"add-bos", no_argument, 0, OPT_ADDBOS},
        {"task-max-length", required_argument, 0, OPT_TASKMAX},
        {"batch-tokens", required_argument, 0, OPT_BATCH},
        {"bench", no_argument, 0, OPT_BENCH},
        {"bench-tokens", required_argument, 0, OPT_BTOK},
        {"bench-runs", required_argument, 0, OPT_BRUNS},
        {"json", no_argument, 0, OPT_JSON},
        {"no-prefix-cache", no_argument, 0, OPT_NOPREFIX},
        {"dump", required_argument, 0, 'd'},
        {"output", required_argument, 0, 'o'},
        MOE_CLI_COMMON_OPTIONS,
        {0, 0, 0, 0}};
    const char *cur_fmt = NULL, *cur_delim = NULL;
    int c;
    while ((c = getopt_long(argc, argv, ":m:d:o:", opts, NULL)) != -1) {
        if (moe_cli_handle(c, optarg)) continue;
        switch (c) {
        case 'm':
            if (A.nmodels == 2) moe_cli_usage("--model: at most two models");
            A.models[A.nmodels++] = optarg;
            break;
        case OPT_PPL: A.ppl = optarg; break;
        case OPT_MAXLEN: A.max_length = moe_cli_long("--max-length", optarg, 0, 1L << 30); break;
        case OPT_TASK:
            if (A.ntasks == MAX_TASKS) moe_cli_usage("--task: at most %d", MAX_TASKS);
            A.tasks[A.ntasks++] = (task_arg){optarg, cur_fmt, cur_delim};
            break;
        case OPT_TASKFMT:
            cur_fmt = strcmp(optarg, "auto") ? optarg : NULL;
            if (cur_fmt && !known_format(cur_fmt))
                moe_cli_usage("--task-format: '%s' unknown (auto, %s)", optarg, moe_task_formats());
            break;
        case OPT_DELIM: cur_delim = optarg; break;
        case OPT_LIMIT: A.limit = moe_cli_long("--limit", optarg, 1, 1L << 40); break;
        case OPT_ADDBOS: A.add_bos = 1; break;
        case OPT_TASKMAX: A.task_max = moe_cli_long("--task-max-length", optarg, 1, 1L << 30); break;
        case OPT_BATCH: A.batch = moe_cli_long("--batch-tokens", optarg, 1, 1L << 30); break;
        case OPT_BENCH: A.bench = 1; break;
        case OPT_BTOK: A.btok = moe_cli_long("--bench-tokens", optarg, 1, 1L << 20); break;
        case OPT_BRUNS: A.bruns = moe_cli_long("--bench-runs", optarg, 1, 1000); break;
        case OPT_JSON: A.json = 1; break;
        case OPT_NOPREFIX: A.no_prefix = 1; break;
        case 'd': A.dump = optarg; break;
        case 'o': A.out = optarg; break;
        case ':': moe_cli_usage("option '%s' needs a value", argv[optind - 1]);
        default: moe_cli_usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (A.nmodels == 0) moe_cli_usage("--model DIR is required");
    moe_model_set_threads(moe_cli.threads);
    if (A.dump) {
        if (A.ppl || A.ntasks || A.bench || A.nmodels > 1)
            moe_cli_usage("--dump runs alone (one --model, a token stream)");
        return run_dump(argc, argv);
    }
    if (optind < argc) moe_cli_usage("unexpected argument '%s'", argv[optind]);
    if (!A.ppl && !A.ntasks && !A.bench)
        moe_cli_usage("nothing to do: give --ppl, --task, --bench or --dump");
    for (int i = 0; i < A.ntasks; i++)
        if (!(tasks[i] = moe_task_load(A.tasks[i].path, A.tasks[i].format, A.tasks[i].delim,
                                       A.limit)))
            moe_cli_fail();
    /* --ppl -: spool standard input to a temporary file (sniffed for a token
       stream, and read once per model) */
    char *spool = NULL;
    if (A.ppl && !strcmp(A.ppl, "-")) {
        const char *dir = getenv("TMPDIR");
        char *base = NULL;
        if (asprintf(&base, "%s/moe-eval-stdin", dir && *dir ? dir : "/tmp") < 0) base = NULL;
        spool = moe_tmp_path(base ? base : "/tmp/moe-eval-stdin");
        free(base);
        moe_tmp_register(spool);
        FILE *f = fopen(spool, "wb");
        if (!f) {
            moe_error_set(MOE_ERR_IO, "%s: %s", spool, strerror(errno));
            moe_cli_fail();
        }
        char buf[1 << 16];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, stdin)) > 0)
            if (fwrite(buf, 1, n, f) != n) break;
        if (ferror(stdin) || fclose(f) != 0) {
            moe_error_set(MOE_ERR_IO, "<stdin>: cannot spool to %s", spool);
            moe_cli_fail();
        }
        A.ppl = spool;
    }
    /* two files with the same task name: the later ones get "/format" */
    for (int i = 0; i < A.ntasks; i++)
        for (int j = 0; j < i; j++)
            if (!strcmp(tasks[i]->name, tasks[j]->name)) {
                char *n = NULL;
                if (asprintf(&n, "%s/%s", tasks[i]->name, tasks[i]->format) < 0) n = NULL;
                if (n) {
                    free(tasks[i]->name);
                    tasks[i]->name = n;
                }
                break;
            }
    static model_res R[2];
    for (int k = 0; k < A.nmodels; k++)
        if (eval_model(A.models[k], &R[k]) < 0) moe_cli_fail();
    if (A.out && write_stream(R, A.nmodels, argc, argv) < 0) moe_cli_fail();
    if (!A.out || strcmp(A.out, "-")) {
        if (A.json) print_json(R, A.nmodels);
        else print_table(R, A.nmodels);
    }
    if (spool) {
        moe_tmp_discard(spool);
        free(spool);
    }
    for (int k = 0; k < A.nmodels; k++) free_res(&R[k]);
    for (int i = 0; i < A.ntasks; i++) moe_task_free(tasks[i]);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        moe_error_set(MOE_ERR_IO, "<stdout>: write error");
        moe_cli_fail();
    }
    return 0;
}
