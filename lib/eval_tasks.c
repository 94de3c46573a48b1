/* eval_tasks.c - task file readers for moe-eval (formats: see eval.h). */
#define _GNU_SOURCE
#include "common.h"
#include "eval.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *formats[] = {"mc", "schema", "lm", "piqa", "winogrande", "hellaswag", "rte"};
#define NFORMATS ((int)(sizeof formats / sizeof formats[0]))

const char *moe_task_formats(void) { return "mc, schema, lm, piqa, winogrande, hellaswag, rte"; }

/* ---- small helpers ------------------------------------------------------------ */


static char *xasprintf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) s = NULL;
    va_end(ap);
    if (!s) s = moe_strdup("");
    return s;
}

/* Unicode code points of a UTF-8 string (Python len()). */
static int u8len(const char *s) {
    int n = 0;
    for (; *s; s++)
        if (((unsigned char)*s & 0xC0) != 0x80) n++;
    return n;
}

/* Split text into lines (in place): returns count, *lines malloc'd.  A final
 * line without a newline counts; "\r\n" is accepted. */
static int split_lines(char *text, size_t len, char ***lines) {
    int cap = 1024, n = 0;
    char **v = moe_malloc(sizeof(char *) * (size_t)cap);
    char *p = text, *end = text + len;
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *e = nl ? nl : end;
        if (e > p && e[-1] == '\r') e[-1] = 0;
        *e = 0;
        if (n == cap) v = moe_realloc(v, sizeof(char *) * (size_t)(cap *= 2));
        v[n++] = p;
        p = nl ? nl + 1 : end;
    }
    *lines = v;
    return n;
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* basename without the extension(s) */
static char *stem(const char *path) {
    char *s = moe_strdup(base_name(path));
    char *dot = strchr(s, '.');
    if (dot && dot != s) *dot = 0;
    return s;
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

/* Labels file beside X.jsonl: X-labels.lst. */
static char *labels_path(const char *path) {
    size_t n = strlen(path);
    if (ends_with(path, ".jsonl")) n -= 6;
    return xasprintf("%.*s-labels.lst", (int)n, path);
}

static moe_task *task_new(const char *path, const char *name, const char *format) {
    moe_task *t = moe_calloc(1, sizeof *t);
    t->path = moe_strdup(path);
    t->name = moe_strdup(name);
    for (int i = 0; i < NFORMATS; i++)
        if (!strcmp(formats[i], format)) t->format = formats[i];
    t->kind = strcmp(format, "lm") ? MOE_TASK_MC : MOE_TASK_LM;
    t->has_acc_norm = !strcmp(format, "mc") || !strcmp(format, "piqa") ||
                      !strcmp(format, "hellaswag");
    /* tasks the harness reports without acc_norm */
    static const char *acc_only[] = {"boolq", "copa", "commonsense_qa", "siqa", "social_iqa"};
    for (size_t i = 0; i < sizeof acc_only / sizeof acc_only[0]; i++)
        if (!strcmp(name, acc_only[i])) t->has_acc_norm = 0;
    return t;
}

static moe_task_item *add_item(moe_task *t, int *cap, int nchoices, int gold) {
    if (t->n_items == *cap) {
        *cap = *cap ? *cap * 2 : 256;
        t->items = moe_realloc(t->items, sizeof(moe_task_item) * (size_t)*cap);
    }
    moe_task_item *it = &t->items[t->n_items++];
    it->n = nchoices;
    it->gold = gold;
    it->ctx = moe_calloc((size_t)nchoices, sizeof(char *));
    it->cont = moe_calloc((size_t)nchoices, sizeof(char *));
    it->norm_len = moe_calloc((size_t)nchoices, sizeof(int));
    return it;
}

void moe_task_free(moe_task *t) {
    if (!t) return;
    for (int i = 0; i < t->n_items; i++) {
        moe_task_item *it = &t->items[i];
        for (int j = 0; j < it->n; j++) {
            free(it->ctx[j]);
            free(it->cont[j]);
        }
        free(it->ctx);
        free(it->cont);
        free(it->norm_len);
    }
    free(t->items);
    free(t->name);
    free(t->path);
    free(t);
}

/* JSON helpers with errors naming file and line */
static const char *jstr(json_t *o, const char *key, const char *path, int line) {
    json_t *v = json_object_get(o, key);
    if (!json_is_string(v)) {
        moe_error_set(MOE_ERR_DATA, "%s: line %d: key '%s' %s", path, line, key,
                      v ? "is not a string" : "missing");
        return NULL;
    }
    return json_string_value(v);
}

static int jgold(json_t *o, const char *key, int n, const char *path, int line, int *gold) {
    json_t *v = json_object_get(o, key);
    long long g;
    if (json_is_integer(v)) g = json_integer_value(v);
    else if (json_is_string(v)) g = strtoll(json_string_value(v), NULL, 10);
    else {
        moe_error_set(MOE_ERR_DATA, "%s: line %d: key '%s' %s", path, line, key,
                      v ? "is not an integer" : "missing");
        return -1;
    }
    if (g < 0 || g >= n) {
        moe_error_set(MOE_ERR_DATA, "%s: line %d: gold %lld out of range (%d choices)", path,
                      line, g, n);
        return -1;
    }
    *gold = (int)g;
    return 0;
}

/* ---- detection ---------------------------------------------------------------- */

static const char *detect(const char *path, const char *text) {
    if (ends_with(path, ".tsv")) return "rte";
    if (ends_with(path, ".txt")) return "hellaswag";
    /* JSON Lines: keys of the first non-empty line */
    const char *p = text;
    while (*p == '\n' || *p == '\r' || *p == ' ') p++;
    const char *e = strchr(p, '\n');
    size_t n = e ? (size_t)(e - p) : strlen(p);
    json_error_t jerr;
    json_t *o = json_loadb(p, n, 0, &jerr);
    const char *f = NULL;
    if (json_is_object(o)) {
        if (json_object_get(o, "goal") && json_object_get(o, "sol1")) f = "piqa";
        else if (json_object_get(o, "sentence") && json_object_get(o, "option1")) f = "winogrande";
        else if (json_object_get(o, "context_options")) f = "schema";
        else if (json_object_get(o, "choices")) f = "mc";
        else if (json_object_get(o, "continuation")) f = "lm";
    }
    json_decref(o);
    if (!f)
        moe_error_set(MOE_ERR_DATA,
                      "%s: cannot tell the task format (first record has none of the known "
                      "shapes); give --task-format (%s)",
                      path, moe_task_formats());
    return f;
}

/* MosaicML gauntlet continuation delimiters, by file stem. */
static const char *mosaic_delimiter(const char *name) {
    static const char *answer[] = {"arc_easy", "arc_challenge", "piqa", "boolq"};
    for (size_t i = 0; i < sizeof answer / sizeof answer[0]; i++)
        if (!strcmp(name, answer[i])) return "\nAnswer: ";
    return " ";
}

/* ---- JSON Lines formats ------------------------------------------------------- */

typedef struct {
    const char *path;
    const char *format;
    const char *delim;
    char **labels; /* piqa/winogrande labels file lines, or NULL */
    int nlabels;
} jl_ctx;

/* MosaicML multiple choice: {query|context, choices, gold} */
static int jl_mc(moe_task *t, int *cap, json_t *o, int line, int rec, const jl_ctx *c) {
    const char *path = c->path;
    (void)rec;
    json_t *q = json_object_get(o, "query");
    if (!q) q = json_object_get(o, "context");
    json_t *ch = json_object_get(o, "choices");
    if (!json_is_string(q)) {
        moe_error_set(MOE_ERR_DATA, "%s: line %d: key 'query' %s", path, line,
                      q ? "is not a string" : "missing");
        return -1;
    }
    if (!json_is_array(ch) || json_array_size(ch) == 0) {
        moe_error_set(MOE_ERR_DATA, "%s: line %d: key 'choices' is not a non-empty array",
                      path, line);
        return -1;
    }
    int n = (int)json_array_size(ch), gold;
    if (jgold(o, "gold", n, path, line, &gold)) return -1;
    for (int j = 0; j < n; j++)
        if (!json_is_string(json_array_get(ch, (size_t)j))) {
            moe_error_set(MOE_ERR_DATA, "%s: line %d: choice %d is not a string", path, line, j);
            return -1;
        }
    moe_task_item *it = add_item(t, cap, n, gold);
    for (int j = 0; j < n; j++) {
        const char *s = json_string_value(json_array_get(ch, (size_t)j));
        it->ctx[j] = moe_strdup(json_string_value(q));
        it->cont[j] = xasprintf("%s%s", c->delim, s);
        it->norm_len[j] = u8len(s);
    }
    return 0;
}

/* MosaicML schema: {context_options, continuation, gold} (partial scoring) */
static int jl_schema(moe_task *t, int *cap, json_t *o, int line, int rec, const jl_ctx *c) {
    const char *path = c->path;
    (void)rec;
    json_t *opts = json_object_get(o, "context_options");
    const char *cont = jstr(o, "continuation", path, line);
    if (!cont) return -1;
    if (!json_is_array(opts) || json_array_size(opts) == 0) {
        moe_error_set(MOE_ERR_DATA,
                      "%s: line %d: key 'context_options' is not a non-empty array", path,
                      line);
        return -1;
    }
    int n = (int)json_array_size(opts), gold;
    if (jgold(o, "gold", n, path, line, &gold)) return -1;
    for (int j = 0; j < n; j++)
        if (!json_is_string(json_array_get(opts, (size_t)j))) {
            moe_error_set(MOE_ERR_DATA, "%s: line %d: context option %d is not a string",
                          path, line, j);
            return -1;
        }
    moe_task_item *it = add_item(t, cap, n, gold);
    for (int j = 0; j < n; j++) {
        const char *s = json_string_value(json_array_get(opts, (size_t)j));
        it->ctx[j] = moe_strdup(s);
        it->cont[j] = xasprintf(" %s", cont);
        it->norm_len[j] = u8len(s);
    }
    return 0;
}

/* MosaicML language modelling: {context, continuation} */
static int jl_lm(moe_task *t, int *cap, json_t *o, int line, int rec, const jl_ctx *c) {
    const char *path = c->path;
    (void)rec;
    const char *ctx = jstr(o, "context", path, line), *cont;
    if (!ctx || !(cont = jstr(o, "continuation", path, line))) return -1;
    moe_task_item *it = add_item(t, cap, 1, 0);
    it->ctx[0] = moe_strdup(ctx);
    it->cont[0] = xasprintf(" %s", cont);
    it->norm_len[0] = u8len(cont);
    return 0;
}

/* PIQA: {goal, sol1, sol2}, the label from the labels file */
static int jl_piqa(moe_task *t, int *cap, json_t *o, int line, int rec, const jl_ctx *c) {
    const char *path = c->path;
    const char *g = jstr(o, "goal", path, line), *s1 = NULL, *s2 = NULL;
    if (!g || !(s1 = jstr(o, "sol1", path, line)) || !(s2 = jstr(o, "sol2", path, line)))
        return -1;
    if (rec >= c->nlabels) {
        moe_error_set(MOE_ERR_DATA, "%s: line %d: no label (labels file has %d lines)", path,
                      line, c->nlabels);
        return -1;
    }
    const char *lab = c->labels[rec];
    if (strcmp(lab, "0") && strcmp(lab, "1")) {
        moe_error_set(MOE_ERR_DATA, "%s: label line %d: '%s' is not 0 or 1", path, rec + 1,
                      lab);
        return -1;
    }
    moe_task_item *it = add_item(t, cap, 2, lab[0] - '0');
    const char *sol[2] = {s1, s2};
    for (int j = 0; j < 2; j++) {
        it->ctx[j] = xasprintf("Question: %s\nAnswer:", g);
        it->cont[j] = xasprintf(" %s", sol[j]);
        it->norm_len[j] = u8len(sol[j]);
    }
    return 0;
}

/* WinoGrande: {sentence with '_', option1, option2, answer} (partial scoring) */
static int jl_winogrande(moe_task *t, int *cap, json_t *o, int line, int rec, const jl_ctx *c) {
    const char *path = c->path;
    const char *sent = jstr(o, "sentence", path, line), *o1 = NULL, *o2 = NULL;
    if (!sent || !(o1 = jstr(o, "option1", path, line)) ||
        !(o2 = jstr(o, "option2", path, line)))
        return -1;
    json_t *a = json_object_get(o, "answer");
    const char *ans = json_is_string(a) ? json_string_value(a) : NULL;
    if ((!ans || !*ans) && rec < c->nlabels) ans = c->labels[rec];
    if (!ans || (strcmp(ans, "1") && strcmp(ans, "2"))) {
        moe_error_set(MOE_ERR_DATA, "%s: line %d: answer %s%s%s (need \"1\" or \"2\")", path,
                      line, ans ? "'" : "", ans ? ans : "missing", ans ? "'" : "");
        return -1;
    }
    const char *blank = strchr(sent, '_');
    if (!blank) {
        moe_error_set(MOE_ERR_DATA, "%s: line %d: sentence has no '_'", path, line);
        return -1;
    }
    /* target = sentence[idx+1:].strip() (Python whitespace: ASCII here) */
    const char *b = blank + 1, *e = sent + strlen(sent);
    while (*b == ' ' || *b == '\t' || *b == '\n' || *b == '\r') b++;
    while (e > b && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r')) e--;
    moe_task_item *it = add_item(t, cap, 2, ans[0] - '1');
    const char *opt[2] = {o1, o2};
    for (int j = 0; j < 2; j++) {
        it->ctx[j] = xasprintf("%.*s%s", (int)(blank - sent), sent, opt[j]);
        it->cont[j] = xasprintf(" %.*s", (int)(e - b), b);
        it->norm_len[j] = u8len(it->ctx[j]);
    }
    return 0;
}

static int parse_jl_line(moe_task *t, int *cap, json_t *o, int line, int rec, const jl_ctx *c) {
    static const struct {
        const char *format;
        int (*parse)(moe_task *, int *, json_t *, int, int, const jl_ctx *);
    } parsers[] = {{"mc", jl_mc}, {"schema", jl_schema}, {"lm", jl_lm}, {"piqa", jl_piqa},
                   {"winogrande", jl_winogrande}};
    for (size_t i = 0; i < sizeof parsers / sizeof parsers[0]; i++)
        if (!strcmp(c->format, parsers[i].format)) return parsers[i].parse(t, cap, o, line, rec, c);
    moe_error_set(MOE_ERR_DATA, "%s: format %s is not JSON Lines", c->path, c->format);
    return -1;
}

static int load_jsonl(moe_task *t, char *text, size_t len, const jl_ctx *c, long limit) {
    char **lines;
    int n = split_lines(text, len, &lines), cap = 0, rec = 0, rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const char *p = lines[i];
        while (*p == ' ' || *p == '\t') p++;
        if (!*p) continue;
        if (limit > 0 && t->n_items >= limit) break;
        json_error_t jerr;
        json_t *o = json_loads(p, 0, &jerr);
        if (!json_is_object(o)) {
            moe_error_set(MOE_ERR_DATA, "%s: line %d: %s", c->path, i + 1,
                          o ? "not a JSON object" : jerr.text);
            json_decref(o);
            rc = -1;
            break;
        }
        rc = parse_jl_line(t, &cap, o, i + 1, rec++, c);
        json_decref(o);
    }
    free(lines);
    return rc;
}

/* ---- HellaSwag (llama.cpp text) ------------------------------------------------- */

/* lm-evaluation-harness hellaswag preprocess(): strip, " [title]" -> ". ",
 * remove "[...]" (non-greedy), "  " -> " " (one pass, like str.replace). */
static char *hs_preprocess(const char *s) {
    /* strip */
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r') s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r'))
        n--;
    char *a = moe_malloc(n + 1), *b = moe_malloc(n + 1);
    /* " [title]" -> ". " */
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        if (i + 8 <= n && !memcmp(s + i, " [title]", 8)) {
            a[k++] = '.';
            a[k++] = ' ';
            i += 8;
        } else a[k++] = s[i++];
    }
    a[k] = 0;
    /* remove \[.*?\] (. does not match newline) */
    size_t m = 0;
    for (size_t i = 0; i < k;) {
        if (a[i] == '[') {
            size_t j = i + 1;
            while (j < k && a[j] != ']' && a[j] != '\n') j++;
            if (j < k && a[j] == ']') {
                i = j + 1;
                continue;
            }
        }
        b[m++] = a[i++];
    }
    b[m] = 0;
    /* "  " -> " ", non-overlapping left to right */
    k = 0;
    for (size_t i = 0; i < m;) {
        if (i + 1 < m && b[i] == ' ' && b[i + 1] == ' ') {
            a[k++] = ' ';
            i += 2;
        } else a[k++] = b[i++];
    }
    a[k] = 0;
    free(b);
    return a;
}

static int load_hellaswag(moe_task *t, char *text, size_t len, long limit) {
    char **lines;
    int n = split_lines(text, len, &lines), cap = 0, rc = 0;
    while (n > 0 && lines[n - 1][0] == 0) n--;
    if (n % 6) {
        moe_error_set(MOE_ERR_DATA,
                      "%s: %d lines, not a multiple of 6 (context, label, 4 endings per item)",
                      t->path, n);
        free(lines);
        return -1;
    }
    for (int i = 0; i + 6 <= n && rc == 0; i += 6) {
        if (limit > 0 && t->n_items >= limit) break;
        char *end;
        long g = strtol(lines[i + 1], &end, 10);
        if (end == lines[i + 1] || *end || g < 0 || g > 3) {
            moe_error_set(MOE_ERR_DATA, "%s: line %d: label '%s' is not 0..3", t->path, i + 2,
                          lines[i + 1]);
            rc = -1;
            break;
        }
        moe_task_item *it = add_item(t, &cap, 4, (int)g);
        char *ctx = hs_preprocess(lines[i]);
        for (int j = 0; j < 4; j++) {
            char *e = hs_preprocess(lines[i + 2 + j]);
            it->ctx[j] = moe_strdup(ctx);
            it->cont[j] = xasprintf(" %s", e);
            it->norm_len[j] = u8len(e);
            free(e);
        }
        free(ctx);
    }
    free(lines);
    return rc;
}

/* ---- RTE (GLUE dev.tsv) ------------------------------------------------------ */

static int load_rte(moe_task *t, char *text, size_t len, long limit) {
    char **lines;
    int n = split_lines(text, len, &lines), cap = 0, rc = 0;
    int c1 = -1, c2 = -1, cl = -1;
    if (n > 0) {
        char *h = moe_strdup(lines[0]), *save = NULL;
        int col = 0;
        for (char *f = strtok_r(h, "\t", &save); f; f = strtok_r(NULL, "\t", &save), col++) {
            if (!strcmp(f, "sentence1")) c1 = col;
            else if (!strcmp(f, "sentence2")) c2 = col;
            else if (!strcmp(f, "label")) cl = col;
        }
        free(h);
    }
    if (c1 < 0 || c2 < 0 || cl < 0) {
        moe_error_set(MOE_ERR_DATA, "%s: header needs columns sentence1, sentence2, label",
                      t->path);
        free(lines);
        return -1;
    }
    for (int i = 1; i < n && rc == 0; i++) {
        if (!lines[i][0]) continue;
        if (limit > 0 && t->n_items >= limit) break;
        char *fld[16];
        int nf = 0;
        for (char *p = lines[i]; nf < 16;) {
            fld[nf++] = p;
            char *tab = strchr(p, '\t');
            if (!tab) break;
            *tab = 0;
            p = tab + 1;
        }
        if (nf <= c1 || nf <= c2 || nf <= cl) {
            moe_error_set(MOE_ERR_DATA, "%s: line %d: %d fields, expected at least %d", t->path,
                          i + 1, nf, (c1 > c2 ? (c1 > cl ? c1 : cl) : (c2 > cl ? c2 : cl)) + 1);
            rc = -1;
            break;
        }
        const char *lab = fld[cl];
        int gold;
        if (!strcmp(lab, "0") || !strcmp(lab, "entailment")) gold = 0;
        else if (!strcmp(lab, "1") || !strcmp(lab, "not_entailment")) gold = 1;
        else {
            moe_error_set(MOE_ERR_DATA, "%s: line %d: label '%s' (need 0/1)", t->path, i + 1, lab);
            rc = -1;
            break;
        }
        moe_task_item *it = add_item(t, &cap, 2, gold);
        static const char *ch[2] = {"True", "False"};
        for (int j = 0; j < 2; j++) {
            it->ctx[j] = xasprintf("%s\nQuestion: %s True or False?\nAnswer:", fld[c1], fld[c2]);
            it->cont[j] = xasprintf(" %s", ch[j]);
            it->norm_len[j] = u8len(ch[j]);
        }
    }
    free(lines);
    return rc;
}

/* ---- entry point ---------------------------------------------------------------- */

moe_task *moe_task_load(const char *path, const char *format, const char *delimiter, long limit) {
    if (format) {
        int ok = 0;
        for (int i = 0; i < NFORMATS; i++) ok |= !strcmp(format, formats[i]);
        if (!ok) {
            moe_error_set(MOE_ERR_DATA, "task format '%s' unknown (known: %s)", format,
                          moe_task_formats());
            return NULL;
        }
    }
    size_t len;
    char *text = moe_read_file(path, &len);
    if (!text) return NULL;
    if (!format && !(format = detect(path, text))) {
        free(text);
        return NULL;
    }
    char *st = stem(path);
    /* generic file names of the original datasets get the format's name */
    const char *name = st;
    if (strcmp(format, "mc") && strcmp(format, "schema") && strcmp(format, "lm") &&
        (!strcmp(st, "dev") || !strcmp(st, "valid") || !strcmp(st, "test") ||
         !strcmp(st, "train") || !strncmp(st, "hellaswag", 9)))
        name = format;
    moe_task *t = task_new(path, name, format);
    int rc;
    if (!strcmp(format, "hellaswag")) rc = load_hellaswag(t, text, len, limit);
    else if (!strcmp(format, "rte")) rc = load_rte(t, text, len, limit);
    else {
        jl_ctx c = {.path = path, .format = format};
        c.delim = delimiter ? delimiter : mosaic_delimiter(st);
        char *ltext = NULL, *lp = NULL;
        if (!strcmp(format, "piqa") || !strcmp(format, "winogrande")) {
            lp = labels_path(path);
            size_t ll;
            FILE *probe = fopen(lp, "rb");
            if (probe) {
                fclose(probe);
                ltext = moe_read_file(lp, &ll);
                if (!ltext) {
                    free(lp);
                    free(st);
                    free(text);
                    moe_task_free(t);
                    return NULL;
                }
                c.nlabels = split_lines(ltext, ll, &c.labels);
                while (c.nlabels > 0 && !c.labels[c.nlabels - 1][0]) c.nlabels--;
            } else if (!strcmp(format, "piqa")) {
                moe_error_set(MOE_ERR_IO, "%s: labels file %s: %s", path, lp, strerror(errno));
                free(lp);
                free(st);
                free(text);
                moe_task_free(t);
                return NULL;
            }
        }
        rc = load_jsonl(t, text, len, &c, limit);
        free(c.labels);
        free(ltext);
        free(lp);
    }
    free(st);
    free(text);
    if (rc == 0 && t->n_items == 0) {
        moe_error_set(MOE_ERR_DATA, "%s: no items", path);
        rc = -1;
    }
    if (rc) {
        moe_task_free(t);
        return NULL;
    }
    return t;
}
