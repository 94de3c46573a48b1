/* moe-dump - print a moe-stream as JSON Lines, or check it. */
#include "cdmoe_export.h"
#include "cli.h"
#include "jsonout.h"
#include "stream.h"

#include <stdlib.h>
#include <string.h>

static const char help[] =
    "Usage: moe-dump [OPTIONS] [STREAM|-]...\n"
    "Print moe-streams as JSON Lines: the header first, then one record per line.\n"
    "Typed arrays are summarised (dtype, shape, first values, min, max, mean).\n"
    "\n"
    "  --full          print every value of typed arrays and bin data\n"
    "  --preview N     values shown in a typed-array summary (default 8)\n"
    "  --header        print only the header (after verifying the whole stream)\n"
    "  --type TYPE     print only records of this type (repeatable)\n"
    "  --no-header     do not print the header line\n"
    "  --check         verify the stream(s) without printing records; one line per\n"
    "                  stream: NAME: ok, N records, kinds [...]\n"
    "  --cdmoe-json FILE  print, instead, one JSON file of the original CD-MoE\n"
    "                  code: weights (dynamic_weight.json), experts\n"
    "                  (layer_idx_to_expert_idx.json) or order (layer_idx_order.json),\n"
    "                  with layers as MoE-layer numbers from 0 as the original counts\n"
    "With no STREAM, or STREAM '-', read standard input.\n";

enum { OPT_FULL = 1, OPT_PREVIEW, OPT_HEADER, OPT_TYPE, OPT_NO_HEADER, OPT_CHECK, OPT_CDMOE };

typedef struct {
    moe_json_opts json;
    int header_only, no_header, check;
    const char *cdmoe;
    const char *types[32];
    int ntypes;
} dump_opts;

static int wanted(const dump_opts *o, const msgpack_object *rec) {
    if (!o->ntypes) return 1;
    for (int i = 0; i < o->ntypes; i++)
        if (moe_record_is(rec, o->types[i])) return 1;
    return 0;
}

static void print_kinds(const msgpack_object *hdr) {
    const msgpack_object *kinds = moe_map_get(hdr, "kinds");
    printf("[");
    for (uint32_t i = 0; kinds && i < kinds->via.array.size; i++) {
        const msgpack_object *k = &kinds->via.array.ptr[i];
        if (k->type == MSGPACK_OBJECT_STR) printf("%s%.*s", i ? ", " : "", (int)k->via.str.size, k->via.str.ptr);
    }
    printf("]");
}

/* Returns 0 or -1 (error set). */
static int dump_one(const char *path, const dump_opts *o) {
    moe_reader *r = moe_reader_open(path);
    if (!r) return -1;
    if (o->cdmoe) {
        int rc = moe_cdmoe_export(r, o->cdmoe, stdout);
        moe_reader_close(r);
        return rc;
    }
    /* --header prints after the whole stream is verified, so that a damaged
     * stream prints nothing and fails; records print as they are read. */
    int print_header = !o->no_header && !o->check, print_records = !o->check && !o->header_only;
    if (print_header && print_records) {
        moe_json_object(stdout, moe_reader_header(r), &o->json);
        putchar('\n');
    }
    const msgpack_object *rec;
    int rc;
    while ((rc = moe_reader_next(r, &rec)) > 0) {
        if (!print_records || !wanted(o, rec)) continue;
        moe_json_object(stdout, rec, &o->json);
        putchar('\n');
    }
    if (rc == 0 && print_header && !print_records) {
        moe_json_object(stdout, moe_reader_header(r), &o->json);
        putchar('\n');
    }
    if (rc == 0 && o->check) {
        printf("%s: ok, %llu records, kinds ", moe_reader_name(r), (unsigned long long)moe_reader_count(r));
        print_kinds(moe_reader_header(r));
        putchar('\n');
    }
    moe_reader_close(r);
    return rc;
}

int main(int argc, char **argv) {
    moe_cli_init("moe-dump", help, 0, argc, argv);
    static const struct option opts[] = {
        {"full", no_argument, 0, OPT_FULL},       {"preview", required_argument, 0, OPT_PREVIEW},
        {"header", no_argument, 0, OPT_HEADER},   {"type", required_argument, 0, OPT_TYPE},
        {"no-header", no_argument, 0, OPT_NO_HEADER}, {"check", no_argument, 0, OPT_CHECK},
        {"cdmoe-json", required_argument, 0, OPT_CDMOE},
        MOE_CLI_COMMON_OPTIONS, {0, 0, 0, 0}};
    dump_opts o = {.json = {.full = 0, .preview = 8}};
    int c;
    while ((c = getopt_long(argc, argv, ":", opts, NULL)) != -1) {
        if (moe_cli_handle(c, optarg)) continue;
        switch (c) {
        case OPT_FULL: o.json.full = 1; break;
        case OPT_PREVIEW: o.json.preview = (int)moe_cli_long("--preview", optarg, 0, 1 << 30); break;
        case OPT_HEADER: o.header_only = 1; break;
        case OPT_TYPE:
            if (o.ntypes == 32) moe_cli_usage("--type: at most 32");
            o.types[o.ntypes++] = optarg;
            break;
        case OPT_NO_HEADER: o.no_header = 1; break;
        case OPT_CHECK: o.check = 1; break;
        case OPT_CDMOE:
            if (strcmp(optarg, "weights") && strcmp(optarg, "experts") && strcmp(optarg, "order"))
                moe_cli_usage("--cdmoe-json: expected weights, experts or order, got '%s'", optarg);
            o.cdmoe = optarg;
            break;
        default: moe_cli_usage("unknown option");
        }
    }
    static char outbuf[1 << 16];
    setvbuf(stdout, outbuf, _IOFBF, sizeof outbuf);
    const char *stdin_only[] = {"-"};
    const char **paths = optind < argc ? (const char **)argv + optind : stdin_only;
    int n = optind < argc ? argc - optind : 1;
    for (int i = 0; i < n; i++) {
        if (dump_one(paths[i], &o) < 0) {
            fflush(stdout);
            moe_cli_fail();
        }
    }
    moe_cli_flush_stdout();
    return 0;
}
