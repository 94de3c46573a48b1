/* moe-generate - continue prompts with a model: greedy or sampled, text
 * streamed to stdout, JSON Lines, or a token stream. */
#include "cli.h"
#include "generate.h"
#include "jsonl.h"
#include "jsonout.h"
#include "model.h"
#include "records.h"
#include "stream.h"
#include "tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char help[] =
    "Usage: moe-generate --model DIR [OPTIONS] [PROMPT...]\n"
    "Continue each prompt with the model (dense, condensed, folded: any checkpoint the\n"
    "tools read).  Prompts: the arguments, -p TEXT, --prompts FILE; with none of them,\n"
    "standard input (one prompt per line, or JSON Lines {\"prompt\": ...}).  The text is\n"
    "written to stdout as it is produced, one line per generation; --jsonl writes\n"
    "{\"index\",\"prompt\",\"completion\",\"text\",\"finish\"} per generation (\"text\" is\n"
    "what moe-tokenize and moe-eval --ppl read: calibration on self-generated text);\n"
    "-o writes the token ids (prompt + generated) as a moe-stream of kind \"tokens\".\n"
    "Generation stops at an EOS id (config.json, generation_config.json), a --stop\n"
    "string, --max-new-tokens or max_position_embeddings.  Tokens/s go to stderr.\n"
    "\n"
    "  -m, --model DIR          model directory\n"
    "      --tokenizer PATH     tokenizer.json or a directory holding it (default: DIR)\n"
    "  -p, --prompt TEXT        a prompt (repeatable; '' = start from BOS alone)\n"
    "  -f, --prompts FILE|-     prompts, one per line, or JSON Lines objects\n"
    "      --field NAME         the JSON field holding the prompt (default: prompt)\n"
    "  -n, --max-new-tokens N   tokens generated per prompt at most (default 128)\n"
    "  -t, --temperature X      0 = greedy, the most likely token (default); > 0 samples\n"
    "  -k, --top-k N            sample among the N most likely tokens (default: all)\n"
    "      --top-p X            sample from the smallest set of mass >= X (default 1)\n"
    "      --samples N          generations per prompt, each with its own random stream\n"
    "                           (default 1)\n"
    "      --stop STR           end a generation where STR appears (repeatable); the text\n"
    "                           stops before it\n"
    "      --ignore-eos         do not stop at EOS ids\n"
    "      --no-special         do not add the tokenizer's special tokens (BOS) to prompts\n"
    "      --echo               write each prompt before its continuation (text output)\n"
    "      --jsonl              JSON Lines instead of plain text\n"
    "      --batch N            generations decoded together, layer-major (default 8);\n"
    "                           the output does not depend on it\n"
    "  -o, --output FILE        a token stream instead of text ('-' = stdout)\n"
    "With --seed S (default 0), the same text on any machine and --threads.\n";

enum { OPT_TOKENIZER = 1, OPT_FIELD, OPT_TOPP, OPT_SAMPLES, OPT_STOP, OPT_IGNORE_EOS,
       OPT_NO_SPECIAL, OPT_ECHO, OPT_JSONL, OPT_BATCH };

typedef struct {
    const char *model, *tokenizer, *prompts_file, *field, *output;
    char **prompts; /* from -p and the arguments, then the file's */
    int nprompts;
    const char **stops;
    int nstops;
    long samples, batch;
    int ignore_eos, no_special, echo, jsonl;
    moe_gen_opts gen;
} gen_args;

static void add_prompt(gen_args *a, const char *text, size_t len) {
    a->prompts = moe_realloc(a->prompts, sizeof(char *) * (size_t)(a->nprompts + 1));
    char *p = moe_malloc(len + 1);
    memcpy(p, text, len);
    p[len] = 0;
    a->prompts[a->nprompts++] = p;
}

/* ---- prompts ------------------------------------------------------------------ */

static int first_char_is_brace(const char *line, size_t len) {
    size_t i = 0;
    while (i < len && (line[i] == ' ' || line[i] == '\t')) i++;
    return i < len && line[i] == '{';
}

/* One prompt per non-blank line; JSON Lines when the first one is an object. */
static int read_prompt_file(gen_args *a, const char *path) {
    moe_jsonl *in = moe_jsonl_open(path);
    if (!in) return -1;
    const char *name = moe_jsonl_name(in), *line;
    size_t len;
    int rc, json = -1, before = a->nprompts;
    while ((rc = moe_jsonl_next(in, &line, &len)) > 0) {
        if (len && line[len - 1] == '\r') len--;
        if (moe_jsonl_blank(line, len)) continue;
        if (json < 0) json = first_char_is_brace(line, len);
        uint64_t ln = moe_jsonl_lineno(in);
        if (!json) {
            size_t ok = moe_utf8_check(line, len);
            if (ok != len) {
                moe_jsonl_error(name, ln, "invalid UTF-8 at byte %zu", ok);
                rc = -1;
                break;
            }
            add_prompt(a, line, len);
            continue;
        }
        json_t *obj = NULL;
        const char *text;
        size_t tl;
        rc = moe_jsonl_text(name, ln, line, len, a->field, 0, &obj, &text, &tl);
        if (rc == 0) add_prompt(a, text, tl);
        if (obj) json_decref(obj);
        if (rc < 0) break;
    }
    if (rc == 0 && a->nprompts == before) {
        moe_error_set(MOE_ERR_DATA, "%s: no prompts", name);
        rc = -1;
    }
    moe_jsonl_close(in);
    return rc < 0 ? -1 : 0;
}

/* ---- output ------------------------------------------------------------------- */

/* What is written of each generation, in order: the current one (the first
 * not yet finished on stdout) is streamed, later ones wait in their buffer,
 * so the output does not depend on --batch. */
typedef struct {
    const gen_args *a;
    moe_tokenizer *tok;
    moe_gen_seq *seqs;
    int n, cur;
    moe_detok *dt;   /* [n] */
    char **buf;      /* [n] text not yet written */
    size_t *blen;
    int *done;
    int text_out;    /* stdout carries text (not -o) */
    moe_progress pr; /* tokens, on a terminal, unless the text itself shows progress */
} gen_out;

static void buf_add(gen_out *g, int s, const char *t, size_t n) {
    if (!n || !g->text_out) return;
    g->buf[s] = moe_realloc(g->buf[s], g->blen[s] + n + 1);
    memcpy(g->buf[s] + g->blen[s], t, n);
    g->blen[s] += n;
}

static const char *finish_name(int f) {
    return f == MOE_GEN_EOS ? "eos" : f == MOE_GEN_STOP ? "stop" : "length";
}

static void write_jsonl(const gen_out *g, int s) {
    const char *prompt = g->a->prompts[s / g->a->samples];
    size_t pl = strlen(prompt);
    printf("{\"index\":%d,\"prompt\":", s);
    moe_json_string(stdout, prompt, pl);
    fputs(",\"completion\":", stdout);
    moe_json_string(stdout, g->buf[s] ? g->buf[s] : "", g->blen[s]);
    fputs(",\"text\":", stdout);
    char *all = moe_malloc(pl + g->blen[s] + 1);
    memcpy(all, prompt, pl);
    if (g->blen[s]) memcpy(all + pl, g->buf[s], g->blen[s]);
    moe_json_string(stdout, all, pl + g->blen[s]);
    free(all);
    printf(",\"finish\":\"%s\"}\n", finish_name(g->seqs[s].finish));
}

/* Write what can be written: the current generation's text, then, each
 * time it is done, its end and the next one's buffered text. */
static void flush_ready(gen_out *g) {
    if (!g->text_out) return;
    while (g->cur < g->n) {
        int s = g->cur;
        if (!g->a->jsonl && g->blen[s]) {
            fwrite(g->buf[s], 1, g->blen[s], stdout);
            g->blen[s] = 0;
        }
        if (!g->done[s]) break;
        if (g->a->jsonl) write_jsonl(g, s);
        else putchar('\n');
        free(g->buf[s]);
        g->buf[s] = NULL;
        g->blen[s] = 0;
        g->cur++;
    }
    moe_cli_flush_stdout();
}

/* moe_generate's callback: the token's text, a stop string, the end. */
static int on_token(void *ctx, int s, int32_t id, int last) {
    gen_out *g = ctx;
    const char *t;
    size_t n;
    int r = moe_detok_push(&g->dt[s], id, &t, &n);
    if (r < 0) return -1;
    buf_add(g, s, t, n);
    if (r == 0 && last) {
        if (moe_detok_finish(&g->dt[s], &t, &n) < 0) return -1;
        buf_add(g, s, t, n);
    }
    moe_progress_add(&g->pr, 1);
    if (r > 0) g->seqs[s].finish = MOE_GEN_STOP; /* as moe_generate will set it */
    if (r > 0 || last) g->done[s] = 1;
    if (s == g->cur) flush_ready(g);
    return r;
}

static void gen_out_init(gen_out *g, const gen_args *a, moe_tokenizer *tok, moe_gen_seq *seqs,
                         int n) {
    memset(g, 0, sizeof *g);
    g->a = a;
    g->tok = tok;
    g->seqs = seqs;
    g->n = n;
    g->text_out = !a->output;
    g->dt = moe_calloc((size_t)n, sizeof *g->dt);
    g->buf = moe_calloc((size_t)n, sizeof *g->buf);
    g->blen = moe_calloc((size_t)n, sizeof *g->blen);
    g->done = moe_calloc((size_t)n, sizeof *g->done);
    int streamed = g->text_out && !a->jsonl;
    moe_progress_start(&g->pr, "moe-generate", "tokens",
                       streamed ? 0 : (uint64_t)n * (uint64_t)a->gen.max_new_tokens);
    g->pr.enabled &= !streamed;
    for (int s = 0; s < n; s++) {
        moe_detok_init(&g->dt[s], tok, a->stops, a->nstops);
        if (a->echo && !a->jsonl) {
            const char *p = a->prompts[s / a->samples];
            buf_add(g, s, p, strlen(p));
        }
    }
}

static void gen_out_free(gen_out *g) {
    moe_progress_end(&g->pr);
    for (int s = 0; s < g->n; s++) {
        moe_detok_free(&g->dt[s]);
        free(g->buf[s]);
    }
    free(g->dt);
    free(g->buf);
    free(g->blen);
    free(g->done);
}

/* The token stream: each generation's prompt + generated ids. */
static int write_tokens(const gen_args *a, const char *model_fp, const moe_gen_seq *seqs, int n,
                        int argc, char **argv) {
    char fp[65];
    int has = moe_tokenizer_fingerprint(a->tokenizer, fp);
    if (has < 0) return -1;
    moe_provenance prov = {.tool = "moe-generate", .argc = argc, .argv = argv,
                           .model = model_fp, .kind = MOE_REC_TOKENS};
    moe_writer *w = moe_writer_open(a->output, NULL, &prov, moe_cli.no_provenance);
    if (!w) return -1;
    for (int s = 0; s < n; s++)
        if (moe_tokens_write_prompt(w, s, seqs[s].ids, (size_t)seqs[s].n, has ? fp : NULL,
                                    seqs[s].n_prompt) < 0) {
            moe_writer_abort(w);
            return -1;
        }
    return moe_writer_close(w);
}

/* ---- the run ------------------------------------------------------------------ */

/* Prompt ids: the tokenizer's encoding (with its special tokens unless
 * --no-special); an empty one starts from the config's BOS. */
static int encode_prompt(const gen_args *a, moe_tokenizer *tok, const moe_config *c, int i,
                         int32_t **ids, size_t *n) {
    const char *p = a->prompts[i];
    if (moe_tokenizer_encode(tok, p, strlen(p), !a->no_special, ids, n) < 0) {
        moe_error_set(moe_error_kind(), "prompt %d: %s", i + 1, moe_error());
        return -1;
    }
    if (c->max_position_embeddings > 0 && *n > (size_t)c->max_position_embeddings) {
        moe_error_set(MOE_ERR_DATA, "prompt %d: %zu tokens, more than the model's "
                      "max_position_embeddings (%d)", i + 1, *n, c->max_position_embeddings);
        return -1;
    }
    for (size_t k = 0; k < *n; k++)
        if ((*ids)[k] >= c->vocab_size) {
            moe_error_set(MOE_ERR_DATA, "prompt %d: token id %d is outside the model's vocabulary "
                          "(%d): is %s the model's tokenizer?", i + 1, (*ids)[k], c->vocab_size,
                          a->tokenizer);
            return -1;
        }
    if (*n > 0) return 0;
    if (c->bos_token_id < 0) {
        moe_error_set(MOE_ERR_DATA, "prompt %d is empty and the model has no bos_token_id to "
                      "start from", i + 1);
        return -1;
    }
    (*ids)[0] = c->bos_token_id;
    *n = 1;
    return 0;
}

static void report_speed(const moe_gen_stats *st, int n) {
    if (moe_quiet) return;
    fprintf(stderr, "%s: %d generation%s: weights loaded in %.2f s, %lld prompt tokens in %.2f s "
            "(%.1f tokens/s), %lld new tokens in %.2f s (%.1f tokens/s)\n", moe_program_name(), n,
            n == 1 ? "" : "s", st->load_s, (long long)st->prompt_tokens, st->prefill_s,
            st->prefill_s > 0 ? (double)st->prompt_tokens / st->prefill_s : 0.0,
            (long long)st->new_tokens, st->prefill_s + st->decode_s,
            st->prefill_s + st->decode_s > 0 ? (double)st->new_tokens / (st->prefill_s + st->decode_s)
                                             : 0.0);
}

static int run(gen_args *a, moe_model *m, moe_tokenizer *tok, int argc, char **argv) {
    int n = a->nprompts * (int)a->samples, rc = 0;
    moe_gen_seq *seqs = moe_calloc((size_t)n, sizeof *seqs);
    int32_t **pids = moe_calloc((size_t)a->nprompts, sizeof *pids);
    for (int i = 0; i < a->nprompts && rc == 0; i++) {
        size_t len = 0;
        rc = encode_prompt(a, tok, moe_model_config(m), i, &pids[i], &len);
        for (int j = 0; j < a->samples && rc == 0; j++) {
            moe_gen_seq *q = &seqs[i * a->samples + j];
            q->prompt = pids[i];
            q->n_prompt = (int)len;
            q->stream = (uint64_t)(i * a->samples + j);
        }
    }
    gen_out out;
    gen_out_init(&out, a, tok, seqs, n);
    moe_gen_stats st = {0};
    if (rc == 0) rc = moe_generate(m, seqs, n, &a->gen, on_token, &out, &st);
    gen_out_free(&out);
    if (rc == 0 && a->output) rc = write_tokens(a, moe_model_fingerprint(m), seqs, n, argc, argv);
    if (rc == 0) report_speed(&st, n);
    for (int s = 0; s < n; s++) free(seqs[s].ids);
    for (int i = 0; i < a->nprompts; i++) free(pids[i]);
    free(pids);
    free(seqs);
    return rc;
}

static void parse_args(gen_args *a, int argc, char **argv) {
    static const struct option lopts[] = {
        {"model", required_argument, 0, 'm'},       {"tokenizer", required_argument, 0, OPT_TOKENIZER},
        {"prompt", required_argument, 0, 'p'},      {"prompts", required_argument, 0, 'f'},
        {"field", required_argument, 0, OPT_FIELD}, {"max-new-tokens", required_argument, 0, 'n'},
        {"temperature", required_argument, 0, 't'}, {"top-k", required_argument, 0, 'k'},
        {"top-p", required_argument, 0, OPT_TOPP},  {"samples", required_argument, 0, OPT_SAMPLES},
        {"stop", required_argument, 0, OPT_STOP},   {"ignore-eos", no_argument, 0, OPT_IGNORE_EOS},
        {"no-special", no_argument, 0, OPT_NO_SPECIAL}, {"echo", no_argument, 0, OPT_ECHO},
        {"jsonl", no_argument, 0, OPT_JSONL},       {"batch", required_argument, 0, OPT_BATCH},
        {"output", required_argument, 0, 'o'},      MOE_CLI_COMMON_OPTIONS,
        {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, ":m:p:f:n:t:k:o:", lopts, NULL)) != -1) {
        if (moe_cli_handle(c, optarg)) continue;
        switch (c) {
        case 'm': a->model = optarg; break;
        case OPT_TOKENIZER: a->tokenizer = optarg; break;
        case 'p': add_prompt(a, optarg, strlen(optarg)); break;
        case 'f': a->prompts_file = optarg; break;
        case OPT_FIELD: a->field = optarg; break;
        case 'n': a->gen.max_new_tokens = (int)moe_cli_long("--max-new-tokens", optarg, 0, 1 << 24); break;
        case 't': a->gen.temperature = moe_cli_double("--temperature", optarg); break;
        case 'k': a->gen.top_k = (int)moe_cli_long("--top-k", optarg, 0, 1 << 30); break;
        case OPT_TOPP: a->gen.top_p = moe_cli_double("--top-p", optarg); break;
        case OPT_SAMPLES: a->samples = moe_cli_long("--samples", optarg, 1, 1 << 20); break;
        case OPT_STOP:
            if (!*optarg) moe_cli_usage("--stop: an empty string");
            a->stops = moe_realloc(a->stops, sizeof(char *) * (size_t)(a->nstops + 1));
            a->stops[a->nstops++] = optarg;
            break;
        case OPT_IGNORE_EOS: a->ignore_eos = 1; break;
        case OPT_NO_SPECIAL: a->no_special = 1; break;
        case OPT_ECHO: a->echo = 1; break;
        case OPT_JSONL: a->jsonl = 1; break;
        case OPT_BATCH: a->gen.max_batch = (int)moe_cli_long("--batch", optarg, 1, 1 << 16); break;
        case 'o': a->output = optarg; break;
        case ':': moe_cli_usage("option %s needs a value", argv[optind - 1]);
        default: moe_cli_usage("unknown option %s", argv[optind - 1]);
        }
    }
    for (; optind < argc; optind++) add_prompt(a, argv[optind], strlen(argv[optind]));
}

static void check_args(gen_args *a) {
    if (!a->model) moe_cli_usage("--model DIR is required");
    if (a->gen.temperature < 0) moe_cli_usage("--temperature must be >= 0");
    if (!(a->gen.top_p > 0 && a->gen.top_p <= 1)) moe_cli_usage("--top-p must be in (0, 1]");
    if (a->gen.temperature == 0 && (a->gen.top_k || a->gen.top_p < 1))
        moe_cli_usage("--top-k and --top-p sample: give a --temperature above 0");
    if (a->gen.temperature == 0 && a->samples > 1)
        moe_cli_usage("--samples %ld with greedy decoding would repeat one text: give a "
                      "--temperature above 0", a->samples);
    if (a->output && (a->jsonl || a->echo)) moe_cli_usage("-o writes tokens: no --jsonl or --echo");
    if (a->echo && a->jsonl) moe_cli_usage("--echo goes with plain text, not --jsonl");
    if (!a->tokenizer) a->tokenizer = a->model;
    if (!a->prompts_file && a->nprompts == 0) a->prompts_file = "-";
}

/* The tokenizer: --tokenizer, else the model directory's (the toolkit's
 * test models have none: say how to give one). */
static moe_tokenizer *open_tokenizer(const gen_args *a) {
    char fp[65];
    struct stat st;
    if (a->tokenizer == a->model && stat(a->model, &st) == 0 && S_ISDIR(st.st_mode) &&
        moe_tokenizer_fingerprint(a->model, fp) == 0) {
        moe_error_set(MOE_ERR_DATA, "%s: no tokenizer.json in the model directory (name one with "
                      "--tokenizer)", a->model);
        return NULL;
    }
    return moe_tokenizer_open(a->tokenizer);
}

int main(int argc, char **argv) {
    const unsigned takes = MOE_CLI_TAKES_THREADS | MOE_CLI_TAKES_DEVICE | MOE_CLI_TAKES_SEED |
                           MOE_CLI_TAKES_NO_PROVENANCE | MOE_CLI_TAKES_QUIET;
    moe_cli_init("moe-generate", help, takes, argc, argv);
    gen_args a = {.field = "prompt", .samples = 1,
                  .gen = {.max_new_tokens = 128, .top_p = 1.0}};
    parse_args(&a, argc, argv);
    check_args(&a);
    a.gen.seed = moe_cli.seed;
    moe_tokenizer *tok = open_tokenizer(&a);
    if (!tok) moe_cli_fail();
    if (a.prompts_file && read_prompt_file(&a, a.prompts_file) < 0) moe_cli_fail();
    int32_t *eos = NULL;
    int neos = moe_gen_eos_ids(a.model, &eos);
    if (neos < 0) moe_cli_fail();
    if (!a.ignore_eos) {
        a.gen.stop_ids = eos;
        a.gen.n_stop_ids = neos;
    }
    moe_model_opts mo = {.device = moe_cli.device, .precision = moe_cli.precision};
    moe_model_opts_from_env(&mo);
    moe_model *m = moe_model_open(a.model, &mo);
    if (!m) moe_cli_fail();
    int rc = run(&a, m, tok, argc, argv);
    moe_model_close(m);
    moe_tokenizer_close(tok);
    if (rc < 0) moe_cli_fail();
    free(eos);
    for (int i = 0; i < a.nprompts; i++) free(a.prompts[i]);
    free(a.prompts);
    free(a.stops);
    return 0;
}
