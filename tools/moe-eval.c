/* moe-eval - perplexity, multiple-choice tasks (lm-evaluation-harness style),
 * prefill benchmark, and forward dumps (hidden states, logits). */
#define _GNU_SOURCE
#include "bench.h"
#include "cli.h"
#include "eval.h"
#include "evaldump.h"
#include "host.h"
#include "jsonl.h"
#include "jsonout.h"
#include "model.h"
#include "stream.h"
#include "tokenizer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* The command line, and the tasks it names once loaded. */
typedef struct {
    const char *models[2];
    int nmodels;
    const char *ppl, *out, *dump;
    const char *ppl_name; /* for messages: "<stdin>" when --ppl - was spooled */
    long max_length, limit, task_max, batch;
    int add_bos, bench, json, no_prefix;
    moe_bench_opts bench_opts;
    task_arg task_args[MAX_TASKS];
    int ntasks;
    moe_task *tasks[MAX_TASKS];
} eval_args;

typedef struct {
    const char *dir;
    char fingerprint[80];
    int has_ppl;
    moe_ppl_result ppl;
    int ntasks;
    moe_task_result tr[MAX_TASKS];
    double task_s[MAX_TASKS];
    int has_bench;
    moe_bench_result bench;
    uint64_t params, bytes, active;
} model_res;

/* ---- progress --------------------------------------------------------------- */

static void progress_cb(void *ctx, uint64_t done, uint64_t total) {
    moe_progress *p = ctx;
    if (p->total != total) p->total = total;
    moe_progress_add(p, done - p->done);
}

/* ---- perplexity input -------------------------------------------------------- */

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

/* The token stream at path, made with the tokenizer of model dir. */
static int read_token_stream(const char *path, const char *dir, long max_length, long limit, seqs_t *s) {
    moe_tokens_check check;
    if (moe_tokens_check_init(&check, dir, moe_cli.force) < 0) return -1;
    moe_reader *r = moe_reader_open(path);
    if (!r) return -1;
    if (moe_reader_require_kind(r, MOE_REC_TOKENS, "make one with moe-tokenize") < 0) {
        moe_reader_close(r);
        return -1;
    }
    const msgpack_object *rec;
    int rc;
    while ((rc = moe_reader_next(r, &rec)) > 0) {
        if (!moe_record_is(rec, MOE_REC_TOKENS)) continue;
        if (limit > 0 && s->n >= limit) continue;
        moe_tokens tk;
        if (moe_tokens_read(r, rec, &check, &tk) < 0) {
            rc = -1;
            break;
        }
        int T = (int)tk.n;
        if (max_length > 0 && T > max_length) T = (int)max_length;
        seqs_add(s, tk.ids, T);
    }
    moe_reader_close(r);
    return rc < 0 ? -1 : 0;
}

/* name: the input as messages call it */
static int read_text_jsonl(const char *path, const char *name, moe_tokenizer *tok, long max_length,
                           long limit, seqs_t *s) {
    moe_jsonl *r = moe_jsonl_open(path);
    if (!r) return -1;
    const char *line;
    size_t len;
    int rc;
    while ((rc = moe_jsonl_next(r, &line, &len)) > 0) {
        if (limit > 0 && s->n >= limit) break;
        if (moe_jsonl_blank(line, len)) continue;
        uint64_t lineno = moe_jsonl_lineno(r);
        json_t *o;
        const char *text;
        size_t tl;
        int32_t *ids = NULL;
        size_t n = 0;
        if (moe_jsonl_text(name, lineno, line, len, "text", 1, &o, &text, &tl) < 0) rc = -1;
        else if (moe_tokenizer_encode_trunc(tok, text, tl, 1, max_length > 0 ? (size_t)max_length : 0, &ids,
                                            &n) < 0) {
            moe_jsonl_error_at(name, lineno);
            rc = -1;
        }
        json_decref(o);
        if (rc < 0) break;
        seqs_add(s, ids, (int)n);
    }
    moe_jsonl_close(r);
    return rc < 0 ? -1 : 0;
}

/* The --ppl sequences: a token stream, or JSON Lines tokenized with tok. */
static int read_ppl_input(const eval_args *a, const char *dir, moe_tokenizer *tok, seqs_t *s) {
    return moe_file_is_zstd(a->ppl) ? read_token_stream(a->ppl, dir, a->max_length, a->limit, s)
                           : read_text_jsonl(a->ppl, a->ppl_name, tok, a->max_length, a->limit, s);
}

/* ---- one model ----------------------------------------------------------------- */

static int eval_model(const eval_args *a, const char *dir, model_res *res) {
    memset(res, 0, sizeof *res);
    res->dir = dir;
    moe_model_opts mo = {.device = moe_cli.device, .precision = moe_cli.precision};
    moe_model_opts_from_env(&mo);
    moe_model *m = moe_model_open(dir, &mo);
    if (!m) return -1;
    snprintf(res->fingerprint, sizeof res->fingerprint, "%s", moe_model_fingerprint(m));
    if (moe_eval_model_size(m, &res->params, &res->bytes) < 0) goto fail;
    res->active = moe_eval_active_params(moe_model_config(m));
    moe_tokenizer *tok = NULL;
    int need_tok = a->ntasks > 0 || (a->ppl && !moe_file_is_zstd(a->ppl));
    if (need_tok && !(tok = moe_tokenizer_open(dir))) goto fail;
    moe_eval_opts eo = {.batch_tokens = (size_t)a->batch, .no_prefix_cache = a->no_prefix};
    moe_progress prog;
    eo.progress = progress_cb;
    eo.progress_ctx = &prog;
    if (a->ppl) {
        seqs_t s = {0};
        int rc = read_ppl_input(a, dir, tok, &s);
        if (rc == 0) {
            moe_progress_start(&prog, "perplexity", "tok", 0);
            rc = moe_eval_ppl(m, (const int32_t *const *)s.ids, s.T, s.n, &eo, &res->ppl);
            moe_progress_end(&prog);
            if (rc && !strstr(moe_error(), a->ppl_name)) moe_error_set(moe_error_kind(), "%s: %s", a->ppl_name, moe_error());
        }
        seqs_free(&s);
        if (rc) goto fail_tok;
        res->has_ppl = 1;
    }
    moe_task_opts to = {.add_bos = a->add_bos, .max_length = (int)a->task_max};
    for (int i = 0; i < a->ntasks; i++) {
        moe_progress_start(&prog, a->tasks[i]->name, "tok", 0);
        double t0 = moe_now();
        int rc = moe_eval_task(m, tok, a->tasks[i], &to, &eo, &res->tr[i]);
        res->task_s[i] = moe_now() - t0;
        moe_progress_end(&prog);
        if (rc) goto fail_tok;
        res->ntasks = i + 1;
    }
    if (a->bench) {
        if (moe_bench_prefill(m, res->params, &a->bench_opts, &eo, &res->bench) < 0) goto fail_tok;
        res->has_bench = 1;
    }
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

static void print_table(const eval_args *a, const model_res *R, int n) {
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
    for (int i = 0; i < a->ntasks; i++) {
        char lab[64];
        snprintf(lab, sizeof lab, "%s acc (n=%d)", a->tasks[i]->name, a->tasks[i]->n_items);
        printf("%-28s", lab);
        for (int k = 0; k < n; k++) cell(R[k].tr[i].acc, "%.4f");
        printf("\n");
        if (a->tasks[i]->has_acc_norm) {
            snprintf(lab, sizeof lab, "%s acc_norm", a->tasks[i]->name);
            printf("%-28s", lab);
            for (int k = 0; k < n; k++) cell(R[k].tr[i].acc_norm, "%.4f");
            printf("\n");
        }
        if (a->tasks[i]->kind == MOE_TASK_LM) {
            snprintf(lab, sizeof lab, "%s perplexity", a->tasks[i]->name);
            printf("%-28s", lab);
            for (int k = 0; k < n; k++) cell(R[k].tr[i].perplexity, "%.4f");
            printf("\n");
        }
    }
    if (a->ntasks > 1) {
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
    printf("\n%-28s", "active params / token");
    for (int k = 0; k < n; k++) cell((double)R[k].active, "%.0f");
    printf("\n");
    if (a->bench) {
        printf("%-28s", "prefill tokens/s");
        for (int k = 0; k < n; k++) cell(R[k].bench.tok_per_s, "%.1f");
        printf("\n%-28s", "prefill seconds (best)");
        for (int k = 0; k < n; k++) cell(R[k].bench.seconds, "%.4f");
        printf("\n%-28s", "peak RSS MiB (bench)");
        for (int k = 0; k < n; k++) cell(R[k].bench.peak_rss_mib, "%.1f");
        printf("\n%-28s", "weights");
        for (int k = 0; k < n; k++) printf(" %14s", R[k].bench.resident ? "resident" : "streamed");
        printf("\n");
    }
    if (n == 2) {
        printf("%-28s", "memory ratio (params)");
        cell((double)R[1].params / (double)R[0].params, "%.4f");
        printf("\n%-28s", "memory ratio (bytes)");
        cell((double)R[1].bytes / (double)R[0].bytes, "%.4f");
        printf("\n");
        if (a->bench) {
            printf("%-28s", "speedup (model 2 vs 1)");
            cell(R[0].bench.seconds / R[1].bench.seconds, "%.3f");
            printf("\n");
        }
    }
}

/* ---- output: JSON -------------------------------------------------------------- */

static void jkv(const char *k, double v, int comma) {
    printf("%s\"%s\": ", comma ? ", " : "", k);
    moe_json_number(stdout, v, 0);
}

static void print_json(const eval_args *a, const model_res *R, int n) {
    printf("{\"models\": [");
    for (int k = 0; k < n; k++) {
        const model_res *r = &R[k];
        printf("%s{\"dir\": ", k ? ", " : "");
        moe_json_string(stdout, r->dir, strlen(r->dir));
        printf(", \"fingerprint\": \"%s\"", r->fingerprint);
        printf(", \"params\": %llu, \"bytes\": %llu, \"active_params\": %llu", (unsigned long long)r->params,
               (unsigned long long)r->bytes, (unsigned long long)r->active);
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
            moe_json_string(stdout, a->tasks[i]->name, strlen(a->tasks[i]->name));
            printf(", \"format\": \"%s\", \"items\": %d", a->tasks[i]->format, a->tasks[i]->n_items);
            jkv("acc", r->tr[i].acc, 1);
            if (a->tasks[i]->has_acc_norm) jkv("acc_norm", r->tr[i].acc_norm, 1);
            if (a->tasks[i]->kind == MOE_TASK_LM) jkv("perplexity", r->tr[i].perplexity, 1);
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
            printf(", \"bench\": {\"tokens\": %d, \"runs\": %d", a->bench_opts.tokens, a->bench_opts.runs);
            jkv("seconds", r->bench.seconds, 1);
            jkv("tokens_per_s", r->bench.tok_per_s, 1);
            jkv("peak_rss_mib", r->bench.peak_rss_mib, 1);
            printf(", \"weights\": \"%s\"}", r->bench.resident ? "resident" : "streamed");
        }
        printf("}");
    }
    printf("]");
    if (n == 2) {
        printf(", \"compare\": {");
        jkv("memory_ratio_params", (double)R[1].params / (double)R[0].params, 0);
        jkv("memory_ratio_bytes", (double)R[1].bytes / (double)R[0].bytes, 1);
        jkv("active_ratio", (double)R[1].active / (double)R[0].active, 1);
        if (a->bench) jkv("speedup", R[0].bench.seconds / R[1].bench.seconds, 1);
        printf("}");
    }
    printf("}\n");
}

/* ---- output: stream ------------------------------------------------------------ */

/* model k's results as the records module wants them */
static moe_eval_record eval_record(const eval_args *a, const model_res *r) {
    moe_eval_record e = {.dir = r->dir, .fingerprint = r->fingerprint, .params = r->params, .bytes = r->bytes,
                         .active = r->active,
                         .ppl = r->has_ppl ? &r->ppl : NULL, .ntasks = r->ntasks, .tasks = a->tasks,
                         .task = r->tr, .has_bench = r->has_bench, .bench_tokens = a->bench_opts.tokens,
                         .bench_runs = a->bench_opts.runs, .bench_s = r->bench.seconds,
                         .tok_per_s = r->bench.tok_per_s, .peak_rss_mib = r->bench.peak_rss_mib,
                         .resident = r->bench.resident};
    return e;
}

static int write_stream(const eval_args *a, const model_res *R, int n, int argc, char **argv) {
    moe_provenance prov = {"moe-eval", argc, argv, R[0].fingerprint, "eval"};
    moe_writer *w = moe_writer_open(a->out, NULL, &prov, moe_cli.no_provenance);
    if (!w) return -1;
    int rc = 0;
    for (int k = 0; k < n && rc == 0; k++) {
        moe_eval_record e = eval_record(a, &R[k]);
        rc = moe_eval_write(w, k, &e);
    }
    if (rc == 0 && n == 2) {
        moe_eval_record d = eval_record(a, &R[0]), c = eval_record(a, &R[1]);
        rc = moe_eval_compare_write(w, &d, &c, a->bench);
    }
    if (rc < 0) {
        moe_writer_abort(w);
        return -1;
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

static int run_dump(const eval_args *a, int argc, char **argv) {
    moe_tokens_check check;
    moe_dump_opts d = {.max_length = (int)a->max_length, .batch_tokens = (size_t)a->batch, .tokenizer = &check};
    if (moe_dump_parse_what(a->dump, &d) < 0) moe_cli_usage("%s", moe_error());
    if (argc - optind > 1) moe_cli_usage("one TOKENS stream at most");
    const char *in = optind < argc ? argv[optind] : "-";
    moe_model_opts mo = {.device = moe_cli.device, .precision = moe_cli.precision};
    moe_model_opts_from_env(&mo);
    moe_model *m = moe_model_open(a->models[0], &mo);
    if (!m) moe_cli_fail();
    moe_reader *r = moe_reader_open(in);
    if (!r) moe_cli_fail();
    if (moe_reader_require_kind(r, "tokens", "make one with moe-tokenize") < 0) moe_cli_fail();
    if (moe_reader_check_model(r, moe_model_fingerprint(m), moe_cli.force) < 0) moe_cli_fail();
    if (moe_tokens_check_init(&check, a->models[0], moe_cli.force) < 0) moe_cli_fail();
    moe_provenance prov = {.tool = "moe-eval", .argc = argc, .argv = argv,
                           .model = moe_model_fingerprint(m), .kind = "dump"};
    moe_writer *w = moe_writer_open(a->out ? a->out : "-", moe_reader_header(r), &prov,
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

/* ---- command line ------------------------------------------------------------ */

static void parse_args(int argc, char **argv, eval_args *a) {
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
            if (a->nmodels == 2) moe_cli_usage("--model: at most two models");
            a->models[a->nmodels++] = optarg;
            break;
        case OPT_PPL: a->ppl = a->ppl_name = optarg; break;
        case OPT_MAXLEN: a->max_length = moe_cli_long("--max-length", optarg, 0, 1L << 30); break;
        case OPT_TASK:
            if (a->ntasks == MAX_TASKS) moe_cli_usage("--task: at most %d", MAX_TASKS);
            a->task_args[a->ntasks++] = (task_arg){optarg, cur_fmt, cur_delim};
            break;
        case OPT_TASKFMT:
            cur_fmt = strcmp(optarg, "auto") ? optarg : NULL;
            if (cur_fmt && !known_format(cur_fmt))
                moe_cli_usage("--task-format: '%s' unknown (auto, %s)", optarg, moe_task_formats());
            break;
        case OPT_DELIM: cur_delim = optarg; break;
        case OPT_LIMIT: a->limit = moe_cli_long("--limit", optarg, 1, 1L << 40); break;
        case OPT_ADDBOS: a->add_bos = 1; break;
        case OPT_TASKMAX: a->task_max = moe_cli_long("--task-max-length", optarg, 1, 1L << 30); break;
        case OPT_BATCH: a->batch = moe_cli_long("--batch-tokens", optarg, 1, 1L << 30); break;
        case OPT_BENCH: a->bench = 1; break;
        case OPT_BTOK: a->bench_opts.tokens = (int)moe_cli_long("--bench-tokens", optarg, 1, 1L << 20); break;
        case OPT_BRUNS: a->bench_opts.runs = (int)moe_cli_long("--bench-runs", optarg, 1, 1000); break;
        case OPT_JSON: a->json = 1; break;
        case OPT_NOPREFIX: a->no_prefix = 1; break;
        case 'd': a->dump = optarg; break;
        case 'o': a->out = optarg; break;
        case ':': moe_cli_usage("option '%s' needs a value", argv[optind - 1]);
        default: moe_cli_usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    a->bench_opts.seed = moe_cli.seed;
    if (a->nmodels == 0) moe_cli_usage("--model DIR is required");
    if (a->dump && (a->ppl || a->ntasks || a->bench || a->nmodels > 1))
        moe_cli_usage("--dump runs alone (one --model, a token stream)");
    if (a->dump) return;
    if (optind < argc) moe_cli_usage("unexpected argument '%s'", argv[optind]);
    if (!a->ppl && !a->ntasks && !a->bench)
        moe_cli_usage("nothing to do: give --ppl, --task, --bench or --dump");
}

/* Load the task files; two with the same task name: the later ones get
 * "/format".  0 or -1. */
static int load_tasks(eval_args *a) {
    for (int i = 0; i < a->ntasks; i++) {
        const task_arg *t = &a->task_args[i];
        if (!(a->tasks[i] = moe_task_load(t->path, t->format, t->delim, a->limit))) return -1;
        for (int j = 0; j < i; j++)
            if (!strcmp(a->tasks[i]->name, a->tasks[j]->name)) {
                char *n = NULL;
                if (asprintf(&n, "%s/%s", a->tasks[i]->name, a->tasks[i]->format) < 0) n = NULL;
                if (n) {
                    free(a->tasks[i]->name);
                    a->tasks[i]->name = n;
                }
                break;
            }
    }
    return 0;
}

/* ---- main ------------------------------------------------------------------ */

int main(int argc, char **argv) {
    const unsigned takes = MOE_CLI_TAKES_THREADS | MOE_CLI_TAKES_DEVICE | MOE_CLI_TAKES_SEED |
                           MOE_CLI_TAKES_FORCE | MOE_CLI_TAKES_NO_PROVENANCE | MOE_CLI_TAKES_QUIET;
    moe_cli_init("moe-eval", help, takes, argc, argv);
    eval_args a = {.bench_opts = {.tokens = 256, .runs = 3}};
    parse_args(argc, argv, &a);
    if (a.dump) return run_dump(&a, argc, argv);
    if (load_tasks(&a) < 0) moe_cli_fail();
    /* --ppl -: standard input spooled to a temporary file (sniffed for a
       token stream, and read once per model) */
    char *spool = NULL;
    if (a.ppl && !strcmp(a.ppl, "-")) {
        if (!(spool = moe_spool_stdin("moe-eval-stdin"))) moe_cli_fail();
        a.ppl = spool;
        a.ppl_name = "<stdin>";
    }
    model_res R[2];
    for (int k = 0; k < a.nmodels; k++)
        if (eval_model(&a, a.models[k], &R[k]) < 0) moe_cli_fail();
    if (a.out && write_stream(&a, R, a.nmodels, argc, argv) < 0) moe_cli_fail();
    if (!a.out || strcmp(a.out, "-")) {
        if (a.json) print_json(&a, R, a.nmodels);
        else print_table(&a, R, a.nmodels);
    }
    if (spool) {
        moe_tmp_discard(spool);
        free(spool);
    }
    for (int k = 0; k < a.nmodels; k++) free_res(&R[k]);
    for (int i = 0; i < a.ntasks; i++) moe_task_free(a.tasks[i]);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        moe_error_set(MOE_ERR_IO, "<stdout>: write error");
        moe_cli_fail();
    }
    return 0;
}
