/* moe-tokenize - text to token ids (and back) with a model's Hugging Face
 * tokenizer.json, token for token as the `tokenizers` library. */
#include "cli.h"
#include "jsonout.h"
#include "stream.h"
#include "tokenizer.h"

#include <errno.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <jansson.h>

static const char help[] =
    "Usage: moe-tokenize --model DIR [OPTIONS] [INPUT|-] > TOKENS.msgpack.zst\n"
    "       moe-tokenize --model DIR --decode [TOKENS|-] > TEXT.jsonl\n"
    "Tokenize JSON Lines (one sample per line, text in --field) with the model's\n"
    "tokenizer.json (+ tokenizer_config.json) into a moe-stream of kind \"tokens\":\n"
    "one record {\"type\":\"tokens\",\"index\":i,\"ids\":i32[n]} per sample.\n"
    "\n"
    "  -m, --model DIR       model directory with tokenizer.json (or the file itself)\n"
    "  -f, --field NAME      JSON field holding the text (default: text)\n"
    "  -n, --max-length N    truncate like transformers truncation=True, max_length=N\n"
    "                        (special tokens count toward N)\n"
    "      --no-special      do not add BOS/EOS (add_special_tokens=False)\n"
    "      --lines           input is plain text, one sample per line\n"
    "      --ids             input lines are JSON lists of token ids (tokenized elsewhere),\n"
    "                        or objects whose --field is such a list\n"
    "  -d, --decode          turn a token stream back into JSON Lines {\"index\",\"text\"}\n"
    "      --skip-special    with --decode: leave out special tokens\n"
    "  -o, --output FILE     write here instead of standard output\n"
    "With --threads N, N tokenizers share the work; the output does not depend on N.\n";

enum { OPT_NO_SPECIAL = 1, OPT_LINES, OPT_IDS, OPT_SKIP_SPECIAL };

typedef struct {
    const char *model, *field, *input, *output;
    long max_length;
    int no_special, lines, ids, decode, skip_special;
} opts_t;

static const char *display(const char *path) { return strcmp(path, "-") ? path : "<stdin>"; }

static FILE *open_input(const char *path)
{
    if (!strcmp(path, "-")) return stdin;
    FILE *f = fopen(path, "rb");
    if (!f) moe_error_set(MOE_ERR_IO, "%s: %s", path, strerror(errno));
    return f;
}

/* Parse one --ids line: a JSON list of ints, or an object with field = list. */
static int parse_ids(const char *name, uint64_t lineno, const char *line, size_t len, const opts_t *o,
                     size_t vocab, int32_t **ids, size_t *n)
{
    json_error_t err;
    json_t *j = json_loadb(line, len, 0, &err), *a = j;
    if (!j) {
        moe_error_set(MOE_ERR_DATA, "%s:%llu: not JSON: %s", name, (unsigned long long)lineno, err.text);
        return -1;
    }
    if (json_is_object(j)) a = json_object_get(j, o->field);
    if (!json_is_array(a)) {
        moe_error_set(MOE_ERR_DATA, "%s:%llu: expected a JSON list of token ids%s%s", name,
                      (unsigned long long)lineno, json_is_object(j) ? " in field " : "",
                      json_is_object(j) ? o->field : "");
        json_decref(j);
        return -1;
    }
    size_t k = json_array_size(a);
    *ids = moe_malloc((k ? k : 1) * sizeof **ids);
    for (size_t i = 0; i < k; i++) {
        json_t *v = json_array_get(a, i);
        json_int_t x = json_integer_value(v);
        if (!json_is_integer(v) || x < 0 || (size_t)x >= vocab) {
            moe_error_set(MOE_ERR_DATA, "%s:%llu: element %zu is not a token id in [0, %zu)", name,
                          (unsigned long long)lineno, i, vocab);
            free(*ids);
            *ids = NULL;
            json_decref(j);
            return -1;
        }
        (*ids)[i] = (int32_t)x;
    }
    *n = k;
    if (o->max_length > 0 && *n > (size_t)o->max_length) *n = (size_t)o->max_length;
    json_decref(j);
    return 0;
}

/* The text of one JSON Lines sample (pointer into *j, which the caller frees). */
static int parse_text(const char *name, uint64_t lineno, const char *line, size_t len, const char *field,
                      json_t **j, const char **s, size_t *sl)
{
    json_error_t err;
    *j = json_loadb(line, len, JSON_ALLOW_NUL, &err);
    if (!*j) {
        moe_error_set(MOE_ERR_DATA, "%s:%llu: not JSON: %s", name, (unsigned long long)lineno, err.text);
        return -1;
    }
    if (!json_is_object(*j)) {
        moe_error_set(MOE_ERR_DATA, "%s:%llu: not a JSON object", name, (unsigned long long)lineno);
        return -1;
    }
    json_t *v = json_object_get(*j, field);
    if (!json_is_string(v)) {
        moe_error_set(MOE_ERR_DATA, "%s:%llu: %s field '%s'", name, (unsigned long long)lineno,
                      v ? "not a string:" : "missing", field);
        return -1;
    }
    *s = json_string_value(v);
    *sl = json_string_length(v);
    return 0;
}

/* Prefix the current error with FILE:LINE. */
static void at_line(const char *name, uint64_t lineno)
{
    char *msg = moe_strdup(moe_error());
    moe_error_set(MOE_ERR_DATA, "%s:%llu: %s", name, (unsigned long long)lineno, msg);
    free(msg);
}

static int blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r') return 0;
    return 1;
}

/* One input line and what becomes of it. */
typedef struct {
    char *line;
    size_t len;
    uint64_t lineno;
    int32_t *ids;
    size_t n;
    char *err;    /* message (file:line: ...) if the line is bad */
    int skip;     /* blank JSON Lines line: no sample */
} item;

static void process(const opts_t *o, moe_tokenizer *t, const char *name, size_t vocab, item *it)
{
    size_t n = it->len;
    const char *line = it->line;
    int rc = 0;
    if (o->lines) {
        if (n && line[n - 1] == '\r') n--;
        size_t ok = moe_utf8_check(line, n);
        if (ok != n) {
            moe_error_set(MOE_ERR_DATA, "%s:%llu: invalid UTF-8 at byte %zu", name,
                          (unsigned long long)it->lineno, ok);
            rc = -1;
        } else if (moe_tokenizer_encode_trunc(t, line, n, !o->no_special, (size_t)o->max_length, &it->ids,
                                              &it->n) < 0) {
            at_line(name, it->lineno);
            rc = -1;
        }
    } else if (blank(line, n)) {
        it->skip = 1;
    } else if (o->ids) {
        rc = parse_ids(name, it->lineno, line, n, o, vocab, &it->ids, &it->n);
    } else {
        json_t *j = NULL;
        const char *s;
        size_t sl;
        rc = parse_text(name, it->lineno, line, n, o->field, &j, &s, &sl);
        if (rc == 0 && moe_tokenizer_encode_trunc(t, s, sl, !o->no_special, (size_t)o->max_length, &it->ids,
                                                  &it->n) < 0) {
            at_line(name, it->lineno);
            rc = -1;
        }
        if (j) json_decref(j);
    }
    if (rc < 0) it->err = moe_strdup(moe_error());
}

#define BATCH_LINES 4096
#define BATCH_BYTES (16u << 20)

static int tokenize(const opts_t *o, moe_tokenizer *t, int argc, char **argv)
{
    const char *name = display(o->input);
    FILE *in = open_input(o->input);
    if (!in) return -1;
    moe_provenance prov = {.tool = "moe-tokenize", .argc = argc, .argv = argv, .kind = "tokens"};
    moe_writer *w = moe_writer_open(o->output, NULL, &prov, moe_cli.no_provenance);
    if (!w) { if (in != stdin) fclose(in); return -1; }
    /* one tokenizer per thread; the ids do not depend on the thread count */
    int nt = moe_cli.threads > 0 ? moe_cli.threads : omp_get_max_threads();
    if (nt < 1) nt = 1;
    moe_tokenizer **tk = moe_malloc((size_t)nt * sizeof *tk);
    tk[0] = t;
    for (int i = 1; i < nt; i++) tk[i] = moe_tokenizer_clone(t);
    struct stat st;
    moe_progress pr;
    moe_progress_start(&pr, "moe-tokenize", "bytes", (in != stdin && !fstat(fileno(in), &st)) ? (uint64_t)st.st_size : 0);
    item *batch = moe_calloc(BATCH_LINES, sizeof *batch);
    char *line = NULL;
    size_t cap = 0, vocab = moe_tokenizer_vocab_size(t);
    uint64_t lineno = 0, index = 0;
    int rc = 0, eof = 0;
    while (rc == 0 && !eof) {
        size_t nb = 0, bytes = 0;
        ssize_t len;
        errno = 0;
        while (nb < BATCH_LINES && bytes < BATCH_BYTES && (len = getline(&line, &cap, in)) >= 0) {
            item *it = &batch[nb++];
            memset(it, 0, sizeof *it);
            it->lineno = ++lineno;
            it->len = (size_t)len;
            if (it->len && line[it->len - 1] == '\n') it->len--;
            it->line = moe_malloc(it->len + 1);
            memcpy(it->line, line, it->len);
            it->line[it->len] = 0;
            bytes += (size_t)len;
        }
        if (nb < BATCH_LINES && bytes < BATCH_BYTES) eof = 1;
        if (eof && ferror(in)) {
            moe_error_set(MOE_ERR_IO, "%s: read error: %s", name, strerror(errno));
            rc = -1;
        }
        moe_progress_add(&pr, bytes);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 4) if (nt > 1 && nb > 1)
        for (size_t i = 0; i < nb; i++) process(o, tk[omp_get_thread_num()], name, vocab, &batch[i]);
        for (size_t i = 0; i < nb; i++) {
            item *it = &batch[i];
            if (rc == 0 && it->err) {
                moe_error_set(MOE_ERR_DATA, "%s", it->err);
                rc = -1;
            }
            if (rc == 0 && !it->skip) {
                msgpack_packer *pk = moe_writer_record(w, "tokens", 2);
                moe_pack_kv_int(pk, "index", (int64_t)index++);
                int64_t shape[1] = {(int64_t)it->n};
                moe_pack_kv_array(pk, "ids", MOE_DT_I32, 1, shape, it->ids);
            }
            free(it->line); free(it->ids); free(it->err);
        }
    }
    moe_progress_end(&pr);
    free(batch);
    free(line);
    for (int i = 1; i < nt; i++) moe_tokenizer_close(tk[i]);
    free(tk);
    if (in != stdin) fclose(in);
    if (rc < 0) {
        moe_writer_abort(w);
        return -1;
    }
    return moe_writer_close(w);
}

static int decode(const opts_t *o, moe_tokenizer *t)
{
    moe_reader *r = moe_reader_open(o->input);
    if (!r) return -1;
    if (moe_reader_require_kind(r, "tokens", "make it with moe-tokenize") < 0) {
        moe_reader_close(r);
        return -1;
    }
    FILE *out = stdout;
    char *tmp = NULL;
    if (strcmp(o->output, "-")) {
        tmp = moe_tmp_path(o->output);
        moe_tmp_register(tmp);
        if (!(out = fopen(tmp, "w"))) {
            moe_error_set(MOE_ERR_IO, "%s: %s", o->output, strerror(errno));
            moe_tmp_discard(tmp);
            free(tmp);
            moe_reader_close(r);
            return -1;
        }
    }
    const msgpack_object *rec;
    int rc;
    int32_t *buf = NULL;
    size_t cap = 0;
    while ((rc = moe_reader_next(r, &rec)) > 0) {
        if (!moe_record_is(rec, "tokens")) continue;
        int64_t index;
        moe_array a;
        if (moe_record_int(r, rec, "index", &index) < 0 || moe_record_array(r, rec, "ids", &a) < 0) { rc = -1; break; }
        if ((size_t)a.count > cap) {
            cap = (size_t)a.count;
            buf = moe_realloc(buf, cap * sizeof *buf);
        }
        if (a.count && moe_array_to_i32(&a, buf) < 0) {
            moe_error_set(MOE_ERR_DATA, "%s: record %llu: key 'ids': %s", moe_reader_name(r),
                          (unsigned long long)moe_reader_index(r), moe_error());
            rc = -1;
            break;
        }
        char *text;
        size_t tl;
        if (moe_tokenizer_decode(t, buf, (size_t)a.count, o->skip_special ? MOE_TOK_SKIP_SPECIAL : 0, &text,
                                 &tl) < 0) {
            char *msg = moe_strdup(moe_error());
            moe_error_set(MOE_ERR_DATA, "%s: record %llu: %s", moe_reader_name(r),
                          (unsigned long long)moe_reader_index(r), msg);
            free(msg);
            rc = -1;
            break;
        }
        fprintf(out, "{\"index\":%lld,\"text\":", (long long)index);
        moe_json_string(out, text, tl);
        fputs("}\n", out);
        free(text);
    }
    free(buf);
    moe_reader_close(r);
    if (fflush(out) != 0 || ferror(out)) {
        if (rc >= 0) moe_error_set(MOE_ERR_IO, "%s: write error", tmp ? o->output : "<stdout>");
        rc = -1;
    }
    if (tmp) {
        if (fclose(out) != 0 && rc >= 0) {
            moe_error_set(MOE_ERR_IO, "%s: write error", o->output);
            rc = -1;
        }
        if (rc >= 0) rc = moe_tmp_commit(tmp, o->output) < 0 ? -1 : 0;
        else moe_tmp_discard(tmp);
        free(tmp);
    }
    return rc < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
    moe_cli_init("moe-tokenize", help, argc, argv);
    static const struct option lopts[] = {
        {"model", required_argument, 0, 'm'},     {"field", required_argument, 0, 'f'},
        {"max-length", required_argument, 0, 'n'}, {"no-special", no_argument, 0, OPT_NO_SPECIAL},
        {"lines", no_argument, 0, OPT_LINES},      {"ids", no_argument, 0, OPT_IDS},
        {"decode", no_argument, 0, 'd'},           {"skip-special", no_argument, 0, OPT_SKIP_SPECIAL},
        {"output", required_argument, 0, 'o'},     MOE_CLI_COMMON_OPTIONS,
        {0, 0, 0, 0}};
    opts_t o = {.field = "text", .input = "-", .output = "-"};
    int c;
    while ((c = getopt_long(argc, argv, ":m:f:n:do:", lopts, NULL)) != -1) {
        if (moe_cli_handle(c, optarg)) continue;
        switch (c) {
        case 'm': o.model = optarg; break;
        case 'f': o.field = optarg; break;
        case 'n': o.max_length = moe_cli_long("--max-length", optarg, 1, 1L << 40); break;
        case OPT_NO_SPECIAL: o.no_special = 1; break;
        case OPT_LINES: o.lines = 1; break;
        case OPT_IDS: o.ids = 1; break;
        case 'd': o.decode = 1; break;
        case OPT_SKIP_SPECIAL: o.skip_special = 1; break;
        case 'o': o.output = optarg; break;
        case ':': moe_cli_usage("option %s needs a value", argv[optind - 1]);
        default: moe_cli_usage("unknown option %s", argv[optind - 1]);
        }
    }
    if (!o.model) moe_cli_usage("--model DIR is required");
    if (optind < argc) o.input = argv[optind++];
    if (optind < argc) moe_cli_usage("more than one input");
    if (o.lines + o.ids + o.decode > 1) moe_cli_usage("--lines, --ids and --decode exclude each other");
    if (o.decode && (o.max_length || o.no_special || strcmp(o.field, "text")))
        moe_cli_usage("--decode takes no --max-length, --no-special or --field");
    if (o.skip_special && !o.decode) moe_cli_usage("--skip-special goes with --decode");
    moe_tokenizer *t = moe_tokenizer_open(o.model);
    if (!t) moe_cli_fail();
    int rc = o.decode ? decode(&o, t) : tokenize(&o, t, argc, argv);
    moe_tokenizer_close(t);
    if (rc < 0) moe_cli_fail();
    return 0;
}
